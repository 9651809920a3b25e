"""Switching with torch's float32 optimizers (pyquant.optim.from_torch / to_torch, load_torch_state_dict,
torch_state_dict) for the one-state optimizers: SGD8bit <-> torch.optim.SGD, RMSprop8bit <-> RMSprop, Adagrad8bit <->
Adagrad. Hyperparameters survive a round trip exactly, states to within the 8-bit quantisation error (a bound computed
from the dynamic map), training continues; what the 8-bit classes cannot represent is refused. Adam's are in
tests/test_optim.py."""

from __future__ import annotations

import pytest
import torch

import pyquant
from pyquant import functional as F
from pyquant._contract import GRID_POINTS, OPTIMIZER_BLOCK
from pyquant.optim import from_torch, override, to_torch

# torch class, its options (two groups: the second with its own lr), the 8-bit class, the state name
CASES = {
    "SGD": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.01), pyquant.SGD8bit, "momentum_buffer"),
    "RMSprop": (torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=0.01), pyquant.RMSprop8bit,
                "square_avg"),
    "Adagrad": (torch.optim.Adagrad, dict(lr=1e-2, eps=1e-8, weight_decay=0.01), pyquant.Adagrad8bit, "sum"),
}
SHAPES = [(300,), (64, 80), (5000,)]  # float32 states; 8-bit with a partial last block; 8-bit


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def set_grads(params, step):
    g = torch.Generator().manual_seed(50 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.1


def trained_torch(name, steps=3):
    torch_class, options, _, _ = CASES[name]
    params = make_params()
    opt = torch_class([{"params": params[:2]}, {"params": params[2:], "lr": options["lr"] / 4}], **options)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]  # as an LR scheduler leaves it: a key torch's constructor does not know
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    return params, opt


def quantisation_error_bound(x: torch.Tensor) -> torch.Tensor:
    """Per element, the most that 8-bit block-wise quantisation with the signed dynamic map can move x: the largest
    distance from a point of the quantiser's 65536-point grid to the code it is given, plus half a grid step, plus
    the float32 rounding of x / absmax, times the block's absmax (docs/numerics.md, quantize_blockwise)."""
    code = F.create_dynamic_map(signed=True)
    centres = 2 * torch.arange(GRID_POINTS, dtype=torch.float32) / (GRID_POINTS - 1) - 1
    q, absmax = F.quantize_blockwise(centres, code, GRID_POINTS)
    assert absmax.item() == 1.0
    relative = (code[q.long()] - centres).abs().max().item() + 1 / (GRID_POINTS - 1) + 2.0**-22
    flat = x.detach().reshape(-1).double()
    blocks = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % OPTIMIZER_BLOCK)).reshape(-1, OPTIMIZER_BLOCK)
    return (blocks.amax(1).repeat_interleave(OPTIMIZER_BLOCK)[: flat.numel()] * relative).reshape(x.shape)


def assert_within_quantisation_error(actual, expected, what):
    bound = quantisation_error_bound(expected)
    error = (actual.double() - expected.double()).abs()
    assert (error <= bound).all(), f"{what}: error {error.max().item()} above the bound {bound.max().item()}"


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_keeps_hyperparameters_and_states(name):
    torch_class, options, cls, state_name = CASES[name]
    params, torch_opt = trained_torch(name)
    before = torch_opt.state_dict()
    ours = from_torch(torch_opt)
    assert type(ours) is cls
    assert [g["lr"] for g in ours.param_groups] == [options["lr"], options["lr"] / 4]
    assert all(g["initial_lr"] == g["lr"] for g in ours.param_groups)
    assert [ours.state[p]["state1"].dtype for p in params] == [torch.float32, torch.uint8, torch.uint8]
    # torch's SGD counts no steps: the converted buffer is past its first step; the others keep torch's count
    assert [ours.state[p]["step"] for p in params] == [1 if name == "SGD" else 3] * 3

    back = to_torch(ours)
    assert type(back) is torch_class
    after = back.state_dict()
    for g_before, g_after in zip(before["param_groups"], after["param_groups"]):
        assert g_after == g_before, "every hyperparameter, torch's flags and the scheduler's key"
    for i, p in enumerate(params):
        s_before, s_after = before["state"][i], after["state"][i]
        assert s_after.keys() == s_before.keys()
        if "step" in s_before:
            assert s_after["step"].item() == s_before["step"].item()
        if p.numel() < 4096:
            assert torch.equal(s_after[state_name], s_before[state_name]), "float32 states are kept exactly"
        else:
            assert not torch.equal(s_after[state_name], s_before[state_name]), "8-bit states are quantised"
            assert_within_quantisation_error(s_after[state_name], s_before[state_name], f"{state_name} of {i}")


