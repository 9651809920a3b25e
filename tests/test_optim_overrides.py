"""Per-parameter overrides (pyquant.optim.override, and the same keys in a parameter group) against bitsandbytes
0.50.2's GlobalOptimManager, bit for bit on CPU, for every 8-bit class; state_dict round trips; refused keys and
values; where the override lives (the tensor, not a global table); pyquant.nn.StableEmbedding against bitsandbytes'."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch

import pyquant
import pyquant.nn
from pyquant.optim import override, overrides_of
from pyquant.optim.overrides import ATTRIBUTE

from conftest import assert_same_bits

bnb = pytest.importorskip("bitsandbytes")

KWARGS = {
    "Adam8bit": dict(lr=1e-3, weight_decay=0.01),
    "AdamW8bit": dict(lr=1e-3),
    "Lion8bit": dict(lr=1e-3, weight_decay=0.1),
    "SGD8bit": dict(lr=1e-2, momentum=0.9),
    "RMSprop8bit": dict(lr=1e-3),
    "Adagrad8bit": dict(lr=1e-2),
}
# What each tensor gets: 0 float32 states (8-bit without the override); 1 other hyperparameters; 2 8-bit states
# below the default min_8bit_size; 3 nothing (and a parameter with no override beside them).
SHAPES = [(5000,), (64, 80), (300,), (4100,)]
HYPER = dict(lr=3e-3, weight_decay=0.02)
OVERRIDES = [dict(optim_bits=32), HYPER, dict(min_8bit_size=256), None]
STATE_KEYS = ("state1", "state2", "absmax1", "absmax2", "step")


@pytest.fixture
def manager():
    """bitsandbytes' global manager, emptied before and after (it keeps every override it was given)."""
    mng = bnb.optim.GlobalOptimManager.get_instance()
    mng.initialize()
    yield mng
    mng.initialize()


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)


def states(opt, params):
    return [{k: v for k, v in opt.state[p].items() if k in STATE_KEYS} for p in params]


def set_ours(params):
    for p, options in zip(params, OVERRIDES):
        if options:
            override(p, **options)


def set_theirs(mng, params):
    for p, options in zip(params, OVERRIDES):
        if options:
            mng.override_config(p, key_value_dict=dict(options))


def run_both(ours, theirs, ours_p, theirs_p, steps):
    for step in steps:
        if step == 3:  # a scheduler's change of the groups' lr: an overridden lr stays (bitsandbytes' get_config)
            for opt in (ours, theirs):
                for group in opt.param_groups:
                    group["lr"] *= 0.5
        set_grads(ours_p, step)
        set_grads(theirs_p, step)
        ours.step()
        theirs.step()
        assert_same_bits(list(ours_p), list(theirs_p), f"params, step {step}")
        assert_same_bits(states(ours, ours_p), states(theirs, theirs_p), f"states, step {step}")


@pytest.mark.parametrize("when", ["before", "after"], ids=["override-then-optimizer", "optimizer-then-override"])
@pytest.mark.parametrize("name", list(KWARGS))
def test_overrides_give_bitsandbytes_bits(manager, name, when):
    """bitsandbytes' documented order (register, create, override) against pyquant's override set before or after
    the optimizer is created: the same bits after every step, the precision each override asks for."""
    ours_p, theirs_p = make_params(), make_params()
    if when == "before":
        set_ours(ours_p)
    ours = getattr(pyquant, name)(ours_p, **KWARGS[name])
    if when == "after":
        set_ours(ours_p)
    manager.register_parameters(theirs_p)
    theirs = getattr(bnb.optim, name)(theirs_p, **KWARGS[name])
    set_theirs(manager, theirs_p)
    run_both(ours, theirs, ours_p, theirs_p, range(1, 5))
    assert [ours.state[p]["state1"].dtype for p in ours_p] == [torch.float32, torch.uint8, torch.uint8, torch.uint8]
    # and without the overrides, tensors 0 and 2 would have had the other precision
    plain = getattr(pyquant, name)(make_params(), **KWARGS[name])
    assert [plain._uses_8bit(p) for p in plain.param_groups[0]["params"]] == [True, True, False, True]


