"""The reference backend: every op in plain torch, the executable specification (docs/numerics.md) that the
other backends are tested against, and the fallback when the compiled library is missing. Any device."""

from pyquant.backends.reference import adam4bit, amp, blockwise, conv, gemm, optimizer  # noqa: F401  (each registers its kernels)
