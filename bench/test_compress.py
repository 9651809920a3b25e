"""pyquant.compress.lowrank on DenseNet-121: parameters, FLOPs and inference time before and after.

    pytest bench/test_compress.py --benchmark-only

The model is the study's DenseNet-121 (timm, one input channel, two classes, random init: nothing is
downloaded), in eval mode, float32; the input is a batch of 8 images of 256 x 256 (the study's RSNA size).
One group, one entry per variant: the dense model, and `compress.lowrank` with `energy=0.9` (the issue's
setting), `rank_ratio=0.25` and `param_budget=0.5`. `extra_info` of each entry: parameters, FLOPs of one
forward of one image (from the compression report, counted over the Conv2d and Linear layers only),
layers factorised and kept dense, the median over factorised layers of rank / largest possible rank, and
the speed-up against the dense model measured in the same session.

Random-init weights have nearly equal singular values (i.i.d. entries: the Marchenko-Pastur law, flat when
the matrix is far from square, as most of DenseNet's are), so keeping 90% of the spectral energy keeps
about 90% of the rank and the energy rule barely compresses such a model; a trained model's spectrum
decays and the same rule cuts much more. `rank_ratio` and `param_budget` fix the size instead, whatever the
spectrum. On random weights no variant keeps the model's function (the outputs change by about their own
norm, energy=0.9 included: the per-layer errors compound over 120 layers), so this measures size and
speed only; accuracy before and after compression and fine-tuning is in docs/compress.md's worked example.
docs/compress.md records a run.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from pyquant import compress
from pyquant.experiment.models import create_model
from timing import median_time

pytest.importorskip("timm")

BATCH, SIZE = 8, 256
VARIANTS = {
    "dense": None,
    "lowrank(energy=0.9)": {"energy": 0.9},
    "lowrank(rank_ratio=0.25)": {"rank_ratio": 0.25},
    "lowrank(param_budget=0.5)": {"param_budget": 0.5},
}
_dense_median: list[float] = []


@pytest.fixture(scope="module")
def densenet():
    torch.manual_seed(0)
    model = create_model("densenet121", in_chans=1, num_classes=2).eval()
    x = torch.randn(BATCH, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return model, x, {}


def _compressed(densenet, variant):
    model, x, cache = densenet
    if variant not in cache:
        cache[variant] = compress.lowrank(model, example_input=x[:1], **VARIANTS[variant])
    return cache[variant]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_densenet121_lowrank_inference(benchmark, densenet, variant):
    dense, x, _ = densenet

    def forward(model):
        def run():
            with torch.no_grad():
                model(x)
        return run

    if variant == "dense":
        # rank larger than any layer's: every layer is listed as skipped, the report only counts FLOPs
        model, report = dense, compress.lowrank(dense, rank=10**9, example_input=x[:1])[1]
    else:
        model, report = _compressed(densenet, variant)
    if variant != "dense" and not _dense_median:  # the dense reference, when its entry did not run first
        _dense_median.append(median_time(forward(dense), 3))
    benchmark.group = f"DenseNet-121 float32 inference, batch {BATCH}, {SIZE}x{SIZE}"
    benchmark.pedantic(forward(model), rounds=5, warmup_rounds=1)
    median = benchmark.stats.stats.median
    if variant == "dense":
        _dense_median[:] = [median]
    ranks = [r.rank / r.max_rank for r in report.changed]
    benchmark.extra_info.update(
        params=sum(p.numel() for p in model.parameters()),
        flops_per_image=sum(r.flops_after for r in report.rows if r.flops_after is not None),
        layers_factorised=len(report.changed),
        layers_dense=len(report.skipped),
        median_rank_fraction=round(statistics.median(ranks), 3) if ranks else None,
        speedup_vs_dense=round(_dense_median[0] / median, 3),
        threads=torch.get_num_threads(),
    )
