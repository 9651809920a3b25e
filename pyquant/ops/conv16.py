"""Convolution products on the im2col matrix without copying it (an implicit im2col), for `pyquant.nn.Conv2d16`.

The columns of a channels-last input x (N, H, W, C) for a kernel (kh, kw), stride, padding and dilation are

    columns[(n, oy, ox), (ky, kx, c)] = x[n, oy*sh + ky*dh - ph, ox*sw + kx*dw - pw, c]    (0 outside x),

an (N*Ho*Wo) x (kh*kw*C) matrix. A convolution is columns @ W^T and its weight gradient G^T @ columns. The custom
op `pyquant::im2col_matmul(x, other, bias, bias_dim, geometry, columns_first, out_dtype)` computes
columns @ other (columns_first) or other @ columns with `pyquant::matmul`'s numerics (float32 accumulation, the
bias in the accumulator, one rounding; docs/low_precision.md section 2) and a fake kernel. Backends:

- ``reference``: the explicit columns (`columns`), then `pyquant::matmul`'s reference;
- ``cpu``: csrc/cpu/gemm.cpp gathers the columns from x while packing the product's operand (`pq_matmul_im2col`):
  the packed panels, hence the bits, are those of the cpu matmul on the explicit copy, without writing the copy
  (9x the input for a 3x3 kernel) to memory and reading it back;
- ``triton`` / ``cuda``: the explicit columns, then the Triton matmul.

`geometry` is (kh, kw, sh, sw, ph, pw, dh, dw). The op is not differentiable itself: Conv2d16 states its backward
as products (two of them on this op).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch

from pyquant import _native, backends
from pyquant._nvtx import kernel_range
from pyquant.ops.gemm import (
    _DTYPE_CODES,
    _bf16_dot_flags,
    _int64_array,
    check_cpu_operands,
    matmul_cpu,
    matmul_reference,
    matmul_triton,
)

__all__ = ["columns", "im2col_matmul", "out_size"]


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a convolution along one dimension (kernel k, stride s, padding p, dilation d)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def columns(x: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """The explicit channels-last im2col: x (N, H, W, C) -> (N*Ho*Wo, kh*kw*C) with
    columns[(n, oy, ox), (ky, kx, c)] = x_padded[n, oy*s + ky*d, ox*s + kx*d, c]: one strided copy (runs of
    C contiguous values; F.unfold is several times slower on a CPU). No autograd."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if ph or pw:
        xp = x.new_zeros(n, h + 2 * ph, w + 2 * pw, c)  # (N, H, W, C) in memory, whatever x's strides
        xp[:, ph : ph + h, pw : pw + w] = x
    else:
        xp = x.contiguous()
    ho, wo = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    sn, sy, sx, _ = xp.stride()
    cols = xp.as_strided((n, ho, wo, kh, kw, c), (sn, sh * sy, sw * sx, dh * sy, dw * sx, 1))
    return cols.reshape(n * ho * wo, kh * kw * c)


def _split(geometry):
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    return (kh, kw), (sh, sw), (ph, pw), (dh, dw)


def _out_shape(x: torch.Tensor, other: torch.Tensor, geometry, columns_first: bool) -> tuple:
    n, h, w, c = x.shape
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    if columns_first:
        return n * out_size(h, kh, sh, ph, dh) * out_size(w, kw, sw, pw, dw), other.shape[1]
    return other.shape[0], kh * kw * c


def _operands(x, other, geometry, columns_first):
    cols = columns(x, *_split(geometry))
    return (cols, other) if columns_first else (other, cols)


# ---- implementations: (x, other, bias, bias_dim, geometry, columns_first, out_dtype) -> out ----
def im2col_matmul_reference(x, other, bias, bias_dim, geometry, columns_first, out_dtype):
    return matmul_reference(*_operands(x, other, geometry, columns_first), bias, bias_dim, out_dtype)


def im2col_matmul_triton(x, other, bias, bias_dim, geometry, columns_first, out_dtype):
    return matmul_triton(*_operands(x, other, geometry, columns_first), bias, bias_dim, out_dtype)


@functools.cache
def _cpu_fn():
    """pq_matmul_im2col, or None for a library built before it (the explicit columns are then used: same bits)."""
    fn = getattr(_native.cpu_library(), "pq_matmul_im2col", None)
    if fn is not None:
        P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        fn.argtypes = [P, I32, P, P, P, I32, P, I32, P, I64, P, I32, I64, I32, P, I32, P, I32, I32]
        fn.restype = None
    return fn


