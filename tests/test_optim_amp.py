"""pyquant's 8-bit optimizers with loss scaling: GradScaler's unscale fused into the step, and float32 master
weights for half-precision parameters."""

from __future__ import annotations

import io

import pytest
import torch

import pyquant
from pyquant.amp import GradScaler

from conftest import CPU_BACKENDS, bits

# (numel, dtype): 8-bit states with a partial last block, and a tensor small enough for float32 states.
SHAPES = [(5000, torch.float32), (300, torch.float32)]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n, _ in SHAPES]


def scaled_grads(step: int, dtype: torch.dtype, scale: float, overflow: bool) -> list[torch.Tensor]:
    """What backward() of a scaled loss leaves: true gradients times the scale, in the gradient's dtype;
    an overflowing step has an inf in one tensor."""
    gen = torch.Generator().manual_seed(100 + step)
    grads = []
    for i, (n, _) in enumerate(SHAPES):
        g = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 0, (n,), generator=gen).float()
        g = (g * scale).to(dtype)
        if overflow and i == 1:
            g[7] = float("inf")
        grads.append(g)
    return grads


def train(params, grad_dtype, fused: bool, steps: int = 6, scaler_cls=GradScaler, **opt_kwargs):
    """Steps with a GradScaler; `fused=False` calls scaler.unscale_ first, so the optimizer gets unscaled
    gradients (the unfused path); otherwise the scaler hands the scale to the optimizer's step."""
    opt = pyquant.Adam8bit(params, lr=1e-2, **opt_kwargs)
    scaler = scaler_cls("cpu", init_scale=2.0**12, growth_interval=2)
    seen_grads = []
    for step in range(1, steps + 1):
        scaler.scale(torch.ones(()))  # the loss's scaling, which a backward() would follow
        for p, g in zip(params, scaled_grads(step, grad_dtype, scaler.get_scale(), overflow=step == 3)):
            p.grad = g.clone()
        if not fused:
            scaler.unscale_(opt)
        scaler.step(opt)
        seen_grads.append([p.grad.clone() for p in params])
        scaler.update()
    return opt, scaler, seen_grads


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_unscale_gives_the_bits_of_unscale_then_step(backend, dtype):
    with pyquant.use_backend(backend):
        fused_params, unfused_params = make_params(dtype), make_params(dtype)
        opt_f, scaler_f, grads_f = train(fused_params, dtype, fused=True)
        opt_u, scaler_u, grads_u = train(unfused_params, dtype, fused=False)
    assert scaler_f.get_scale() == scaler_u.get_scale()
    assert scaler_f.state_dict() == scaler_u.state_dict()
    for pf, pu in zip(fused_params, unfused_params):
        assert torch.equal(bits(pf.detach()), bits(pu.detach()))
        sf, su = opt_f.state[pf], opt_u.state[pu]
        assert sf["step"] == su["step"] == 5  # the overflowing step was skipped whole in both
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in sf:
                assert torch.equal(bits(sf[key]), bits(su[key])), key
    # The fused path never wrote unscaled gradients back: they are still the scaled ones.
    scaled = scaled_grads(1, dtype, 2.0**12, overflow=False)[0]
    assert torch.equal(bits(grads_f[0][0]), bits(scaled))
    assert not torch.equal(grads_u[0][0], scaled)


def test_torch_grad_scaler_drives_the_fused_step_with_the_same_bits():
    torch_params, pyquant_params = make_params(torch.float32), make_params(torch.float32)
    opt_t, scaler_t, _ = train(torch_params, torch.float32, fused=True, scaler_cls=torch.amp.GradScaler)
    opt_p, scaler_p, _ = train(pyquant_params, torch.float32, fused=False)
    assert scaler_t.get_scale() == scaler_p.get_scale()
    for a, b in zip(torch_params, pyquant_params):
        assert torch.equal(bits(a.detach()), bits(b.detach()))
        assert torch.equal(opt_t.state[a]["state1"], opt_p.state[b]["state1"])


def test_found_inf_skips_the_step_and_leaves_everything_untouched():
    params = make_params(torch.float32)
    opt = pyquant.Adam8bit(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params], {k: v.clone() for k, v in opt.state[params[0]].items()
                                                     if isinstance(v, torch.Tensor)}
    opt.grad_scale, opt.found_inf = torch.tensor(2.0**10), torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before[0], params))
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in before[1].items())
    assert opt.state[params[0]]["step"] == 1


# ---- float32 master weights ----

def test_master_weights_are_the_float32_run_and_the_parameter_its_rounding():
    """A float16 parameter with master weights follows exactly the float32 parameter's trajectory (same
    gradient values); the float16 parameter is that trajectory rounded once."""
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(6000, generator=gen).half().float()
    half = torch.nn.Parameter(init.half())
    full = torch.nn.Parameter(init.clone())
    opt_half = pyquant.Adam8bit([half], lr=1e-3, master_weights=True)
    opt_full = pyquant.Adam8bit([full], lr=1e-3, master_weights=True)  # float32: no master copy
    for _ in range(5):
        g = torch.randn(6000, generator=gen).half()
        half.grad, full.grad = g, g.float()  # float16 values are exact in float32
        opt_half.step()
        opt_full.step()
    master = opt_half.state[half]["master"]
    assert master.dtype == torch.float32 and "master" not in opt_full.state[full]
    assert torch.equal(bits(master), bits(full.detach()))
    assert torch.equal(bits(half.detach()), bits(master.half()))
    assert opt_half.state_bytes() == opt_full.state_bytes() + 6000 * 4


def test_master_weights_keep_updates_below_float16_resolution():
    p_plain = torch.nn.Parameter(torch.full((4096,), 1.0, dtype=torch.float16))
    p_master = torch.nn.Parameter(p_plain.detach().clone())
    plain = pyquant.Adam8bit([p_plain], lr=1e-4)  # each step moves a weight by ~1e-4 < half an ulp of 1.0 (4.9e-4)
    master = pyquant.Adam8bit([p_master], lr=1e-4, master_weights=True)
    for _ in range(20):
        p_plain.grad = torch.ones_like(p_plain)
        p_master.grad = torch.ones_like(p_master)
        plain.step()
        master.step()
    assert torch.all(p_plain.detach() == 1.0)  # every update rounded away
    assert torch.all(p_master.detach() < 1.0)  # ~20 * 1e-4 accumulated in float32, then rounded


def test_master_weights_survive_a_checkpoint_and_training_continues_with_the_same_bits():
    def make():
        p = torch.nn.Parameter(torch.randn(5000, generator=torch.Generator().manual_seed(1)).bfloat16())
        return p, pyquant.Adam8bit([p], lr=1e-3, master_weights=True)

    def step(p, opt, seed):
        p.grad = torch.randn(5000, generator=torch.Generator().manual_seed(seed)).bfloat16()
        opt.step()

    a, opt_a = make()
    for s in range(3):
        step(a, opt_a, s)
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    b, opt_b = make()
    b.data.copy_(a.detach())
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(opt_b.state[b]["master"], opt_a.state[a]["master"])
    for s in range(3, 6):
        step(a, opt_a, s)
        step(b, opt_b, s)
    assert torch.equal(bits(a.detach()), bits(b.detach()))
    assert torch.equal(opt_a.state[a]["master"], opt_b.state[b]["master"])

    bad = opt_a.state_dict()
    bad["state"][0]["master"] = torch.zeros(17)
    with pytest.raises(ValueError, match="master must be a float32 tensor of shape"):
        opt_b.load_state_dict(bad)
    assert torch.equal(opt_b.state[b]["master"], opt_a.state[a]["master"])  # nothing changed
