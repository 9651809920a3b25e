"""The whole training step (forward, backward, optimizer, loss scaling) of the study harness, per precision setting,
so that kernel-level wins can be seen, or not, at model level:

    python -m pytest bench/test_train_step.py --benchmark-only

DenseNet-121 and ViT-Tiny (timm, random weights, one input channel, two classes) at batch 8, each in the five paper
settings (baseline, amp, 8bit, amp+8bit, half+8bit), resolved for the CPU ("auto" = bfloat16). The step is the
harness's own (``pyquant.experiment.loop.train_step``) on one fixed batch already in memory. Images are 128 px
by default rather than 224 px, to keep the suite to a few minutes on 2 cores; set ``PYQUANT_BENCH_IMAGE=224`` for the
models' native size. ``extra_info`` has samples/s and the step's memory breakdown (exact bytes; activations = the
tensors saved for backward).
"""

import os

import pytest
import torch

from pyquant.amp import GradScaler
from pyquant.experiment.measure import memory_breakdown, saved_activation_bytes
from pyquant.experiment.models import create_model
from pyquant.experiment.loop import train_step
from pyquant.experiment.settings import PAPER_SETTINGS, resolve

pytest.importorskip("timm")

BATCH = 8
IMAGE = int(os.environ.get("PYQUANT_BENCH_IMAGE", "128"))
MODELS = ("densenet121", "vit_tiny")


@pytest.mark.parametrize("setting", PAPER_SETTINGS)
@pytest.mark.parametrize("model_name", MODELS)
def test_train_step(benchmark, model_name, setting):
    recipe = resolve(setting, "cpu")
    torch.manual_seed(0)
    model = recipe.prepare_model(create_model(model_name, in_chans=1, num_classes=2, img_size=IMAGE))
    optimizer = recipe.make_optimizer(model.parameters(), 1e-4)
    scaler = GradScaler("cpu", enabled=recipe.loss_scaling)
    x = torch.randn(BATCH, 1, IMAGE, IMAGE).to(recipe.model_dtype)
    y = torch.arange(BATCH) % 2

    benchmark.group = f"train step {model_name} batch {BATCH} {IMAGE}px"
    loss = benchmark.pedantic(train_step, args=(model, x, y, optimizer, scaler, recipe), rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)
    breakdown = memory_breakdown(model, optimizer, saved_activation_bytes(model, x, recipe.autocast()))
    benchmark.extra_info.update(
        setting=setting,
        params=sum(p.numel() for p in model.parameters()),
        **{"samples/s": BATCH / benchmark.stats.stats.median},
        **{f"{key.removesuffix('_bytes')} MiB": breakdown[key] / 2**20 for key in
           ("parameters_bytes", "gradients_bytes", "optimizer_state_bytes", "activations_bytes")},
    )
