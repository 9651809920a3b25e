"""The cuda backend: the CUDA library (csrc/cuda) through pyquant.backends.capi; same ops, signatures and bits
as the cpu backend, for CUDA tensors. Importing it does no CUDA work: it imports on machines without CUDA."""

from pyquant.backends.cuda import amp, blockwise, conv, gemm, optimizer  # noqa: F401  (each registers its kernels)
