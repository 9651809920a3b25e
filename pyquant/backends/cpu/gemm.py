"""The C++ CPU library's half-precision products (csrc/cpu/gemm.cpp): pyquant::matmul and
pyquant::im2col_matmul.

Every element is the sequential sum c = fma(a_ik, b_kj, c), k = 0..K-1, from c = bias (or 0), rounded once: the
same bits for any thread count, blocking or instruction set (the bfloat16 pair kernel, where allowed by
`set_bf16_dot`, sums pairs of k). The im2col product gathers the columns from x while packing its operand:
the bits of the matmul on the explicit columns, without writing them to memory."""

from __future__ import annotations

from typing import Optional

import torch

from pyquant._contract import DTYPE_CODES, FLOAT_DTYPES
from pyquant._shapes import im2col_inner, im2col_shape, matmul_shape
from pyquant.backends import kernel
from pyquant.backends.capi import check_product_operands, cpu_library, int64_array
from pyquant.backends.cpu.settings import bf16_dot_flags


def collapse(sizes: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 batch dimensions and merge neighbours that are one dimension for every tensor."""
    dims = [(n, [s[i] for s in strides]) for i, n in enumerate(sizes) if n != 1]
    merged: list[tuple[int, list[int]]] = []
    for n, st in dims:
        if merged:
            n0, st0 = merged[-1]
            if all(outer == inner * n for outer, inner in zip(st0, st)):
                merged[-1] = (n0 * n, st)
                continue
        merged.append((n, st))
    return [n for n, _ in merged], [[st[t] for _, st in merged] for t in range(len(strides))]


def check_out_dtype(out_dtype) -> None:
    if out_dtype not in FLOAT_DTYPES:  # the C entry points return nothing: refuse here what they would misread
        raise ValueError(f"the cpu kernel writes float32/float16/bfloat16 results, not {out_dtype}")


def _bias_args(bias: Optional[torch.Tensor], bias_dim: int) -> tuple:
    if bias is None:
        return None, 0, 0, int(bias_dim == -2)
    return bias.data_ptr(), DTYPE_CODES[bias.dtype], bias.stride(0), int(bias_dim == -2)


@kernel("matmul", "cpu")
def matmul(a, b, bias: Optional[torch.Tensor], bias_dim: int, out_dtype: torch.dtype):
    """Any strides; batch broadcasting by zero strides."""
    batch, m, n, k = matmul_shape(a, b)
    if b.shape[-2] != k:
        raise ValueError(f"inner dimensions do not match: a is {tuple(a.shape)} and b is {tuple(b.shape)}")
    check_product_operands(dict(a=a, b=b), bias, m if bias_dim == -2 else n)
    check_out_dtype(out_dtype)
    out = torch.empty(batch + (m, n), dtype=out_dtype)
    if out.numel() == 0:
        return out
    a = a.expand(batch + (m, k))
    b = b.expand(batch + (k, n))
    nb = len(batch)
    sizes, (sa, sb, sc) = collapse(list(batch), [list(t.stride()[:nb]) for t in (a, b, out)])
    ars, acs = a.stride()[-2:]
    brs, bcs = b.stride()[-2:]
    crs, ccs = out.stride()[-2:]
    # A batch dimension that B broadcasts over and that continues the rows of A and C is more rows
    # (not with a bias per row: it has m values).
    row_bias = bias is not None and bias_dim == -2
    while sizes and sb[-1] == 0 and sa[-1] == m * ars and sc[-1] == m * crs and not row_bias:
        m *= sizes.pop()
        sa.pop(), sb.pop(), sc.pop()
    cpu_library().pq_matmul(
        len(sizes), int64_array(sizes),
        a.data_ptr(), DTYPE_CODES[a.dtype], int64_array(sa + [ars, acs]),
        b.data_ptr(), DTYPE_CODES[b.dtype], int64_array(sb + [brs, bcs]),
        *_bias_args(bias, bias_dim),
        out.data_ptr(), DTYPE_CODES[out_dtype], int64_array(sc + [crs, ccs]),
        m, n, k, torch.get_num_threads(), bf16_dot_flags(),
    )
    return out


def check_im2col_other(x, other, geometry, columns_first: bool) -> None:
    """other's inner size against the columns of a 4-D x (the C kernel derives it from x and the geometry)."""
    inner, expected = im2col_inner(x, other, geometry, columns_first)
    if inner != expected:
        raise ValueError(f"other has {inner} {'rows' if columns_first else 'columns'}, the columns need {expected}")


@kernel("im2col_matmul", "cpu")
def im2col_matmul(x, other, bias, bias_dim, geometry, columns_first, out_dtype):
    check_im2col_other(x, other, geometry, columns_first)
    check_out_dtype(out_dtype)
    if x.stride(-1) != 1:  # the kernel gathers runs of contiguous channels
        x = x.contiguous()
    out = torch.empty(im2col_shape(x, other, geometry, columns_first), dtype=out_dtype)
    check_product_operands(dict(x=x, other=other), bias, out.shape[0] if bias_dim == -2 else out.shape[1])
    if out.numel() == 0:
        return out
    other_dim = other.shape[1] if columns_first else other.shape[0]
    cpu_library().pq_matmul_im2col(
        x.data_ptr(), DTYPE_CODES[x.dtype], int64_array(x.shape), int64_array(x.stride()[:3]),
        int64_array(geometry), int(not columns_first),
        other.data_ptr(), DTYPE_CODES[other.dtype], int64_array(other.stride()), other_dim,
        *_bias_args(bias, bias_dim),
        out.data_ptr(), DTYPE_CODES[out_dtype], int64_array(out.stride()),
        torch.get_num_threads(), bf16_dot_flags(),
    )
    return out
