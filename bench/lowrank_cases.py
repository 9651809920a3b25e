"""The low-rank convolution cases shared by bench/test_lowrank.py (pytest-benchmark) and bench/compare_lowrank.py
(interleaved timing): shapes of DenseNet-121 and EfficientNet-B0 convolutions, dtypes, ranks, the three
implementations compared, their FLOPs, and the callable each timing runs. bench/test_lowrank.py says which
shapes and why.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pyquant.nn import LowRankConv2d

# name: (batch, in, out, size, kernel, stride, padding)
SHAPES = {
    "densenet121-b1-3x3-128to32-56": (8, 128, 32, 56, 3, 1, 1),
    "densenet121-b2-3x3-128to32-28": (8, 128, 32, 28, 3, 1, 1),
    "densenet121-b2-3x3-128to32-28-batch32": (32, 128, 32, 28, 3, 1, 1),
    "densenet121-b3-3x3-128to32-14": (8, 128, 32, 14, 3, 1, 1),
    "densenet121-b3-3x3-128to32-14-batch32": (32, 128, 32, 14, 3, 1, 1),
    "efficientnet_b0-s3-expand-1x1-40to240-28": (8, 40, 240, 28, 1, 1, 0),
    "efficientnet_b0-s3-expand-1x1-40to240-28-batch32": (32, 40, 240, 28, 1, 1, 0),
    "efficientnet_b0-s5-project-1x1-672to112-14": (8, 672, 112, 14, 1, 1, 0),
    "efficientnet_b0-s5-project-1x1-672to112-14-batch32": (32, 672, 112, 14, 1, 1, 0),
    "efficientnet_b0-head-1x1-320to1280-7": (8, 320, 1280, 7, 1, 1, 0),
    "efficientnet_b0-head-1x1-320to1280-7-batch32": (32, 320, 1280, 7, 1, 1, 0),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RANK_FRACTIONS = {"C/8": 8, "C/4": 4, "C/2": 2}
IMPLS = ("torch.nn.Conv2d(dense)", "torch.nn.Conv2d-pair(unfused)", "pyquant.LowRankConv2d(fused)")


def rank(shape, fraction: str) -> int:
    _, cin, cout, *_ = shape
    return max(1, min(cin, cout) // RANK_FRACTIONS[fraction])


def flops(shape, rank: int | None) -> tuple[int, int]:
    n, cin, cout, size, k, stride, pad = shape
    out = (size + 2 * pad - k) // stride + 1
    positions = n * out * out
    dense = 2 * positions * cout * cin * k * k
    low = 2 * positions * (rank * cin * k * k + cout * rank) if rank else dense
    return dense, low


def modules(shape, rank, dtype):
    n, cin, cout, size, k, stride, pad = shape
    torch.manual_seed(0)
    dense = nn.Conv2d(cin, cout, k, stride, pad).to(dtype)
    low = LowRankConv2d.from_conv(dense, rank)
    pair = low.to_sequential()
    low.cache_packed_weights = True  # inference with fixed weights: the opt-in cache (docs/compress.md)
    return {IMPLS[0]: dense, IMPLS[1]: pair, IMPLS[2]: low}


def step(module, x, backward: bool):
    if not backward:
        def run():
            with torch.no_grad():
                module(x)
    else:
        # A dense gradient of the output, as a loss gives: `.sum().backward()` would hand backward a
        # stride-0 tensor of ones, which every implementation copies or handles slowly.
        with torch.no_grad():
            grad = torch.randn(module(x).shape, generator=torch.Generator().manual_seed(3)).to(x.dtype)

        def run():
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(grad)
    return run


def rounds(shape, backward: bool) -> int:
    n, cin, cout, size, k, *_ = shape
    work = n * cin * cout * size * size * k * k
    return 5 if (backward or work > 2e9) else 10
