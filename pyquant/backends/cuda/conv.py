"""pyquant::lowrank_conv2d for the cuda backend: the CUDA library has no such kernel, so CUDA tensors run the
Triton one (pyquant.backends.triton.conv), imported on the first call so that this backend imports without
Triton. The backward's convolutions run on torch's (cuDNN)."""

from __future__ import annotations

from pyquant.backends import kernel


@kernel("lowrank_conv2d", "cuda")
def lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation, keep: bool):
    from pyquant.backends.triton import conv

    return conv.lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation, keep)
