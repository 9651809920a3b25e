"""Convolution products on the im2col matrix without copying it (an implicit im2col), for `pyquant.nn.Conv2d16`.

The columns of a channels-last input x (N, H, W, C) for a kernel (kh, kw), stride, padding and dilation are

    columns[(n, oy, ox), (ky, kx, c)] = x[n, oy*sh + ky*dh - ph, ox*sw + kx*dw - pw, c]    (0 outside x),

an (N*Ho*Wo) x (kh*kw*C) matrix. A convolution is columns @ W^T and its weight gradient G^T @ columns. This
module checks the arguments and calls the custom op `pyquant::im2col_matmul(x, other, bias, bias_dim, geometry,
columns_first, out_dtype)` (pyquant._ops), which computes columns @ other (columns_first) or other @ columns with
`pyquant::matmul`'s numerics (float32 accumulation, the bias in the accumulator, one rounding;
docs/low_precision.md section 2). Its kernels:

- ``reference`` (pyquant/backends/reference/gemm.py): the explicit columns (`columns`), then the matmul reference;
- ``cpu`` (pyquant/backends/cpu/gemm.py): csrc/cpu/gemm.cpp gathers the columns from x while packing the
  product's operand (`pq_matmul_im2col`): the packed panels, hence the bits, are those of the cpu matmul on the
  explicit copy, without writing the copy (9x the input for a 3x3 kernel) to memory and reading it back;
- ``triton`` / ``cuda``: the explicit columns, then the Triton matmul.

`geometry` is (kh, kw, sh, sw, ph, pw, dh, dw). The op is not differentiable itself: Conv2d16 states its backward
as products (two of them on this op).
"""

from __future__ import annotations

from typing import Optional

import torch

from pyquant import _ops
from pyquant._shapes import conv_output_size as out_size
from pyquant._shapes import im2col_inner
from pyquant.backends.reference.gemm import columns

__all__ = ["columns", "im2col_matmul", "out_size"]


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
    inner, expected = im2col_inner(x, other, geometry, columns_first)
    if inner != expected:
        raise ValueError(f"other has {inner} {'rows' if columns_first else 'columns'}, the columns need {expected}")
    return _ops.im2col_matmul(x, other, bias, bias_dim, geometry, columns_first, out_dtype or x.dtype)
