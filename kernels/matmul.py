"""Triton kernel for pyquant::matmul: C = A @ B (+ bias), float32 accumulation, one rounding.

Tiled: each program computes a BLOCK_M x BLOCK_N tile of one product of the batch, walking K in steps of
BLOCK_K with `tl.dot(a, b, acc, out_dtype=tl.float32)`; the accumulator starts from the bias (one value
per column, or per row with BIAS_ROWS; else 0) and is rounded once to C's dtype on the store
(pyquant.kernels.blockwise.store_f32: round to nearest even).
Programs are ordered in groups of GROUP_M tile rows so that neighbouring programs share B tiles in L2.

Operands can have any strides. Batch dimensions (broadcast ones have stride 0) are flattened by the host
into one grid axis; each program reads its operands' batch offsets from small int64 tables.

On a GPU the 16-bit operands go to tl.dot as they are (tensor cores, float32 accumulation; configurations
autotuned per shape). Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors, for the tests) one fixed
configuration runs, and the operands are widened to float32 first (`input_precision="ieee"`): the
interpreter mishandles bfloat16, and the widening is exact, so the result is the same product.
Error bound: docs/low_precision.md.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pyquant.kernels.blockwise import DTYPE_CODES, load_f32, storage_view, store_f32

MAX_BATCH_PER_LAUNCH = 65535  # grid axis 1 limit
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=2, num_stages=4),
]


@triton.jit
def _load_tile(ptr, offs, mask, DTYPE: tl.constexpr, WIDEN: tl.constexpr):
    """A tile of storage of DTYPE (16-bit kinds addressed as int16) for tl.dot: float32 when WIDEN (exact),
    else the 16-bit type itself (float32 storage is always float32)."""
    if WIDEN or DTYPE == 0:
        x = load_f32(ptr, offs, mask, DTYPE)
    elif DTYPE == 1:
        x = tl.load(ptr + offs, mask=mask, other=0).to(tl.float16, bitcast=True)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0).to(tl.bfloat16, bitcast=True)
    return x


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, a_batch_ptr, b_batch_ptr, c_batch_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_bias,
    A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, BIAS_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_ROWS: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M tile rows walk the tile columns together
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    a_base = tl.load(a_batch_ptr + batch)
    b_base = tl.load(b_batch_ptr + batch)
    c_base = tl.load(c_batch_ptr + batch)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_offs = a_base + rm.to(tl.int64)[:, None] * stride_am + rk.to(tl.int64)[None, :] * stride_ak
    b_offs = b_base + rk.to(tl.int64)[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn

    if HAS_BIAS:
        if BIAS_ROWS:
            bias = load_f32(bias_ptr, rm.to(tl.int64) * stride_bias, m_ok, BIAS_DTYPE)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + bias[:, None]
        else:
            bias = load_f32(bias_ptr, rn.to(tl.int64) * stride_bias, n_ok, BIAS_DTYPE)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + bias[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = _load_tile(a_ptr, a_offs, m_ok[:, None] & k_ok[None, :], A_DTYPE, WIDEN)
        b = _load_tile(b_ptr, b_offs, k_ok[:, None] & n_ok[None, :], B_DTYPE, WIDEN)
        if a.dtype != b.dtype:  # mixed operands (a float32 gradient with 16-bit weights): widen both
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        a_offs += BLOCK_K * stride_ak
        b_offs += BLOCK_K * stride_bk

    c_offs = c_base + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    store_f32(c_ptr, c_offs, acc, m_ok[:, None] & n_ok[None, :], C_DTYPE)


_autotuned_kernel = triton.autotune(configs=GPU_CONFIGS, key=["M", "N", "K", "A_DTYPE", "B_DTYPE", "C_DTYPE"])(
    _matmul_kernel
)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _batch_offsets(batch: tuple[int, ...], strides: tuple[int, ...], device) -> torch.Tensor:
    """Element offset of every batch entry (row-major order over `batch`), int64 on `device`."""
    offs = torch.zeros(batch, dtype=torch.int64, device=device)
    for dim, (size, stride) in enumerate(zip(batch, strides)):
        shape = [1] * len(batch)
        shape[dim] = size
        offs = offs + torch.arange(size, dtype=torch.int64, device=device).view(shape) * stride
    return offs.reshape(-1)


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, bias_dim: int, out_dtype: torch.dtype):
    batch = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    m, k = a.shape[-2:]
    n = b.shape[-1]
    out = torch.empty(batch + (m, n), dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    a = a.expand(batch + (m, k))
    b = b.expand(batch + (k, n))
    nb = len(batch)
    a_batch = _batch_offsets(batch, a.stride()[:nb], a.device)
    b_batch = _batch_offsets(batch, b.stride()[:nb], a.device)
    c_batch = _batch_offsets(batch, out.stride()[:nb], a.device)
    count = a_batch.numel()
    has_bias = bias is not None
    bias_arg = storage_view(bias) if has_bias else a_batch  # any tensor: never read without HAS_BIAS
    args = dict(
        A_DTYPE=DTYPE_CODES[a.dtype], B_DTYPE=DTYPE_CODES[b.dtype], C_DTYPE=DTYPE_CODES[out_dtype],
        BIAS_DTYPE=DTYPE_CODES[bias.dtype] if has_bias else 0, HAS_BIAS=has_bias, BIAS_ROWS=bias_dim == -2,
    )
    a_s, b_s, c_s = storage_view(a), storage_view(b), storage_view(out)
    for start in range(0, count, MAX_BATCH_PER_LAUNCH):
        stop = min(count, start + MAX_BATCH_PER_LAUNCH)
        common = (
            a_s, b_s, c_s, bias_arg, a_batch[start:stop], b_batch[start:stop], c_batch[start:stop],
            m, n, k, a.stride(-2), a.stride(-1), b.stride(-2), b.stride(-1), out.stride(-2), out.stride(-1),
            bias.stride(0) if has_bias else 0,
        )
        if _interpreted():
            cfg = INTERPRETER_CONFIG
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), stop - start)
            _matmul_kernel[grid](*common, WIDEN=True, **args, **cfg)
        else:
            def grid(meta, batches=stop - start):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), batches)

            _autotuned_kernel[grid](*common, WIDEN=False, **args)
    return out
