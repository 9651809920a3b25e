"""The CUDA library's block-wise quantisation kernels (csrc/cuda): same signatures and bits as the cpu backend's."""

from __future__ import annotations

import torch

from pyquant._contract import DTYPE_CODES, FLOAT_DTYPES, blocks_of, check_blocksize
from pyquant.backends import implementation, kernel
from pyquant.backends.capi import check_code, check_tensor
from pyquant.backends.code_tables import cached_code_table
from pyquant.backends.cuda.launch import check, library, stream


ptr = torch.Tensor.data_ptr


@kernel("code_table", "cuda")
def code_table(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry table, built on the CPU (bit-identical on every backend) and copied to code's device."""
    return implementation("code_table", "cpu")(code.detach().cpu().contiguous()).to(code.device)


@kernel("quantize_blockwise", "cuda")
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    check_tensor(x, "x", FLOAT_DTYPES, x.device)
    check_code(code, "code", x.device)
    blocksize = check_blocksize(blocksize)
    lib = library()
    n = x.numel()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(blocks_of(n, blocksize), dtype=torch.float32, device=x.device)
    table = cached_code_table(code)
    with torch.cuda.device(x.device):
        error = lib.pq_cuda_quantize_blockwise(
            ptr(x), DTYPE_CODES[x.dtype], n, blocksize, ptr(table), ptr(q), ptr(absmax), stream(x.device)
        )
    check(error, "quantize_blockwise")
    return q, absmax


@kernel("dequantize_blockwise", "cuda")
def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype):
    check_tensor(q, "q", (torch.uint8,), q.device)
    blocksize = check_blocksize(blocksize)
    check_tensor(absmax, "absmax", (torch.float32,), q.device, blocks_of(q.numel(), blocksize))
    check_code(code, "code", q.device)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    lib = library()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    with torch.cuda.device(q.device):
        error = lib.pq_cuda_dequantize_blockwise(
            ptr(q), ptr(absmax), ptr(code), q.numel(), blocksize, ptr(out), DTYPE_CODES[dtype], stream(q.device)
        )
    check(error, "dequantize_blockwise")
    return out
