"""The cpu backend: calls into the C++ library (csrc/cpu) through its C ABI."""

from __future__ import annotations

import torch

from pyquant import _native
from pyquant._native import DTYPE_CODES, AdamTensor


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def code_table(code: torch.Tensor) -> torch.Tensor:
    table = torch.empty(65536, dtype=torch.uint8)
    _native.cpu_library().pq_build_code_table(_ptr(code), _ptr(table))
    return table


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    from pyquant.functional import cached_code_table

    n = x.numel()
    q = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    table = cached_code_table(code)
    _native.cpu_library().pq_quantize_blockwise(_ptr(x), DTYPE_CODES[x.dtype], n, blocksize, _ptr(table), _ptr(q), _ptr(absmax))
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype):
    out = torch.empty(q.shape, dtype=dtype)
    _native.cpu_library().pq_dequantize_blockwise(
        _ptr(q), _ptr(absmax), _ptr(code), q.numel(), blocksize, _ptr(out), DTYPE_CODES[dtype]
    )
    return out


def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    from pyquant.functional import cached_code_table

    count = len(params)
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
    return torch.tensor(bad, dtype=torch.int64)


OPS = {
    "code_table": code_table,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
    "adam_step": adam_step,
}