@pytest.mark.parametrize("name", list(KWARGS))
def test_group_keys_give_the_bits_of_overrides(manager, name):
    """optim_bits and min_8bit_size in parameter groups: bitsandbytes' bits with the same options as overrides."""
    ours_p, theirs_p = make_params(), make_params()
    groups = lambda ps: [{"params": [ps[0]], "optim_bits": 32}, {"params": [ps[1], ps[2]], "min_8bit_size": 256},
                         {"params": [ps[3]], "optim_bits": 8}]
    ours = getattr(pyquant, name)(groups(ours_p), **KWARGS[name])
    theirs = getattr(bnb.optim, name)(theirs_p, **KWARGS[name])
    manager.override_config(theirs_p[0], "optim_bits", 32)
    manager.override_config(theirs_p[1:3], "min_8bit_size", 256)
    run_both(ours, theirs, ours_p, theirs_p, range(1, 4))
    assert [ours.state[p]["state1"].dtype for p in ours_p] == [torch.float32, torch.uint8, torch.uint8, torch.uint8]


def test_an_override_wins_over_its_group_and_optim_bits_8_keeps_the_size_rule(manager):
    ours_p, theirs_p = make_params(), make_params()
    override(ours_p[0], min_8bit_size=0)  # the group says 32 bits: the override's size rule does not undo that
    override(ours_p[2], optim_bits=8)  # below min_8bit_size: float32 states all the same (bitsandbytes' rule)
    override(ours_p[3], min_8bit_size=10_000)  # the group says 100: the override wins
    ours = pyquant.Adam8bit([{"params": ours_p[:2], "optim_bits": 32}, {"params": [ours_p[2]]},
                             {"params": [ours_p[3]], "min_8bit_size": 100}])
    theirs = bnb.optim.Adam8bit(theirs_p)
    manager.override_config(theirs_p[:2], "optim_bits", 32)
    manager.override_config(theirs_p[2], "optim_bits", 8)
    manager.override_config(theirs_p[3], "min_8bit_size", 10_000)
    run_both(ours, theirs, ours_p, theirs_p, range(1, 3))
    assert [ours.state[p]["state1"].dtype for p in ours_p] == [torch.float32] * 4


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(KWARGS))
def test_state_dict_round_trips_with_overrides(manager, name):
    """Save after two steps, load into a new optimizer over copies of the parameters (with the same overrides, as
    the model sets them) and into bitsandbytes: both continue with the bits of the optimizer never interrupted."""
    kwargs = KWARGS[name]
    ref_p = make_params()
    set_ours(ref_p)
    ref = getattr(pyquant, name)([{"params": ref_p[:2], "optim_bits": 32}, {"params": ref_p[2:]}], **kwargs)
    for step in (1, 2):
        set_grads(ref_p, step)
        ref.step()
    sd = roundtrip(ref.state_dict())
    assert sd["param_groups"][0]["optim_bits"] == 32

    ours_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
    set_ours(ours_p)
    ours = getattr(pyquant, name)([{"params": ours_p[:2]}, {"params": ours_p[2:]}], **kwargs)
    ours.load_state_dict(sd)
    assert ours.param_groups[0]["optim_bits"] == 32
    theirs_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
    theirs = getattr(bnb.optim, name)([{"params": theirs_p[:2]}, {"params": theirs_p[2:]}], **kwargs)
    set_theirs(manager, theirs_p)
    theirs.load_state_dict(sd)
    for step in (3, 4):
        for ps in (ref_p, ours_p, theirs_p):
            set_grads(ps, step)
        for opt in (ref, ours, theirs):
            opt.step()
    assert_same_bits(list(ours_p), list(ref_p), "pyquant reloaded vs uninterrupted")
    assert_same_bits(states(ours, ours_p), states(ref, ref_p), "states")
    assert_same_bits(list(theirs_p), list(ref_p), "bitsandbytes reloaded vs uninterrupted")
    assert [ours.state[p]["state1"].dtype for p in ours_p] == [torch.float32, torch.float32, torch.uint8, torch.uint8]


def test_a_group_keeps_its_precision_when_a_bitsandbytes_state_dict_loads():
    """bitsandbytes' groups never hold optim_bits: loading its state dict keeps our group's."""
    p, q = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    theirs = bnb.optim.Adam8bit([q])
    ours = pyquant.Adam8bit([{"params": [p], "optim_bits": 32}])
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["optim_bits"] == 32
    p.grad = torch.randn(5000)
    ours.step()
    assert ours.state[p]["state1"].dtype == torch.float32


# ---- refused keys and values ----
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(lrr=0.1), r"unknown key 'lrr'"),
        (dict(optim_bits=16), r"optim_bits must be 8 or 32, got 16"),
        (dict(optim_bits=True), r"optim_bits must be 8 or 32"),
        (dict(min_8bit_size=-1), r"min_8bit_size must be an int >= 0"),
        (dict(min_8bit_size=2.5), r"min_8bit_size must be an int >= 0"),
        ({}, r"no option given"),
    ],
)
def test_override_refuses_unknown_keys_and_bad_values(options, match):
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match=match):
        override(p, **options)
    assert overrides_of(p) == {}


