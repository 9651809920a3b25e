"""pyquant::matmul and pyquant::im2col_matmul for the cuda backend: the CUDA library has no product kernels, so
CUDA tensors run the Triton ones (pyquant.backends.triton.gemm), imported on the first call so that this backend
imports without Triton."""

from __future__ import annotations

from pyquant.backends import kernel


@kernel("matmul", "cuda")
def matmul(a, b, bias, bias_dim, out_dtype):
    from pyquant.backends.triton import gemm

    return gemm.kernels.matmul(a, b, bias, bias_dim, out_dtype)


@kernel("im2col_matmul", "cuda")
def im2col_matmul(x, other, bias, bias_dim, geometry, columns_first, out_dtype):
    from pyquant.backends.triton import gemm

    return gemm.im2col_matmul(x, other, bias, bias_dim, geometry, columns_first, out_dtype)
