"""The Triton fused low-rank convolution (pyquant.kernels.lowrank_conv) as the "triton" backend of
pyquant::lowrank_conv2d (float64: the reference). The backward's convolutions run on torch's (cuDNN)."""

from __future__ import annotations

from pyquant._contract import FLOAT_DTYPES
from pyquant.backends import kernel
from pyquant.backends.reference import conv as reference
from pyquant.kernels import lowrank_conv as kernels


@kernel("lowrank_conv2d", "triton")
def lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation, keep: bool):
    if x.dtype not in FLOAT_DTYPES:
        return reference.lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation, keep)
    return kernels.lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation, keep)
