"""The Triton unscale-and-check (pyquant.kernels.amp, which checks its operands) as the "triton" backend."""

from pyquant.backends import kernel
from pyquant.kernels import amp

kernel("unscale_", "triton")(amp.unscale_)
