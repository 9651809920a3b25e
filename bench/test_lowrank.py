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

import pytest
import torch

import lowrank_cases as cases
from lowrank_cases import DTYPES, IMPLS, RANK_FRACTIONS, SHAPES
from timing import median_time

_dense_median: dict[tuple, float] = {}


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
    rank = cases.rank(shape, fraction)
    n, cin, cout, size, *_ = shape
    mods = cases.modules(shape, rank, DTYPES[dtype])
    x = torch.randn(n, cin, size, size, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    if backward:
        x.requires_grad_()
    rounds = cases.rounds(shape, backward)
    key = (shape_name, passes, dtype)
    if impl != IMPLS[0] and key not in _dense_median:  # the dense reference, when its test did not run first
        _dense_median[key] = median_time(cases.step(mods[IMPLS[0]], x, backward), rounds)
    benchmark.group = f"{shape_name} {dtype} {passes} rank {fraction}={rank}"
    benchmark.pedantic(cases.step(mods[impl], x, backward), rounds=rounds, warmup_rounds=2)
    median = benchmark.stats.stats.median
    if impl == IMPLS[0]:
        _dense_median[key] = median
    dense_flops, low_flops = cases.flops(shape, rank)
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
