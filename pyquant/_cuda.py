"""The cuda backend: calls into the CUDA library (csrc/cuda/kernels.cu) through its C ABI.

Same ops, signatures and bits as pyquant._cpu, for CUDA tensors. Kernels are queued on torch's current
stream of the tensors' device and nothing here synchronises with the GPU, except that `adam_step` copies
its small descriptor array from host memory (torch's synchronous host-to-device copy). Importing this
module does no CUDA work, so it imports on machines without CUDA; the library is loaded on first use.
"""

from __future__ import annotations

import ctypes
import functools
import itertools

import torch

from pyquant import _native
from pyquant._native import (
    DTYPE_CODES,
    FLOAT_DTYPES,
    OPTIMIZER_BLOCK,
    AdamTensor,
    blocks_of,
    check_blocksize,
    check_code,
    check_tensor,
)


@functools.cache
def _library() -> ctypes.CDLL:
    lib = _native.cuda_library()
    if lib is None:
        raise RuntimeError(
            "pyquant: the CUDA library is not available (it needs a CUDA device and a build with PYQUANT_CUDA=ON)"
        )
    P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.pq_cuda_quantize_blockwise.argtypes = [P, I32, I64, I64, P, P, P, P]
    lib.pq_cuda_quantize_blockwise.restype = I32
    lib.pq_cuda_dequantize_blockwise.argtypes = [P, P, P, I64, I64, P, I32, P]
    lib.pq_cuda_dequantize_blockwise.restype = I32
    lib.pq_cuda_adam_step.argtypes = [P, P, I32, I64, P, P, P, P, I32, P, P]
    lib.pq_cuda_adam_step.restype = I32
    lib.pq_cuda_unscale_.argtypes = [P, I32, I64, P, P, P]
    lib.pq_cuda_unscale_.restype = I32
    lib.pq_cuda_error_string.argtypes = [I32]
    lib.pq_cuda_error_string.restype = ctypes.c_char_p
    return lib


def _check(lib: ctypes.CDLL, error: int, op: str) -> None:
    if error != 0:
        message = lib.pq_cuda_error_string(error).decode(errors="replace")
        raise RuntimeError(f"pyquant: CUDA {op} launch failed: {message} (cudaError {error})")


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def code_table(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry table, built on the CPU (bit-identical on every backend) and copied to code's device."""
    if _native.cpu_library() is not None:
        from pyquant._cpu import code_table as build
    else:
        from pyquant._reference import code_table as build
    return build(code.detach().cpu().contiguous()).to(code.device)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    from pyquant.functional import cached_code_table

    check_tensor(x, "x", FLOAT_DTYPES, x.device)
    check_code(code, "code", x.device)
    blocksize = check_blocksize(blocksize)
    lib = _library()
    n = x.numel()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(blocks_of(n, blocksize), dtype=torch.float32, device=x.device)
    table = cached_code_table(code)
    with torch.cuda.device(x.device):
        error = lib.pq_cuda_quantize_blockwise(
            _ptr(x), DTYPE_CODES[x.dtype], n, blocksize, _ptr(table), _ptr(q), _ptr(absmax), _stream(x.device)
        )
    _check(lib, error, "quantize_blockwise")
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype):
    check_tensor(q, "q", (torch.uint8,), q.device)
    blocksize = check_blocksize(blocksize)
    check_tensor(absmax, "absmax", (torch.float32,), q.device, blocks_of(q.numel(), blocksize))
    check_code(code, "code", q.device)
    if dtype not in DTYPE_CODES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    lib = _library()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    with torch.cuda.device(q.device):
        error = lib.pq_cuda_dequantize_blockwise(
            _ptr(q), _ptr(absmax), _ptr(code), q.numel(), blocksize, _ptr(out), DTYPE_CODES[dtype], _stream(q.device)
        )
    _check(lib, error, "dequantize_blockwise")
    return out


