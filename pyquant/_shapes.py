"""Output shapes of the compute ops (matmul, im2col_matmul, the low-rank convolution), worked out once.

A low module like pyquant._contract (it imports only torch): the ops' fake kernels (pyquant._ops), the backends'
kernels and the front-ends' argument checks (pyquant.ops) all use these, so a shape rule lives in one place.
"""

from __future__ import annotations

import torch


def broadcast(x: tuple, y: tuple) -> tuple:
    """torch.broadcast_shapes for two concrete shapes, without its overhead (ValueError if they do not)."""
    if x == y:
        return tuple(x)
    n = max(len(x), len(y))
    x, y = (1,) * (n - len(x)) + tuple(x), (1,) * (n - len(y)) + tuple(y)
    out = []
    for p, q in zip(x, y):
        if p != q and p != 1 and q != 1:
            raise ValueError(f"batch dimensions {x} and {y} do not broadcast")
        out.append(q if p == 1 else p)
    return tuple(out)


def matmul_shape(a: torch.Tensor, b: torch.Tensor, fast: bool = True) -> tuple[tuple[int, ...], int, int, int]:
    """(batch, m, n, k) of a @ b for operands of at least two dimensions. `fast=False` for symbolic shapes
    (the fake kernel under torch.compile), which need torch.broadcast_shapes."""
    if fast:
        batch = broadcast(a.shape[:-2], b.shape[:-2])
    else:
        batch = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return batch, a.shape[-2], b.shape[-1], a.shape[-1]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def im2col_shape(x: torch.Tensor, other: torch.Tensor, geometry, columns_first: bool) -> tuple:
    """Shape of columns(x) @ other (columns_first) or other @ columns(x) for a channels-last x (N, H, W, C) and
    geometry (kh, kw, sh, sw, ph, pw, dh, dw)."""
    n, h, w, c = x.shape
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    if columns_first:
        return n * conv_output_size(h, kh, sh, ph, dh) * conv_output_size(w, kw, sw, pw, dw), other.shape[1]
    return other.shape[0], kh * kw * c


def im2col_inner(x: torch.Tensor, other: torch.Tensor, geometry, columns_first: bool) -> tuple[int, int]:
    """(other's inner size, what the columns of x need it to be)."""
    rows, _ = im2col_shape(x, other, geometry, True)
    inner = other.shape[0] if columns_first else other.shape[1]
    expected = geometry[0] * geometry[1] * x.shape[3] if columns_first else rows
    return inner, expected


def lowrank_shape(x, w1, w2, stride, padding, dilation) -> tuple[int, int, int, int]:
    """(N, O, Ho, Wo) of the low-rank convolution of NCHW x with w1 [R, C, kh, kw] and w2 [O, R]."""
    n, _, h, w = x.shape
    kh, kw = w1.shape[2], w1.shape[3]
    return (
        n,
        w2.shape[0],
        conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
        conv_output_size(w, kw, stride[1], padding[1], dilation[1]),
    )
