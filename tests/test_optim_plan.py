"""The 8-bit optimizers' per-group plan (Optimizer8bit._plan, backends/cpu/optimizer.py PreparedStep): steps run
through it give the bits of the general path, and anything that changes under it sends the step back to the
general path."""

import copy

import pytest
import torch

import pyquant
from pyquant.backends import capi

pytestmark = pytest.mark.skipif(capi.cpu_library() is None, reason="the plan runs the C++ CPU library")

CLASSES = {
    "Adam8bit": lambda ps: pyquant.Adam8bit(ps, lr=1e-2, weight_decay=0.1),
    "Lion8bit": lambda ps: pyquant.Lion8bit(ps, lr=1e-3, weight_decay=0.1),
    "SGD8bit": lambda ps: pyquant.SGD8bit(ps, lr=1e-2, momentum=0.9),
    "RMSprop8bit": lambda ps: pyquant.RMSprop8bit(ps, lr=1e-3),
    "Adagrad8bit": lambda ps: pyquant.Adagrad8bit(ps, lr=1e-2),
    "AdEMAMix8bit": lambda ps: pyquant.AdEMAMix8bit(ps, lr=1e-2, t_alpha=5, t_beta3=5),
    "AdEMAMix32bit": lambda ps: pyquant.AdEMAMix32bit(ps, lr=1e-2),
    # a norm pass and the step over the same descriptors, with the ratios between them
    "LAMB8bit": lambda ps: pyquant.LAMB8bit(ps, lr=1e-2, weight_decay=0.1),
    "LAMB32bit": lambda ps: pyquant.LAMB32bit(ps, lr=1e-2, weight_decay=0.1, trust_clip=True),
    "LARS8bit": lambda ps: pyquant.LARS8bit(ps, lr=1e-2, momentum=0.9, weight_decay=0.01),
    "LARS_no_ratio": lambda ps: pyquant.LARS8bit(ps, lr=1e-2, momentum=0.9, max_unorm=0.0),
}


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 80), (300,), (4096 + 17,), (7,)]  # 8-bit and float32 states, partial last blocks
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(5000, generator=g).bfloat16()))
    return params


def set_grads(params, step, skip=()):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i in skip else (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)


def plan_calls(optimizer):
    return getattr(optimizer, "planned_runs", 0)


def counting(optimizer):
    """Count the steps that ran through a plan (wraps each new plan's PreparedStep.run)."""
    original = optimizer._plan
    optimizer.planned_runs = 0

    def plan(group, calls):
        original(group, calls)
        built = optimizer._plans.get(id(group))
        if built is not None:
            run = built.prepared.run

            def counted(nonfinite):
                optimizer.planned_runs += 1
                return run(nonfinite)

            built.prepared.run = counted

    optimizer._plan = plan
    return optimizer


def assert_same(a, b, pa, pb):
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        sa, sb = a.state[p], b.state[q]
        assert sa["step"] == sb["step"]
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[key]), key


def general_step(optimizer):
    optimizer._plans.clear()
    optimizer.step()


@pytest.mark.parametrize("name", CLASSES)
def test_planned_steps_give_the_general_paths_bits(name):
    pa, pb = make_params(), make_params()
    a, b = counting(CLASSES[name](pa)), CLASSES[name](pb)
    for step in range(5):
        set_grads(pa, step), set_grads(pb, step)
        a.step()
        general_step(b)
        assert_same(a, b, pa, pb)
    assert plan_calls(a) == 4  # every step after the first ran through the plan


def test_tensors_at_different_steps_get_their_own_constants():
    pa, pb = make_params(), make_params()
    a, b = counting(pyquant.Adam8bit(pa, lr=1e-2)), pyquant.Adam8bit(pb, lr=1e-2)
    for step in range(6):
        skip = (1, 2) if step in (2, 3) else ()  # two tensors miss two steps: their step counts fall behind
        set_grads(pa, step, skip), set_grads(pb, step, skip)
        a.step()
        general_step(b)
        assert_same(a, b, pa, pb)
    assert a.state[pa[1]]["step"] == 4 and a.state[pa[0]]["step"] == 6
    # steps 1, 3 and 5 ran through a plan (rebuilt at steps 2 and 4, where the gradients present changed); step 5's
    # with two constants rows
    assert plan_calls(a) == 3


def test_what_changes_under_a_plan_sends_the_step_to_the_general_path():
    pa, pb = make_params(), make_params()
    a, b = pyquant.Adam8bit(pa, lr=1e-2), pyquant.Adam8bit(pb, lr=1e-2)
    for step in range(2):
        set_grads(pa, step), set_grads(pb, step)
        a.step(), general_step(b)
    assert a._plans
    # A replaced state tensor is the one updated.
    for opt, p in ((a, pa[0]), (b, pb[0])):
        opt.state[p]["state1"] = opt.state[p]["state1"].clone()
    # A parameter's storage replaced: the new storage is updated; another's dtype changed: it is stepped as bfloat16.
    for p in (pa[2], pb[2]):
        p.data = p.data.clone()
    for p in (pa[1], pb[1]):
        p.data = p.data.bfloat16()
    # A non-contiguous gradient is stepped from a contiguous copy.
    set_grads(pa, 2), set_grads(pb, 2)
    for p in (pa[0], pb[0]):
        p.grad = p.grad.t().contiguous().t()
        assert not p.grad.is_contiguous()
    a.step(), general_step(b)
    assert_same(a, b, pa, pb)
    # A state dict loaded: the loaded states are the ones updated.
    a.load_state_dict(copy.deepcopy(b.state_dict()))  # b's state_dict() holds b's own state tensors
    set_grads(pa, 3), set_grads(pb, 3)
    a.step(), general_step(b)
    assert_same(a, b, pa, pb)


def test_an_override_set_after_the_plan_applies_at_the_next_step():
    params = make_params()
    optimizer = pyquant.Adam8bit(params, lr=1e-2)
    for step in range(2):
        set_grads(params, step)
        optimizer.step()
    assert optimizer._plans
    pyquant.optim.override(params[0], lr=0.0)
    before = params[0].detach().clone()
    set_grads(params, 2)
    optimizer.step()
    assert torch.equal(params[0], before)


def test_planned_steps_bump_the_version_counters():
    params = make_params()
    optimizer = pyquant.Adam8bit(params)
    set_grads(params, 0)
    optimizer.step()
    versions = [p._version for p in params]
    state = optimizer.state[params[0]]["state1"]
    state_version = state._version
    optimizer.step()
    assert all(p._version > v for p, v in zip(params, versions))
    assert state._version > state_version


def test_a_planned_step_under_another_backend_runs_that_backend():
    pa, pb = make_params(), make_params()
    a, b = pyquant.Adam8bit(pa), pyquant.Adam8bit(pb)
    for step in range(3):
        set_grads(pa, step), set_grads(pb, step)
        with pyquant.use_backend("reference"):
            a.step()
        general_step(b)
        assert_same(a, b, pa, pb)  # the reference backend has the same bits
    assert not a._plans  # no plan is built for another backend