def test_override_refuses_what_is_not_a_tensor():
    with pytest.raises(TypeError, match="tensor"):
        override([torch.randn(3), "weight"], lr=0.1)


@pytest.mark.parametrize(
    "name, key, value",
    [("Lion8bit", "eps", 1e-6), ("SGD8bit", "eps", 1e-6), ("Adagrad8bit", "betas", (0.9, 0.99))],
)
def test_a_key_the_optimizer_does_not_have_is_refused(name, key, value):
    """At construction when the override came first, at the step when it came after; the message names both."""
    p = torch.nn.Parameter(torch.randn(5000))
    override(p, **{key: value})
    with pytest.raises(ValueError, match=rf"{name}: parameter 0 of the added group has an override of '{key}'"):
        getattr(pyquant, name)([p], **KWARGS[name])
    q = torch.nn.Parameter(torch.randn(5000))
    opt = getattr(pyquant, name)([q], **KWARGS[name])
    override(q, **{key: value})
    q.grad = torch.randn(5000)
    with pytest.raises(ValueError, match=rf"{name}: parameter 0 has an override of '{key}', an option {name} does"):
        opt.step()
    assert len(opt.state[q]) == 0  # nothing stepped


@pytest.mark.parametrize(
    "options, match",
    [(dict(lr=-1.0), "learning rate"), (dict(betas=(0.9, 1.5)), "betas"),
     (dict(weight_decay=float("nan")), "weight_decay")],
)
def test_an_overridden_value_gets_the_constructor_checks(options, match):
    p = torch.nn.Parameter(torch.randn(5000))
    opt = pyquant.Adam8bit([p])
    override(p, **options)
    p.grad = torch.randn(5000)
    with pytest.raises(ValueError, match=rf"override of parameter 0: Adam8bit: invalid {match}"):
        opt.step()


def test_bad_group_precision_is_refused():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="optim_bits must be 8 or 32, got 4"):
        pyquant.SGD8bit([{"params": [p], "optim_bits": 4}], lr=0.1, momentum=0.9)
    opt = pyquant.SGD8bit([p], lr=0.1, momentum=0.9)
    sd = opt.state_dict()
    sd["param_groups"][0]["min_8bit_size"] = -5
    with pytest.raises(ValueError, match="loaded parameter group 0: SGD8bit: min_8bit_size must be an int >= 0"):
        opt.load_state_dict(sd)


def test_optim_bits_32_after_8bit_states_exist_is_an_error():
    """bitsandbytes ignores it (the states exist); pyquant says so instead of silently keeping 8 bits."""
    p = torch.nn.Parameter(torch.randn(5000))
    opt = pyquant.Lion8bit([p])
    p.grad = torch.randn(5000)
    opt.step()
    override(p, optim_bits=32)
    with pytest.raises(ValueError, match="parameter 0 has optim_bits=32 but already has 8-bit states"):
        opt.step()


# ---- where the override lives ----
def test_overriding_a_parameter_outside_the_optimizer_changes_nothing():
    ours_p, plain_p = make_params(), make_params()
    stranger = torch.nn.Parameter(torch.randn(5000))
    override(stranger, optim_bits=32, lr=10.0, betas=(0.0, 0.0))
    ours, plain = pyquant.Adam8bit(ours_p), pyquant.Adam8bit(plain_p)
    for step in (1, 2):
        set_grads(ours_p, step)
        set_grads(plain_p, step)
        ours.step()
        plain.step()
    assert_same_bits(list(ours_p), list(plain_p), "params")
    assert_same_bits(states(ours, ours_p), states(plain, plain_p), "states")


def test_later_overrides_add_keys_and_each_tensor_of_an_iterable_gets_them():
    model = torch.nn.Linear(4, 3)
    override(model.parameters(), lr=0.5)
    override(model.weight, optim_bits=32, lr=0.25)
    assert overrides_of(model.weight) == dict(lr=0.25, optim_bits=32)
    assert overrides_of(model.bias) == dict(lr=0.5)


def test_the_override_does_not_keep_its_tensor_alive_nor_reach_another_model():
    """It is an attribute of the tensor: freed with it, and a tensor made later (even at the same address, as
    bitsandbytes' id-keyed table would see it) has none; another model's tensors never see it."""
    a, b = torch.nn.Linear(100, 100), torch.nn.Linear(100, 100)
    override(a.weight, optim_bits=32)
    assert overrides_of(b.weight) == {}
    ref = weakref.ref(a.weight)
    del a
    gc.collect()
    assert ref() is None
    fresh = [torch.nn.Parameter(torch.zeros(100, 100)) for _ in range(50)]
    assert not any(hasattr(p, ATTRIBUTE) for p in fresh), "a later tensor inherited a freed tensor's override"