@pytest.mark.parametrize("name", list(CASES))
def test_training_continues_through_pyquant_and_back(name):
    torch_class, options, cls, state_name = CASES[name]
    params, torch_opt = trained_torch(name)
    ours = from_torch(torch_opt)
    for step in (3, 4):
        set_grads(params, step)
        before = [p.detach().clone() for p in params]
        ours.step()
        assert all(not torch.equal(p, b) and torch.isfinite(p).all() for p, b in zip(params, before))
    back = to_torch(ours)
    if name != "SGD":
        assert back.state[params[2]]["step"].item() == 5
    set_grads(params, 5)
    before = [p.detach().clone() for p in params]
    back.step()
    assert all(not torch.equal(p, b) and torch.isfinite(p).all() for p, b in zip(params, before))


def test_sgd_step_after_conversion_differs_from_torch_by_the_buffer_quantisation_only():
    """torch's SGD and SGD8bit do the same float32 operations (g = fma(wd, p, g); s = m * buf + g;
    p = fma(-lr, s, p)) on a buffer that conversion quantised: the parameters differ by at most lr * m * (the
    buffer's quantisation bound), plus the rounding of s and of p (a few float32 ulp)."""
    params, torch_opt = trained_torch("SGD")
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.SGD([{"params": ref_params[:2]}, {"params": ref_params[2:]}], lr=1.0, momentum=0.9)
    ref.load_state_dict(torch_opt.state_dict())  # its groups too: lr, momentum and weight decay of each
    ours = from_torch(torch_opt)
    set_grads(params, 3)
    set_grads(ref_params, 3)
    eps = torch.finfo(torch.float32).eps
    bounds = {}
    for i, group in ((1, ref.param_groups[0]), (2, ref.param_groups[1])):
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        buf, p = torch_opt.state[params[i]]["momentum_buffer"].double(), params[i].detach().double()
        s = m * buf + params[i].grad.double() + wd * p
        bounds[i] = lr * (m * quantisation_error_bound(buf) + 4 * eps * s.abs()) + 2 * eps * p.abs()
    ours.step()
    ref.step()
    for i, bound in bounds.items():
        error = (params[i].detach().double() - ref_params[i].detach().double()).abs()
        assert (error <= bound).all(), f"parameter {i}: {error.max().item()} above {bound.max().item()}"
        assert error.max() > 0, "the 8-bit buffer should change something"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5), "dampening"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), "momentum must be > 0"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, maximize=True), "maximize"),
        (lambda ps: torch.optim.RMSprop(ps, centered=True), "centered"),
        (lambda ps: torch.optim.RMSprop(ps, momentum=0.9), "momentum"),
        (lambda ps: torch.optim.Adagrad(ps, lr_decay=0.1), "lr_decay"),
        (lambda ps: torch.optim.Adagrad(ps, initial_accumulator_value=0.1), "initial_accumulator_value"),
    ],
)
def test_what_the_8bit_class_cannot_represent_is_refused(make, match):
    params = make_params()
    torch_opt = make(params)
    set_grads(params, 0)
    torch_opt.step()
    with pytest.raises(ValueError, match=match):
        from_torch(torch_opt)


def test_a_later_group_option_is_refused_on_load():
    """A torch group changed after the 8-bit optimizer was made: load_torch_state_dict checks every group."""
    params = make_params()
    torch_opt = torch.optim.RMSprop(params)
    ours = pyquant.RMSprop8bit(params)
    torch_opt.param_groups[0]["centered"] = True
    with pytest.raises(ValueError, match="centered"):
        ours.load_torch_state_dict(torch_opt.state_dict())


def test_lion_and_unknown_optimizers_have_no_conversion():
    params = make_params()
    lion = pyquant.Lion8bit(params)
    with pytest.raises(TypeError, match="Lion8bit has no float32 torch optimizer"):
        to_torch(lion)
    with pytest.raises(TypeError, match="Lion8bit has no float32 torch optimizer"):
        lion.load_torch_state_dict(torch.optim.SGD(params, lr=0.1).state_dict())
    with pytest.raises(TypeError, match="from_torch converts torch.optim .*SGD.*; got Adamax"):
        from_torch(torch.optim.Adamax(params))


def test_a_state_of_another_model_is_refused():
    params, torch_opt = trained_torch("Adagrad")
    other = [torch.nn.Parameter(torch.randn(p.numel() + 1)) for p in params]
    ours = pyquant.Adagrad8bit([{"params": other[:2]}, {"params": other[2:]}])
    with pytest.raises(ValueError, match=r"sum has shape \(300,\) but the parameter has shape \(301,\)"):
        ours.load_torch_state_dict(torch_opt.state_dict())


def test_overrides_decide_the_precision_of_converted_states():
    params, torch_opt = trained_torch("SGD")
    override(params[2], optim_bits=32)
    override(params[0], min_8bit_size=256)
    ours = from_torch(torch_opt)
    assert [ours.state[p]["state1"].dtype for p in params] == [torch.uint8, torch.uint8, torch.float32]
    assert torch.equal(ours.state[params[2]]["state1"], torch_opt.state[params[2]]["momentum_buffer"])
