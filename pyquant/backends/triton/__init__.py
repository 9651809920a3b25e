"""The triton backend: the Triton kernels of pyquant.kernels (the repository's kernels/ folder), registered as
kernels of pyquant's ops. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)."""

from pyquant.backends.triton import amp, blockwise, conv, gemm, optimizer  # noqa: F401  (each registers its kernels)
