"""The C++ CPU library's block-wise quantisation kernels (csrc/cpu)."""

from __future__ import annotations

import torch

from pyquant._contract import DTYPE_CODES, FLOAT_DTYPES, blocks_of, check_blocksize
from pyquant.backends import kernel
from pyquant.backends.capi import check_code, check_status, check_tensor, cpu_library
from pyquant.backends.code_tables import cached_code_table

CPU = torch.device("cpu")


@kernel("code_table", "cpu")
def code_table(code: torch.Tensor) -> torch.Tensor:
    check_code(code, "code", CPU)
    table = torch.empty(65536, dtype=torch.uint8)
    cpu_library().pq_build_code_table(code.data_ptr(), table.data_ptr())
    return table


@kernel("quantize_blockwise", "cpu")
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    check_tensor(x, "x", FLOAT_DTYPES, CPU)
    check_code(code, "code", CPU)
    blocksize = check_blocksize(blocksize)
    n = x.numel()
    q = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(blocks_of(n, blocksize), dtype=torch.float32)
    table = cached_code_table(code)
    status = cpu_library().pq_quantize_blockwise(
        x.data_ptr(), DTYPE_CODES[x.dtype], n, blocksize, table.data_ptr(), q.data_ptr(), absmax.data_ptr()
    )
    check_status(status, "quantize_blockwise")
    return q, absmax


@kernel("dequantize_blockwise", "cpu")
def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype):
    check_tensor(q, "q", (torch.uint8,), CPU)
    blocksize = check_blocksize(blocksize)
    check_tensor(absmax, "absmax", (torch.float32,), CPU, blocks_of(q.numel(), blocksize))
    check_code(code, "code", CPU)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    out = torch.empty(q.shape, dtype=dtype)
    status = cpu_library().pq_dequantize_blockwise(
        q.data_ptr(), absmax.data_ptr(), code.data_ptr(), q.numel(), blocksize, out.data_ptr(), DTYPE_CODES[dtype]
    )
    check_status(status, "dequantize_blockwise")
    return out