def test_the_override_travels_with_the_tensor():
    """model.to() keeps the Parameter and so the override; pickling and torch.save copy it."""
    model = torch.nn.Linear(100, 100)
    override(model.weight, optim_bits=32)
    model.to(torch.float32)
    assert overrides_of(model.weight) == dict(optim_bits=32)
    assert overrides_of(pickle.loads(pickle.dumps(model)).weight) == dict(optim_bits=32)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert overrides_of(torch.load(buf, weights_only=False).weight) == dict(optim_bits=32)


# ---- pyquant.nn.StableEmbedding ----
def make_embeddings(module, seed, **kwargs):
    torch.manual_seed(seed)
    return module.StableEmbedding(500, 16, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, dict(padding_idx=3), dict(max_norm=1.0)], ids=["plain", "padding", "max_norm"])
def test_stable_embedding_equals_bitsandbytes(manager, kwargs):
    ours = make_embeddings(pyquant.nn, 7, **kwargs)
    after_ours = torch.get_rng_state()
    theirs = make_embeddings(bnb.nn, 7, **kwargs)
    assert torch.equal(after_ours, torch.get_rng_state()), "the same random numbers drawn"
    assert_same_bits(dict(ours.state_dict()), dict(theirs.state_dict()), "initial weights")
    ids = torch.randint(0, 500, (8, 12), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = 3
    out_ours, out_theirs = ours(ids), theirs(ids)
    assert out_ours.dtype == torch.float32
    assert_same_bits(out_ours, out_theirs, "outputs")
    assert_same_bits(dict(ours.state_dict()), dict(theirs.state_dict()), "weights after the forward (max_norm)")
    if "padding_idx" in kwargs:
        assert not ours.weight[3].any()


def test_stable_embedding_states_are_float32_and_train_as_bitsandbytes(manager):
    """8000 weights (8-bit states without the override): float32 states in both libraries, same bits each step."""
    ids = torch.randint(0, 500, (16, 10), generator=torch.Generator().manual_seed(2))
    runs = []
    for lib in (pyquant, bnb):
        torch.manual_seed(3)
        model = torch.nn.Sequential(lib.nn.StableEmbedding(500, 16), torch.nn.Linear(16, 300))  # 4800 weights
        opt = lib.optim.Adam8bit(model.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            model(ids).square().mean().backward()
            opt.step()
        runs.append((model, opt))
    (ours, ours_opt), (theirs, theirs_opt) = runs
    assert_same_bits(list(ours.parameters()), list(theirs.parameters()), "parameters")
    assert_same_bits(states(ours_opt, list(ours.parameters())), states(theirs_opt, list(theirs.parameters())), "states")
    assert [ours_opt.state[p]["state1"].dtype for p in ours.parameters()] == [
        torch.float32, torch.float32, torch.float32, torch.uint8, torch.float32]  # emb, norm w/b, linear w/b


def test_stable_embedding_keeps_its_override_on_a_new_weight():
    """torch puts a new Parameter object in place on a deepcopy, a meta-device materialisation, an assignment."""
    emb = pyquant.nn.StableEmbedding(500, 16)
    copied = copy.deepcopy(emb)
    assert copied.weight is not emb.weight and overrides_of(copied.weight) == dict(optim_bits=32)
    meta = pyquant.nn.StableEmbedding(500, 16, device="meta").to_empty(device="cpu")
    assert overrides_of(meta.weight) == dict(optim_bits=32)
    emb.weight = torch.nn.Parameter(torch.randn(500, 16))
    assert overrides_of(emb.weight) == dict(optim_bits=32)
    loaded = pyquant.nn.StableEmbedding(500, 16)
    loaded.load_state_dict(copied.state_dict(), assign=True)
    assert overrides_of(loaded.weight) == dict(optim_bits=32)


def test_stable_embedding_device_and_dtype_work():
    """bitsandbytes 0.50.2 passes them into nn.Embedding's wrong arguments; pyquant's mean what torch's do."""
    emb = pyquant.nn.StableEmbedding(10, 4, device="cpu", dtype=torch.bfloat16)
    assert emb.weight.requires_grad and emb.weight.dtype == torch.bfloat16
    assert emb.norm.weight.dtype == torch.get_default_dtype()  # as bitsandbytes: the LayerNorm in the default dtype
    out = emb(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.bfloat16
    expected = emb.norm(emb.weight[[1, 2, 3]].float()).to(torch.bfloat16)
    assert_same_bits(out[0], expected, "normalised in float32, rounded once")