def im2col_matmul_cpu(x, other, bias, bias_dim, geometry, columns_first, out_dtype):
    fn = _cpu_fn()
    if fn is None:
        return matmul_cpu(*_operands(x, other, geometry, columns_first), bias, bias_dim, out_dtype)
    _check_other(x, other, geometry, columns_first)  # the kernel takes other's inner size from x and geometry
    if x.stride(-1) != 1:  # the kernel gathers runs of contiguous channels
        x = x.contiguous()
    out = torch.empty(_out_shape(x, other, geometry, columns_first), dtype=out_dtype)
    check_cpu_operands(dict(x=x, other=other), bias, out.shape[0] if bias_dim == -2 else out.shape[1])
    if out.numel() == 0:
        return out
    other_dim = other.shape[1] if columns_first else other.shape[0]
    fn(
        x.data_ptr(), _DTYPE_CODES[x.dtype], _int64_array(x.shape), _int64_array(x.stride()[:3]),
        _int64_array(geometry), int(not columns_first),
        other.data_ptr(), _DTYPE_CODES[other.dtype], _int64_array(other.stride()), other_dim,
        None if bias is None else bias.data_ptr(), _DTYPE_CODES[bias.dtype] if bias is not None else 0,
        0 if bias is None else bias.stride(0), int(bias_dim == -2),
        out.data_ptr(), _DTYPE_CODES[out_dtype], _int64_array(out.stride()),
        torch.get_num_threads(), _bf16_dot_flags(),
    )
    return out


backends.register("im2col_matmul", "reference", im2col_matmul_reference)
backends.register("im2col_matmul", "cpu", im2col_matmul_cpu)
backends.register("im2col_matmul", "triton", im2col_matmul_triton)
backends.register("im2col_matmul", "cuda", im2col_matmul_triton)


@torch.library.custom_op("pyquant::im2col_matmul", mutates_args=())
def _im2col_matmul_op(
    x: torch.Tensor,
    other: torch.Tensor,
    bias: Optional[torch.Tensor],
    bias_dim: int,
    geometry: list[int],
    columns_first: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    with kernel_range("im2col_matmul"):
        impl = backends.implementation("im2col_matmul", x.device.type)
        return impl(x, other, bias, bias_dim, tuple(geometry), columns_first, out_dtype)


@_im2col_matmul_op.register_fake
def _(x, other, bias, bias_dim, geometry, columns_first, out_dtype):
    return x.new_empty(_out_shape(x, other, geometry, columns_first), dtype=out_dtype)


def _check_other(x, other, geometry, columns_first: bool) -> None:
    """other's inner size against the columns of a 4-D x (the C kernel derives it from x and the geometry)."""
    rows, _ = _out_shape(x, other, geometry, True)
    inner = other.shape[0] if columns_first else other.shape[1]
    expected = geometry[0] * geometry[1] * x.shape[3] if columns_first else rows
    if inner != expected:
        raise ValueError(f"other has {inner} {'rows' if columns_first else 'columns'}, the columns need {expected}")


def im2col_matmul(x: torch.Tensor, other: torch.Tensor, kernel_size, stride, padding, dilation,
                  columns_first: bool = True, bias: Optional[torch.Tensor] = None, bias_dim: int = -1,
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """columns(x) @ other (columns_first) or other @ columns(x), for a channels-last x (N, H, W, C) and a 2-D
    `other` of x's dtype (float16 / bfloat16); pairs of ints for the geometry; `bias` added to the float32
    accumulator (bias_dim -1: one per column, -2: one per row); one rounding to out_dtype (default x's dtype)."""
    if x.dim() != 4 or other.dim() != 2:
        raise ValueError(f"x must be 4-D (N, H, W, C) and other 2-D, got {tuple(x.shape)} and {tuple(other.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16) or other.dtype != x.dtype:
        raise TypeError(f"x and other must both be float16 or both bfloat16, got {x.dtype} and {other.dtype}")
    geometry = [int(v) for pair in (kernel_size, stride, padding, dilation) for v in pair]
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"kernel, stride, dilation must be >= 1 and padding >= 0, got {tuple(geometry)}")
    _, h, w, _ = x.shape
    if out_size(h, kh, sh, ph, dh) < 1 or out_size(w, kw, sw, pw, dw) < 1:
        raise ValueError(f"the kernel {kh}x{kw} (dilation {dh}x{dw}, padding {ph}x{pw}) does not fit x of {h}x{w}")
    _check_other(x, other, geometry, columns_first)
    return _im2col_matmul_op(x, other, bias, bias_dim, geometry, columns_first, out_dtype or x.dtype)
