"""Reference kernels of the convolution ops: the fused low-rank convolution (pyquant::lowrank_conv2d) as two
F.conv2d calls in float32, and the two convolutions its backward hands to pyquant's CPU kernels
(pyquant::conv2d_weight_grad, pyquant::conv2d_stride1) as torch's. Any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyquant.backends import kernel

HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the reference computes in: float32 for 16-bit tensors, else their own dtype (float64 stays)."""
    return torch.float32 if dtype in HALF else dtype


@kernel("lowrank_conv2d", "reference")
def lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation, keep: bool):
    """(y, t or an empty tensor): two F.conv2d calls in float32 (float64 stays float64), each result rounded
    once to x's dtype; t, the rank-channel intermediate, only when `keep`."""
    cd = compute_dtype(x.dtype)
    t = F.conv2d(x.to(cd), w1.to(cd), None, stride, padding, dilation)
    y = F.conv2d(t, w2.to(cd)[:, :, None, None], None if bias is None else bias.to(cd))
    return y.to(x.dtype), (t.to(x.dtype) if keep else x.new_empty(0))


@kernel("conv2d_weight_grad", "reference")
def conv2d_weight_grad(x, grad, weight_size, stride, padding, dilation):
    """The float32 weight gradient of conv2d(x, W, None, stride, padding, dilation) for y's gradient `grad`."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = x.new_empty(tuple(weight_size), dtype=cd)
    _, gw, _ = torch.ops.aten.convolution_backward(
        grad.to(cd), x.to(cd), weight, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
        [False, True, False],
    )
    return gw.float()


@kernel("conv2d_stride1", "reference")
def conv2d_stride1(x, w, padding, dilation):
    """A stride-1 convolution without bias in float32, rounded once to x's dtype."""
    cd = compute_dtype(x.dtype)
    return F.conv2d(x.to(cd), w.to(cd), None, 1, list(padding), list(dilation)).to(x.dtype)