def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    """One launch for the group; returns the number of non-finite gradient elements skipped, as a 0-dim
    int64 tensor on the parameters' device (not synchronised: read it only when needed)."""
    from pyquant.functional import cached_code_table

    _native.check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    lib = _library()
    count = len(params)
    if count == 0:
        return torch.zeros((), dtype=torch.int64)
    device = params[0].device
    descriptors = (AdamTensor * count)()
    first_block = (ctypes.c_int64 * count)()
    rows = constants.tolist()
    total_blocks = 0
    for i, (d, p, g, s1, s2, a1, a2, row) in enumerate(
        zip(descriptors, params, grads, state1, state2, absmax1, absmax2, rows)
    ):
        d.param, d.grad, d.state1, d.state2 = _ptr(p), _ptr(g), _ptr(s1), _ptr(s2)
        d.absmax1, d.absmax2 = _ptr(a1), _ptr(a2)
        d.numel = p.numel()
        d.param_dtype, d.grad_dtype = DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
        d.state_bits = 8 if s1.dtype == torch.uint8 else 32
        d.k = _native.AdamConstants(*row)
        first_block[i] = total_blocks
        total_blocks += blocks_of(p.numel(), OPTIMIZER_BLOCK)
    bad = torch.zeros((), dtype=torch.int64, device=device)
    if total_blocks == 0:
        return bad
    # One host-to-device copy for both arrays: the descriptors, then (8-byte aligned) the int64 first-block
    # indices. torch's allocator aligns `on_device` far beyond the descriptors' 8 bytes.
    offset = -(-ctypes.sizeof(descriptors) // 8) * 8
    host = bytearray(offset + ctypes.sizeof(first_block))
    host[:offset] = bytes(descriptors)
    host[offset:] = bytes(first_block)
    on_device = torch.frombuffer(host, dtype=torch.uint8).to(device)
    table1, table2 = cached_code_table(code1), cached_code_table(code2)
    with torch.cuda.device(device):
        error = lib.pq_cuda_adam_step(
            _ptr(on_device), _ptr(on_device) + offset, count, total_blocks,
            _ptr(code1), _ptr(code2), _ptr(table1), _ptr(table2), nonfinite, _ptr(bad), _stream(device),
        )
    _check(lib, error, "adam_step")
    return bad


UNSCALE_CHUNK = 4096  # kUnscaleChunk of csrc/cuda/kernels.cu
UNSCALE_DTYPE_CODES = {**DTYPE_CODES, torch.float64: 3}


def unscale_(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """GradScaler's unscale_ in one launch over every gradient of the device (op `pyquant::unscale_`,
    registered by pyquant.amp); a non-contiguous gradient goes to the reference. Asynchronous."""
    from pyquant.amp import check_unscale_operands, unscale_reference

    check_unscale_operands(grads, found_inf, inv_scale)
    dense = [g for g in grads if g.numel() > 0 and g.is_contiguous()]
    others = [g for g in grads if g.numel() > 0 and not g.is_contiguous()]
    if dense:
        lib = _library()
        device = found_inf.device
        chunks = [-(-g.numel() // UNSCALE_CHUNK) for g in dense]
        first_chunk = [0, *itertools.accumulate(chunks[:-1])]  # a quadratic sum took 1.4 ms of the 2.1 ms (RESULTS)
        meta = torch.tensor(
            [[_ptr(g) for g in dense], [g.numel() for g in dense], [UNSCALE_DTYPE_CODES[g.dtype] for g in dense],
             first_chunk],
            dtype=torch.int64,
        ).to(device)
        with torch.cuda.device(device):
            error = lib.pq_cuda_unscale_(
                _ptr(meta), len(dense), sum(chunks), _ptr(found_inf), _ptr(inv_scale), _stream(device)
            )
        _check(lib, error, "unscale_")
    if others:
        unscale_reference(others, found_inf, inv_scale)


OPS = {
    "code_table": code_table,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
    "adam_step": adam_step,
}
