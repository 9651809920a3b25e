"""GradScaler.unscale_ over the gradients of timm's DenseNet-121 (float32, about 8M parameters in 364 tensors,
grads filled with randn): pyquant.amp.GradScaler (one `pyquant::unscale_`, the C++ kernel on the cpu backend)
against torch.amp.GradScaler("cpu") (torch's `_amp_foreach_non_finite_check_and_unscale_`), in the same process.

Each round unscales once with the default scale 2**16; before each round (untimed) the scaler is updated
and the gradients are restored, so every round sees the same values. `extra_info` has the bytes each
unscale must move (every gradient read and written once) and the achieved GB/s.
"""

import pytest
import torch

import pyquant.amp

timm = pytest.importorskip("timm")

SCALERS = {
    "pyquant.amp.GradScaler": lambda: pyquant.amp.GradScaler("cpu"),
    "torch.amp.GradScaler": lambda: torch.amp.GradScaler("cpu"),
}


@pytest.fixture(scope="module")
def densenet_grads():
    torch.manual_seed(0)
    model = timm.create_model("densenet121", pretrained=False)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    return params, grads


@pytest.mark.parametrize("name", list(SCALERS))
def test_unscale_densenet121(benchmark, name, densenet_grads):
    params, grads = densenet_grads
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = SCALERS[name]()
    scaler.scale(torch.ones(()))  # the scale tensor (2**16) lives on the CPU
    scaler.unscale_(opt)  # warm-up, and something for the first update() below

    def setup():
        scaler.update()  # back to the READY stage (no growth: growth_interval is 2000)
        for p, g in zip(params, grads):
            p.grad.copy_(g)

    benchmark.group = "GradScaler.unscale_ DenseNet-121 float32 grads"
    benchmark.pedantic(scaler.unscale_, args=(opt,), setup=setup, rounds=30, warmup_rounds=10)
    found = scaler._found_inf_per_device(opt) if isinstance(scaler, pyquant.amp.GradScaler) else None
    if found is not None:
        assert found[torch.device("cpu")].item() == 0.0
    moved = 2 * sum(p.grad.numel() * p.grad.element_size() for p in params)
    benchmark.extra_info.update(
        tensors=len(params),
        params=sum(p.numel() for p in params),
        bytes=moved,
        **{"GB/s": moved / benchmark.stats.stats.median / 1e9},
    )


@pytest.mark.parametrize("path", ["fused", "unscale_ then step"])
def test_scaler_step_adam8bit_densenet121(benchmark, path, densenet_grads):
    """scaler.step(pyquant.Adam8bit) over DenseNet-121: the unscale fused into the 8-bit step (a read-only
    inf/NaN check, then the step multiplies by 1/scale as it reads each gradient) against unscale_ (read and
    write every gradient) followed by the step. Same bits either way (tests/test_optim_amp.py)."""
    import pyquant

    params, grads = densenet_grads
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = pyquant.Adam8bit(params, lr=1e-6)
    scaler = pyquant.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    scaler.step(opt)  # warm-up: creates the states

    def setup():
        scaler.update()
        for p, g in zip(params, grads):
            p.grad.copy_(g)

    def step():
        if path != "fused":
            scaler.unscale_(opt)
        scaler.step(opt)

    benchmark.group = "GradScaler.step(Adam8bit) DenseNet-121 float32 grads"
    benchmark.pedantic(step, setup=setup, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(params=sum(p.numel() for p in params))
