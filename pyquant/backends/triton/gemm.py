"""The Triton matmul (pyquant.kernels.matmul) as the "triton" backend of pyquant::matmul and
pyquant::im2col_matmul (the latter on the explicit columns)."""

from __future__ import annotations

from pyquant.backends import kernel
from pyquant.backends.reference.gemm import im2col_operands
from pyquant.kernels import matmul as kernels

kernel("matmul", "triton")(kernels.matmul)


@kernel("im2col_matmul", "triton")
def im2col_matmul(x, other, bias, bias_dim, geometry, columns_first, out_dtype):
    return kernels.matmul(*im2col_operands(x, other, geometry, columns_first), bias, bias_dim, out_dtype)
