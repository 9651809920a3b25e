"""pyquant.nn.LowRankConv2d (fused) against the dense nn.Conv2d it replaces and the unfused pair of
nn.Conv2d layers, forward and forward+backward, at convolution shapes of DenseNet-121 and EfficientNet-B0.

    pytest bench/test_lowrank.py --benchmark-only [-k "dn28 and float32 and forward"]

One group per (shape, dtype, pass, rank) with the three implementations. Ranks are C/8, C/4 and C/2 of
C = min(in, out) (the largest useful rank is min(out, in * k * k)). `extra_info` of every entry: the
layer's FLOPs (2 per multiply-add, per call), the FLOP reduction of the factorisation against the dense
conv, the speed-up against the dense conv measured in the same session, and that speed-up divided by the
FLOP reduction ("efficiency": 1 means the whole FLOP saving became time). docs/compress.md records a run.

Shapes:
- DenseNet-121 dense-layer conv2, 3x3 128 -> 32, at 56x56 (block 1), 28x28 (block 2) and 14x14 (block 3);
- EfficientNet-B0 1x1 convolutions (its 3x3/5x5 are depthwise, which SVD does not factorise): the
  stage-3 expansion 40 -> 240 at 28x28, the stage-5 projection 672 -> 112 at 14x14 and the head
  320 -> 1280 at 7x7;
- batch 32 of every shape but the 56x56 one (batch 8 otherwise).
"""

from __future__ import annotations

import time

import pytest
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
_dense_median: dict[tuple, float] = {}


def _rank(shape, fraction: str) -> int:
    _, cin, cout, *_ = shape
    return max(1, min(cin, cout) // RANK_FRACTIONS[fraction])


def _flops(shape, rank: int | None) -> tuple[int, int]:
    n, cin, cout, size, k, stride, pad = shape
    out = (size + 2 * pad - k) // stride + 1
    positions = n * out * out
    dense = 2 * positions * cout * cin * k * k
    low = 2 * positions * (rank * cin * k * k + cout * rank) if rank else dense
    return dense, low


def _modules(shape, rank, dtype):
    n, cin, cout, size, k, stride, pad = shape
    torch.manual_seed(0)
    dense = nn.Conv2d(cin, cout, k, stride, pad).to(dtype)
    low = LowRankConv2d.from_conv(dense, rank)
    pair = low.to_sequential()
    low.cache_packed_weights = True  # inference with fixed weights: the opt-in cache (docs/compress.md)
    return {IMPLS[0]: dense, IMPLS[1]: pair, IMPLS[2]: low}


def _step(module, x, backward: bool):
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


def _rounds(shape, backward: bool) -> int:
    n, cin, cout, size, k, *_ = shape
    work = n * cin * cout * size * size * k * k
    return 5 if (backward or work > 2e9) else 10


def _median_time(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fraction", list(RANK_FRACTIONS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_lowrank_conv(benchmark, shape_name, passes, dtype, fraction, impl):
    if shape_name.endswith("batch32") and (dtype != "float32"):
        pytest.skip("batch 32 is measured in float32 only")
    shape = SHAPES[shape_name]
    backward = passes == "forward+backward"
    rank = _rank(shape, fraction)
    n, cin, cout, size, *_ = shape
    mods = _modules(shape, rank, DTYPES[dtype])
    x = torch.randn(n, cin, size, size, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    if backward:
        x.requires_grad_()
    rounds = _rounds(shape, backward)
    key = (shape_name, passes, dtype)
    if impl != IMPLS[0] and key not in _dense_median:  # the dense reference, when its test did not run first
        _dense_median[key] = _median_time(_step(mods[IMPLS[0]], x, backward), rounds)
    benchmark.group = f"{shape_name} {dtype} {passes} rank {fraction}={rank}"
    benchmark.pedantic(_step(mods[impl], x, backward), rounds=rounds, warmup_rounds=2)
    median = benchmark.stats.stats.median
    if impl == IMPLS[0]:
        _dense_median[key] = median
    dense_flops, low_flops = _flops(shape, rank)
    flops = dense_flops if impl == IMPLS[0] else low_flops
    reduction = dense_flops / low_flops
    speedup = _dense_median[key] / median
    benchmark.extra_info.update(
        rank=rank,
        flops=(3 if backward else 1) * flops,
        flop_reduction=round(reduction, 3),
        speedup_vs_dense=round(speedup, 3),
        efficiency=round(speedup / reduction, 3) if impl != IMPLS[0] else None,
        threads=torch.get_num_threads(),
    )
