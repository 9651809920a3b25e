"""The C++ CPU library's fused optimizer steps (csrc/cpu): one call updates every tensor of a parameter group.

Adam (`adam_step`), the one-state rules (`one_state_step`: momentum, Lion, RMSprop, Adagrad), every rule in C++,
and AdEMAMix (`ademamix_step`)."""

from __future__ import annotations

import torch

from pyquant._contract import DTYPE_CODES
from pyquant.backends import kernel
from pyquant.backends.capi import (
    AdamConstants, AdamTensor, AdemamixConstants, AdemamixTensor, OneStateConstants, OneStateTensor,
    check_adam_operands, check_ademamix_operands, check_one_state_operands, check_status, cpu_library,
)
from pyquant.backends.code_tables import cached_code_table


@kernel("adam_step", "cpu")
def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    count = len(params)
    if count and params[0].device.type != "cpu":
        raise ValueError(f"adam_step: the cpu backend got tensors on {params[0].device}")
    descriptors = (AdamTensor * count)()
    rows = constants.tolist()
    for d, p, g, s1, s2, a1, a2, row in zip(descriptors, params, grads, state1, state2, absmax1, absmax2, rows):
        d.param, d.grad, d.state1, d.state2 = p.data_ptr(), g.data_ptr(), s1.data_ptr(), s2.data_ptr()
        d.absmax1, d.absmax2 = a1.data_ptr(), a2.data_ptr()
        d.numel = p.numel()
        d.param_dtype, d.grad_dtype = DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
        d.state_bits = 8 if s1.dtype == torch.uint8 else 32
        d.k = AdamConstants(*row)
    table1, table2 = cached_code_table(code1), cached_code_table(code2)
    bad = cpu_library().pq_adam_step(
        descriptors, count, code1.data_ptr(), code2.data_ptr(), table1.data_ptr(), table2.data_ptr(), nonfinite
    )
    if bad < 0:
        check_status(-bad, "adam_step")
    return torch.tensor(bad, dtype=torch.int64)


@kernel("one_state_step", "cpu")
def one_state_step(params, grads, state1, absmax1, constants, code1, rule, nonfinite):
    check_one_state_operands(params, grads, state1, absmax1, constants, code1, rule, nonfinite)
    count = len(params)
    if count and params[0].device.type != "cpu":
        raise ValueError(f"one_state_step: the cpu backend got tensors on {params[0].device}")
    descriptors = (OneStateTensor * count)()
    for d, p, g, s1, a1, row in zip(descriptors, params, grads, state1, absmax1, constants.tolist()):
        d.param, d.grad, d.state1, d.absmax1 = p.data_ptr(), g.data_ptr(), s1.data_ptr(), a1.data_ptr()
        d.numel = p.numel()
        d.param_dtype, d.grad_dtype = DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
        d.state_bits = 8 if s1.dtype == torch.uint8 else 32
        d.k = OneStateConstants(*row)
    table1 = cached_code_table(code1)
    bad = cpu_library().pq_one_state_step(descriptors, count, code1.data_ptr(), table1.data_ptr(), rule, nonfinite)
    if bad < 0:
        check_status(-bad, "one_state_step")
    return torch.tensor(bad, dtype=torch.int64)


@kernel("ademamix_step", "cpu")
def ademamix_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    check_ademamix_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    count = len(params)
    if count and params[0].device.type != "cpu":
        raise ValueError(f"ademamix_step: the cpu backend got tensors on {params[0].device}")
    descriptors = (AdemamixTensor * count)()
    rows = constants.tolist()
    for d, p, g, s1, s2, a1, a2, row in zip(descriptors, params, grads, state1, state2, absmax1, absmax2, rows):
        d.param, d.grad, d.state1, d.state2 = p.data_ptr(), g.data_ptr(), s1.data_ptr(), s2.data_ptr()
        d.absmax1, d.absmax2 = a1.data_ptr(), a2.data_ptr()
        d.numel = p.numel()
        d.param_dtype, d.grad_dtype = DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
        d.state_bits = 8 if s1.dtype == torch.uint8 else 32
        d.k = AdemamixConstants(*row)
    table1, table2 = cached_code_table(code1), cached_code_table(code2)
    bad = cpu_library().pq_ademamix_step(
        descriptors, count, code1.data_ptr(), code2.data_ptr(), table1.data_ptr(), table2.data_ptr(), nonfinite
    )
    if bad < 0:
        check_status(-bad, "ademamix_step")
    return torch.tensor(bad, dtype=torch.int64)
