"""Reference kernels of the half-precision products (pyquant::matmul, pyquant::im2col_matmul): torch's float32
matmul of the widened operands, the bias added to the float32 result, one rounding to the output dtype
(docs/low_precision.md section 2). Any device.

`columns` is the explicit channels-last im2col that pyquant::im2col_matmul multiplies without copying on the cpu
backend; here (and on the triton backend) the copy is made."""

from __future__ import annotations

from typing import Optional

import torch

from pyquant._shapes import conv_output_size
from pyquant.backends import kernel


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
    ho, wo = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    sn, sy, sx, _ = xp.stride()
    cols = xp.as_strided((n, ho, wo, kh, kw, c), (sn, sh * sy, sw * sx, dh * sy, dw * sx, 1))
    return cols.reshape(n * ho * wo, kh * kw * c)


def split_geometry(geometry) -> tuple:
    """(kh, kw, sh, sw, ph, pw, dh, dw) -> the pairs (kernel, stride, padding, dilation)."""
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    return (kh, kw), (sh, sw), (ph, pw), (dh, dw)


def im2col_operands(x, other, geometry, columns_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two operands of pyquant::im2col_matmul as explicit matrices."""
    cols = columns(x, *split_geometry(geometry))
    return (cols, other) if columns_first else (other, cols)


@kernel("matmul", "reference")
def matmul(a, b, bias: Optional[torch.Tensor], bias_dim: int, out_dtype: torch.dtype):
    """torch's float32 matmul of the widened operands (+ bias: per column for bias_dim -1, per row for -2),
    rounded once to out_dtype."""
    out = torch.matmul(a.float(), b.float())
    if bias is not None:
        out = out + (bias.float() if bias_dim == -1 else bias.float().unsqueeze(-1))
    return out.to(out_dtype)


@kernel("im2col_matmul", "reference")
def im2col_matmul(x, other, bias, bias_dim, geometry, columns_first, out_dtype):
    return matmul(*im2col_operands(x, other, geometry, columns_first), bias, bias_dim, out_dtype)
