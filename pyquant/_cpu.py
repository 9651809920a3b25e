"""The cpu backend: calls into the C++ library (csrc/cpu) through its C ABI.

Every function checks its tensors against the sizes it passes (pyquant._native.check_*) before the call:
the C side checks sizes and codes but cannot see how large a buffer is.
"""

from __future__ import annotations

import torch

from pyquant import _native
from pyquant._native import DTYPE_CODES, FLOAT_DTYPES, AdamTensor, blocks_of, check_blocksize, check_code, check_tensor

CPU = torch.device("cpu")


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _checked_call(status: int, op: str) -> None:
    if status != 0:  # unreachable after the Python checks, unless they and the C ones disagree
        raise ValueError(f"pyquant: the CPU library refused {op}: invalid arguments (status {status})")


def code_table(code: torch.Tensor) -> torch.Tensor:
    check_code(code, "code", CPU)
    table = torch.empty(65536, dtype=torch.uint8)
    _native.cpu_library().pq_build_code_table(_ptr(code), _ptr(table))
    return table


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    from pyquant.functional import cached_code_table

    check_tensor(x, "x", FLOAT_DTYPES, CPU)
    check_code(code, "code", CPU)
    blocksize = check_blocksize(blocksize)
    n = x.numel()
    q = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(blocks_of(n, blocksize), dtype=torch.float32)
    table = cached_code_table(code)
    status = _native.cpu_library().pq_quantize_blockwise(
        _ptr(x), DTYPE_CODES[x.dtype], n, blocksize, _ptr(table), _ptr(q), _ptr(absmax)
    )
    _checked_call(status, "quantize_blockwise")
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype):
    check_tensor(q, "q", (torch.uint8,), CPU)
    blocksize = check_blocksize(blocksize)
    check_tensor(absmax, "absmax", (torch.float32,), CPU, blocks_of(q.numel(), blocksize))
    check_code(code, "code", CPU)
    if dtype not in DTYPE_CODES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    out = torch.empty(q.shape, dtype=dtype)
    status = _native.cpu_library().pq_dequantize_blockwise(
        _ptr(q), _ptr(absmax), _ptr(code), q.numel(), blocksize, _ptr(out), DTYPE_CODES[dtype]
    )
    _checked_call(status, "dequantize_blockwise")
    return out


def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    from pyquant.functional import cached_code_table

    _native.check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    count = len(params)
    if count and params[0].device != CPU:
        raise ValueError(f"adam_step: the cpu backend got tensors on {params[0].device}")
    descriptors = (AdamTensor * count)()
    rows = constants.tolist()
    for d, p, g, s1, s2, a1, a2, row in zip(descriptors, params, grads, state1, state2, absmax1, absmax2, rows):
        d.param, d.grad, d.state1, d.state2 = _ptr(p), _ptr(g), _ptr(s1), _ptr(s2)
        d.absmax1, d.absmax2 = _ptr(a1), _ptr(a2)
        d.numel = p.numel()
        d.param_dtype, d.grad_dtype = DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
        d.state_bits = 8 if s1.dtype == torch.uint8 else 32
        d.k = _native.AdamConstants(*row)
    table1, table2 = cached_code_table(code1), cached_code_table(code2)
    bad = _native.cpu_library().pq_adam_step(
        descriptors, count, _ptr(code1), _ptr(code2), _ptr(table1), _ptr(table2), nonfinite
    )
    if bad < 0:
        _checked_call(-bad, "adam_step")
    return torch.tensor(bad, dtype=torch.int64)


OPS = {
    "code_table": code_table,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
    "adam_step": adam_step,
}
