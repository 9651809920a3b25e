"""The cpu backend: the C++ library (csrc/cpu) through the one C-ABI binding, pyquant.backends.capi.

Every kernel checks its tensors against the sizes it passes before the call: the C side checks sizes and
codes but cannot see how large a buffer is. `set_bf16_dot` is the backend's one switch of the bfloat16 dot
product (products and the low-rank convolution alike)."""

from pyquant.backends.cpu import amp, blockwise, conv, gemm, optimizer  # noqa: F401  (each registers its kernels)
from pyquant.backends.cpu.settings import set_bf16_dot  # noqa: F401
