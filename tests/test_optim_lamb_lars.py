"""LAMB8bit and LARS8bit (pyquant/optim/trust_ratio.py): the step against a float64 computation of the published
algorithm from the same (dequantised) states, the trust ratio's max_unorm and trust_clip and its zero norms, the norm
passes' bits on every backend, instruction set and thread count, checkpoints with bitsandbytes' LAMB8bit/LARS8bit
in both directions (through torch.load(weights_only=True)), the shared machinery (non-finite policy, master weights,
GradScaler's fused unscale, overrides), the generic and 32-bit classes, and what is refused."""

from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys

import pytest
import torch

import pyquant
from pyquant import _contract, use_backend
from pyquant import functional as F

from conftest import CPU_BACKENDS, TRITON_DEVICE, TRITON_PEERS, assert_same_bits, needs_cpu_library

bnb = pytest.importorskip("bitsandbytes")

SHAPES = [(300,), (64, 70), (4096,), (5, 1000)]  # float32 states; 8-bit with a partial block; whole blocks; partial
LAMB_OPTIONS = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
LARS_OPTIONS = dict(lr=0.5, momentum=0.9, weight_decay=1e-3)
CLASSES = {"LAMB8bit": (pyquant.LAMB8bit, LAMB_OPTIONS), "LARS8bit": (pyquant.LARS8bit, LARS_OPTIONS)}


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def grads_for(params, step, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in params]


def set_grads(params, step, **kwargs):
    for p, g in zip(params, grads_for(params, step, **kwargs)):
        p.grad = g


def states_of(opt, params, keys=("state1", "state2", "absmax1", "absmax2", "unorm_vec", "step")):
    return [{k: v for k, v in opt.state[p].items() if k in keys} for p in params]


def run(name, backend=None, dtype=torch.float32, steps=3, **options):
    """`steps` steps of CLASSES[name] over make_params(dtype) on `backend` (None: the default one)."""
    cls, defaults = CLASSES[name]
    params = make_params(dtype)
    opt = cls(params, **{**defaults, **options})
    with use_backend(backend) if backend else contextlib.nullcontext():
        for step in range(1, steps + 1):
            set_grads(params, step)
            opt.step()
    return params, opt


def dequantised(state, key, i):
    t = state[key]
    if t.dtype == torch.uint8:
        return F.dequantize_blockwise(t, state[f"absmax{i}"], state[f"qmap{i}"], 256).double().reshape(-1)
    return t.double().reshape(-1)


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---- the step against float64 arithmetic of the published algorithm, from the same quantised states ----
def float64_lamb(p, g, m, v, step, lr, betas, eps, weight_decay, max_unorm, trust_clip=False):
    """You et al. 2020, Algorithm 2 (with bias correction), in float64: (new p, new m, new v, ratio)."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    r = (m / (1 - b1**step)) / (torch.sqrt(v / (1 - b2**step)) + eps) + weight_decay * p
    ratio = ratio64(p, r, max_unorm, trust_clip)
    return p - lr * ratio * r, m, v, ratio


def float64_lars(p, g, m, step, lr, momentum, weight_decay, max_unorm, trust_clip=False):
    """You et al. 2017 with momentum (the ratio on the direction g + wd p, before the momentum), in float64."""
    d = g + weight_decay * p
    ratio = ratio64(p, d, max_unorm, trust_clip)
    m = ratio * d if step == 1 else momentum * m + ratio * d
    return p - lr * m, m, ratio


def ratio64(p, r, max_unorm, trust_clip):
    pn, rn = float(p.norm()), float(r.norm())
    if max_unorm == 0 or pn == 0 or rn == 0:
        return 1.0
    ratio = max_unorm * pn / rn
    return min(ratio, 1.0) if trust_clip else ratio


def quantisation_bound(code: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The largest distance between a value and its dequantised code in a block of `absmax`: half the widest gap
    between neighbouring codes plus the 65536-point grid's step (docs/numerics.md, quantize_blockwise)."""
    return absmax.double() * (float(code.diff().max()) / 2 + 2 / 65535) * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [{}, dict(trust_clip=True, max_unorm=0.05), dict(max_unorm=0.0)],
                         ids=["published", "clipped", "off"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_step_is_the_float64_algorithm_from_the_same_states(name, options, dtype, backend):
    cls, defaults = CLASSES[name]
    kwargs = {**defaults, **options}
    max_unorm = kwargs.get("max_unorm", 1.0 if name == "LAMB8bit" else 0.02)
    params = make_params(dtype)
    opt = cls(params, **kwargs)
    ratios = []
    with use_backend(backend):
        for step in range(1, 5):
            set_grads(params, step)
            before = [(p.detach().double().reshape(-1), p.grad.double().reshape(-1)) for p in params]
            states = [[dequantised(opt.state[p], k, i) for i, k in enumerate(cls._states, 1)] if opt.state[p] else
                      [torch.zeros(p.numel(), dtype=torch.float64)] * len(cls._states) for p in params]
            opt.step()
            for p, (p0, g), s in zip(params, before, states):
                state = opt.state[p]
                if name == "LAMB8bit":
                    p64, m64, v64, ratio = float64_lamb(p0, g, *s, step, kwargs["lr"], kwargs["betas"], kwargs["eps"],
                                                        kwargs["weight_decay"], max_unorm, kwargs.get("trust_clip", False))
                    new = [m64, v64]
                    # the float32 arithmetic's error scales with the terms added, not with their (cancelling) sum
                    scales = [s[0].abs() + g.abs(), s[1] + g * g]
                else:
                    p64, m64, ratio = float64_lars(p0, g, s[0], step, kwargs["lr"], kwargs["momentum"],
                                                   kwargs["weight_decay"], max_unorm, kwargs.get("trust_clip", False))
                    new = [m64]
                    scales = [s[0].abs() + ratio * (g + kwargs["weight_decay"] * p0).abs()]
                ratios.append(ratio)
                got = p.detach().double().reshape(-1)
                # p's roundings: LAMB's decay p * f32(1 - lr*ratio*wd) rounds the factor and the product, the sum
                # rounds once more (1.5 ulp of p in float32, 2 in all), and the update's float32 roundings: well
                # within 1e-5 of the tensor's largest update (the moments' sums may cancel, so not of each element's)
                ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-8
                tol = 2 * ulp * p64.abs() + 1e-5 * (p64 - p0).abs().max() + 1e-12
                assert ((got - p64).abs() <= tol).all(), f"{name} step {step}: parameter off by {(got - p64).abs().max()}"
                for i, (key, expected, scale) in enumerate(zip(cls._states, new, scales), 1):
                    if state[key].dtype == torch.uint8:
                        bound = quantisation_bound(state[f"qmap{i}"], state[f"absmax{i}"]).repeat_interleave(256)
                        bound = bound[: p.numel()]
                    else:
                        bound = 1e-6 * scale + 1e-30
                    assert ((dequantised(state, key, i) - expected).abs() <= bound).all(), f"{name} {key} step {step}"
    if options.get("max_unorm") == 0.0:
        assert set(ratios) == {1.0}
    elif options.get("trust_clip"):
        assert max(ratios) <= 1.0 and min(ratios) < 1.0, ratios  # the cap was active somewhere, never above 1
    else:
        assert any(abs(r - 1.0) > 0.1 for r in ratios), ratios  # the published ratio is not a no-op here


def test_lamb_moments_are_adamw8bit_moments_bit_for_bit():
    """LAMB's moments depend on the gradients only (its weight decay is in the direction, not the moments), and its
    step is Adam's kernel: whatever the ratios, its states are AdamW8bit's, bit for bit, every step."""
    lamb_p, adamw_p = make_params(torch.bfloat16), make_params(torch.bfloat16)
    lamb, adamw = pyquant.LAMB8bit(lamb_p, **LAMB_OPTIONS), pyquant.AdamW8bit(adamw_p, **LAMB_OPTIONS)
    for step in range(1, 5):
        for ps in (lamb_p, adamw_p):
            set_grads(ps, step)
        lamb.step(), adamw.step()
        keys = ("state1", "state2", "absmax1", "absmax2", "step")
        assert_same_bits(states_of(lamb, lamb_p, keys), states_of(adamw, adamw_p, keys), f"states, step {step}")
    assert not any(torch.equal(a, b) for a, b in zip(lamb_p, adamw_p))  # while the parameters differ


def test_lamb_update_norm_is_lr_times_max_unorm_times_weight_norm():
    """The published ratio makes every tensor's update norm lr * max_unorm * ||p|| (here without weight decay)."""
    params = make_params()
    opt = pyquant.LAMB8bit(params, lr=1e-2, max_unorm=0.5)
    for step in range(1, 4):
        set_grads(params, step)
        before = [p.detach().clone() for p in params]
        opt.step()
        for p, b in zip(params, before):
            assert (p.detach() - b).norm().item() == pytest.approx(1e-2 * 0.5 * b.norm().item(), rel=1e-4)


def test_lars_scaled_direction_norm_is_max_unorm_times_weight_norm():
    """On the first step LARS' momentum is ratio * (g + wd p), of norm max_unorm * ||p|| (eta, LARS' trust
    coefficient), so the update is lr times that."""
    params = make_params()
    opt = pyquant.LARS8bit(params, lr=0.1, momentum=0.9, weight_decay=1e-2, max_unorm=0.02)
    set_grads(params, 1)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b in zip(params, before):
        assert (p.detach() - b).norm().item() == pytest.approx(0.1 * 0.02 * b.norm().item(), rel=1e-3)


# ---- max_unorm and trust_clip: which steps equal the plain AdamW / SGD steps ----
def test_max_unorm_zero_is_bitsandbytes_lamb8bit_and_adamw8bit_bits():
    """max_unorm=0: no trust ratio. On 8-bit tensors that is bitsandbytes' LAMB8bit (its 8-bit kernel is AdamW's)."""
    shapes = [(4096,), (5, 1000)]
    ours_p, theirs_p, adamw_p = (make_params(torch.bfloat16, shapes=shapes) for _ in range(3))
    ours = pyquant.LAMB8bit(ours_p, **LAMB_OPTIONS, max_unorm=0.0)
    theirs = bnb.optim.LAMB8bit(theirs_p, **LAMB_OPTIONS)
    adamw = pyquant.AdamW8bit(adamw_p, **LAMB_OPTIONS)
    for step in range(1, 4):
        for ps in (ours_p, theirs_p, adamw_p):
            set_grads(ps, step)
        ours.step(), theirs.step(), adamw.step()
        assert_same_bits(list(ours_p), list(theirs_p), f"vs bitsandbytes LAMB8bit, step {step}")
        assert_same_bits(list(ours_p), list(adamw_p), f"vs AdamW8bit, step {step}")
        keys = ("state1", "state2", "absmax1", "absmax2")
        assert_same_bits(states_of(ours, ours_p, keys), states_of(theirs, theirs_p, keys), "states")


def test_max_unorm_zero_is_bitsandbytes_lars8bit_bits():
    """max_unorm=0: SGD with momentum, bitsandbytes' LARS8bit(max_unorm=0) on 8-bit and float32 states alike."""
    ours_p, theirs_p = make_params(torch.float16), make_params(torch.float16)
    ours = pyquant.LARS8bit(ours_p, **LARS_OPTIONS, max_unorm=0.0)
    theirs = bnb.optim.LARS8bit(theirs_p, **LARS_OPTIONS, max_unorm=0.0)
    for step in range(1, 4):
        for ps in (ours_p, theirs_p):
            set_grads(ps, step)
        ours.step(), theirs.step()
        assert_same_bits(list(ours_p), list(theirs_p), f"params, step {step}")
        assert_same_bits(states_of(ours, ours_p, ("state1", "absmax1")), states_of(theirs, theirs_p, ("state1", "absmax1")),
                         f"states, step {step}")


@pytest.mark.parametrize("name", list(CLASSES))
def test_trust_clip_inactive_is_the_plain_step_and_active_shrinks_it(name):
    """trust_clip=True caps the ratio at 1: with a large max_unorm the cap holds every step (the bits of
    max_unorm=0), with a small one the ratio is below 1 and the step shorter than the plain one."""
    plain_p, plain = run(name, max_unorm=0.0)
    loose_p, _ = run(name, max_unorm=1e6, trust_clip=True)
    assert_same_bits(list(loose_p), list(plain_p), "inactive clip")
    tight_p, _ = run(name, max_unorm=1e-4, trust_clip=True)
    start = make_params()
    for s, t, q in zip(start, tight_p, plain_p):
        assert 0 < (t - s).norm() < 0.5 * (q - s).norm()


@pytest.mark.parametrize("name", list(CLASSES))
def test_zero_norms_take_ratio_one(name):
    """A zero parameter (||p|| = 0: a zero-initialised bias) steps with ratio 1, the plain step's bits; a zero
    direction (LARS, g = 0, no weight decay) moves nothing and writes no NaN."""
    cls, defaults = CLASSES[name]
    zero, reference = (torch.nn.Parameter(torch.zeros(5000)) for _ in range(2))
    opt, plain = cls([zero], **defaults), cls([reference], **defaults, max_unorm=0.0)
    zero.grad = reference.grad = grads_for([zero], 1)[0]
    opt.step(), plain.step()
    assert_same_bits(zero.detach(), reference.detach(), "zero parameter")
    assert zero.abs().sum() > 0
    if name == "LARS8bit":
        p = torch.nn.Parameter(torch.randn(5000))
        start = p.detach().clone()
        still = cls([p], lr=0.1, momentum=0.9)
        p.grad = torch.zeros(5000)
        still.step()
        assert_same_bits(p.detach(), start, "zero direction")
        assert float(still.state[p]["unorm_vec"]) == 0.0 and torch.isfinite(still.state[p]["absmax1"]).all()


# ---- the norm passes and the steps: the same bits on every backend, instruction set and thread count ----
def norm_inputs(dtype, eight_bit, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 255, 256, 257, 1000, 4099, 0, 70_001]
    params = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    grads = [(torch.randn(n, generator=g) * 0.1).to(dtype) for n in sizes]
    grads[4][7] = float("nan")
    grads[5][300] = float("inf")
    code1, code2 = F.create_dynamic_map(True), F.create_dynamic_map(False)
    if eight_bit:
        m = [F.quantize_blockwise(torch.randn(n, generator=g), code1, 256) for n in sizes]
        v = [F.quantize_blockwise(torch.rand(n, generator=g), code2, 256) for n in sizes]
        states = ([q for q, _ in m], [q for q, _ in v], [a for _, a in m], [a for _, a in v])
    else:
        empty = [torch.empty(0) for _ in sizes]
        states = ([torch.randn(n, generator=g) for n in sizes], [torch.rand(n, generator=g) for n in sizes], empty, empty)
    group = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, momentum=0.9)
    lamb = torch.tensor([_contract.lamb_constants(group, 1 + i % 3, eight_bit, 2.0**-3) for i in range(len(sizes))])
    lars = torch.tensor([_contract.one_state_constants(dict(group, betas=(0.9, 0.0)), 2, eight_bit, 2.0**-3)
                         for _ in sizes])
    return params, grads, states, lamb, lars, (code1, code2)


def norms_on(backend, dtype, eight_bit, nonfinite):
    params, grads, states, lamb, lars, codes = norm_inputs(dtype, eight_bit)
    with use_backend(backend):
        return (F.lamb_norms_multi_tensor(params, grads, *states, lamb, *codes, nonfinite),
                F.lars_norms_multi_tensor(params, grads, lars, nonfinite))


@needs_cpu_library
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_norm_passes_cpu_equal_reference(isa, dtype, eight_bit, nonfinite):
    cpu, reference = norms_on("cpu", dtype, eight_bit, nonfinite), norms_on("reference", dtype, eight_bit, nonfinite)
    assert_same_bits(cpu, reference, "cpu vs reference", nan_blind=True)
    lamb, lars = cpu
    assert lamb.dtype == torch.float64 and lamb.shape == (8, 2)
    assert (lamb[6] == 0).all() and (lars[6] == 0).all()  # the empty tensor
    if nonfinite == _contract.SKIP_ELEMENT:
        assert torch.isfinite(lamb).all() and torch.isfinite(lars).all()
    else:
        assert torch.isnan(lamb[4, 1]) and torch.isnan(lars[4, 1])


def test_norm_pass_is_the_sum_of_squares():
    """The fixed-order pairwise sums agree with a plain float64 sum to rounding, and the parameter's sum is exactly
    what the direction's weight decay term sees."""
    params, grads, states, lamb, lars, codes = norm_inputs(torch.float32, True)
    sums = F.lars_norms_multi_tensor(params, grads, lars, 0)
    for p, g, (sp, sd) in zip(params, grads, sums.tolist()):
        assert sp == pytest.approx(float((p.double() ** 2).sum()), rel=1e-12)
        ok = torch.isfinite(g)
        d = torch.where(ok, g.double() * 2.0**-3 + 0.01 * p.double(), torch.zeros((), dtype=torch.float64))
        assert sd == pytest.approx(float((d**2).sum()), rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*non-finite gradient elements were skipped:RuntimeWarning")
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CLASSES))
@needs_cpu_library
def test_optimizer_cpu_equals_reference(name, dtype, nonfinite):
    runs = {}
    for backend in ("cpu", "reference"):
        cls, defaults = CLASSES[name]
        params = make_params(dtype)
        opt = cls(params, **defaults, nonfinite=nonfinite)
        history = []
        with use_backend(backend):
            for step in range(1, 4):
                set_grads(params, step)
                if step == 2:
                    params[1].grad.view(-1)[5] = float("nan")
                opt.step()
                history.append([p.detach().clone() for p in params] + states_of(opt, params))
        runs[backend] = history
    assert_same_bits(runs["cpu"], runs["reference"], f"{name} cpu vs reference", nan_blind=True)


@needs_cpu_library
def test_the_same_bits_for_any_thread_count(outputs_by_thread_count):
    script = (
        "import hashlib, sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_optim_lamb_lars import norms_on, run\n"
        "h = hashlib.sha256()\n"
        "for t in norms_on('cpu', torch.bfloat16, True, 1) + norms_on('cpu', torch.float32, False, 0):\n"
        "    h.update(t.numpy().tobytes())\n"
        "for name in ('LAMB8bit', 'LARS8bit'):\n"
        "    params, opt = run(name, 'cpu')\n"
        "    for p in params:\n"
        "        h.update(p.detach().numpy().tobytes())\n"
        "        for k in ('state1', 'absmax1', 'unorm_vec'):\n"
        "            h.update(opt.state[p].get(k, torch.zeros(0)).numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    assert len(outputs_by_thread_count(script)) == 1


# ---- checkpoints: pyquant's own, and bitsandbytes' LAMB8bit / LARS8bit in both directions ----
@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_round_trip_continues_with_the_same_bits(name):
    cls, defaults = CLASSES[name]
    straight_p, _ = run(name, steps=4)
    params = make_params()
    first = cls(params, **defaults)
    for step in (1, 2):
        set_grads(params, step)
        first.step()
    sd = roundtrip(first.state_dict())
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = cls(resumed_p, **defaults)
    resumed.load_state_dict(sd)
    for step in (3, 4):
        set_grads(resumed_p, step)
        resumed.step()
    assert_same_bits(list(resumed_p), list(straight_p), f"{name} resumed")


@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_has_bitsandbytes_keys_and_layout(name):
    cls, defaults = CLASSES[name]
    ours_p, theirs_p = make_params(), make_params()
    ours, theirs = cls(ours_p, **defaults), getattr(bnb.optim, name)(theirs_p, **defaults)
    for ps in (ours_p, theirs_p):
        set_grads(ps, 1)
    ours.step(), theirs.step()

    def layout(sd):
        return [{k: {kk: (vv.dtype, tuple(vv.shape)) for kk, vv in v.items()} if isinstance(v, dict) else type(v)
                 for k, v in s.items()} for s in sd["state"].values()]

    assert layout(ours.state_dict()) == layout(theirs.state_dict())


@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_moves_both_ways_with_bitsandbytes(name):
    """bitsandbytes -> pyquant -> bitsandbytes through torch.load(weights_only=True). Compared bit for bit where the
    two libraries share the algorithm: max_unorm 0 (LARS: bitsandbytes' too) and, for LAMB, 8-bit tensors only
    (bitsandbytes' LAMB8bit accepts only max_unorm=1.0, and applies its clip to float32-state tensors alone)."""
    cls, defaults = CLASSES[name]
    shapes = [(4096,), (5, 1000)] if name == "LAMB8bit" else SHAPES
    theirs_kwargs = dict(defaults) if name == "LAMB8bit" else dict(defaults, max_unorm=0.0)
    for source, target in (("bnb", "pyquant"), ("pyquant", "bnb")):
        make = {"bnb": lambda ps: getattr(bnb.optim, name)(ps, **theirs_kwargs),
                "pyquant": lambda ps: cls(ps, **defaults, max_unorm=0.0)}
        src_p, ref_p, tgt_p = (make_params(torch.bfloat16, shapes=shapes) for _ in range(3))
        src, ref = make[source](src_p), make["bnb"](ref_p)
        for step in (1, 2):
            for ps in (src_p, ref_p):
                set_grads(ps, step)
            src.step(), ref.step()
        tgt = make[target](tgt_p)
        with torch.no_grad():
            for t, s in zip(tgt_p, src_p):
                t.copy_(s)
        tgt.load_state_dict(roundtrip(src.state_dict()))
        for step in (3, 4):
            for ps in (tgt_p, ref_p):
                set_grads(ps, step)
            tgt.step(), ref.step()
        assert_same_bits(list(tgt_p), list(ref_p), f"{source} -> {target}")
        keys = ("state1", "state2", "absmax1", "absmax2")
        assert_same_bits(states_of(tgt, tgt_p, keys), states_of(ref, ref_p, keys), f"{source} -> {target} states")


def test_bitsandbytes_checkpoint_keeps_our_trust_options():
    """bitsandbytes' groups have no max_unorm: a loaded one keeps the optimizer's, and a state without unorm_vec
    gets one at its next step."""
    theirs_p, ours_p = make_params(), make_params()
    theirs = bnb.optim.LARS8bit(theirs_p, **LARS_OPTIONS, max_unorm=0.0)
    set_grads(theirs_p, 1)
    theirs.step()
    ours = pyquant.LARS8bit(ours_p, **LARS_OPTIONS, max_unorm=0.05, trust_clip=True)
    ours.load_state_dict(roundtrip(theirs.state_dict()))
    assert ours.param_groups[0]["max_unorm"] == 0.05 and ours.param_groups[0]["trust_clip"] is True
    assert "unorm_vec" not in ours.state[ours_p[0]]
    set_grads(ours_p, 2)
    ours.step()
    assert float(ours.state[ours_p[0]]["unorm_vec"]) > 0


# ---- the shared machinery: non-finite gradients, master weights, GradScaler, overrides, the generic classes ----
@pytest.mark.parametrize("name", list(CLASSES))
def test_nonfinite_skip_keeps_the_element_and_propagate_spreads_nan(name):
    cls, defaults = CLASSES[name]
    params = make_params()
    opt = cls(params, **defaults)
    set_grads(params, 1)
    opt.step()
    set_grads(params, 2)
    params[2].grad[10] = float("nan")
    params[3].grad[1, 7] = float("inf")
    before = [p.detach().clone() for p in params]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.nonfinite_count == 2
    assert params[2][10] == before[2][10] and params[3][1, 7] == before[3][1, 7]
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(opt.state[p]["state1"].float()).all() for p in params)
    assert (params[2] != before[2]).sum() == params[2].numel() - 1  # every other element moved

    params = make_params()
    opt = cls(params, **defaults, nonfinite="propagate")
    set_grads(params, 1)
    params[2].grad[10] = float("nan")
    opt.step()
    assert torch.isnan(params[2]).all(), "a NaN direction makes the tensor's ratio, hence every element, NaN"
    assert torch.isfinite(params[0]).all()


@pytest.mark.parametrize("name", list(CLASSES))
def test_master_weights_follow_the_float32_run(name):
    """With master weights a bfloat16 parameter's master takes the float32 parameter's steps (norms included) and
    the parameter is the master rounded."""
    cls, defaults = CLASSES[name]
    init = [p.detach().bfloat16().float() for p in make_params()]
    half = [torch.nn.Parameter(x.bfloat16()) for x in init]
    full = [torch.nn.Parameter(x.clone()) for x in init]
    opt_half, opt_full = cls(half, **defaults, master_weights=True), cls(full, **defaults)
    for step in (1, 2, 3):
        grads = grads_for(full, step)
        for h, f, g in zip(half, full, grads):
            h.grad, f.grad = g.bfloat16(), g.bfloat16().float()
        opt_half.step(), opt_full.step()
    for h, f in zip(half, full):
        assert_same_bits(opt_half.state[h]["master"], f.detach(), "master")
        assert_same_bits(h.detach(), f.detach().bfloat16(), "parameter")


@pytest.mark.parametrize("name", list(CLASSES))
def test_fused_grad_scaler_unscale_gives_the_unscaled_bits(name):
    """The scaler's 1/scale is applied in both passes: scaled gradients with grad_scale set give the bits of the
    unscaled gradients (a power of two: exact)."""
    cls, defaults = CLASSES[name]
    scaled_p, plain_p = make_params(), make_params()
    scaled, plain = cls(scaled_p, **defaults), cls(plain_p, **defaults)
    for step in (1, 2):
        for s, p, g in zip(scaled_p, plain_p, grads_for(plain_p, step)):
            s.grad, p.grad = g * 1024.0, g
        scaled.grad_scale = torch.tensor(1024.0)
        scaled.step(), plain.step()
    assert_same_bits(list(scaled_p), list(plain_p), "fused unscale")


@pytest.mark.parametrize("name", list(CLASSES))
def test_override_of_max_unorm_and_precision(name):
    """pyquant.optim.override sets max_unorm (and optim_bits) for one tensor: max_unorm=0 gives it the plain step's
    bits while the others keep their ratios."""
    cls, defaults = CLASSES[name]
    params, plain_p = make_params(), make_params()
    pyquant.optim.override(params[2], max_unorm=0.0)
    pyquant.optim.override(params[3], optim_bits=32)
    opt, plain = cls(params, **defaults), cls(plain_p, **defaults, max_unorm=0.0)
    with_ratio_p, _ = run(name)
    for step in (1, 2, 3):
        for ps in (params, plain_p):
            set_grads(ps, step)
        opt.step(), plain.step()
    assert_same_bits(params[2].detach(), plain_p[2].detach(), "overridden max_unorm=0")
    assert_same_bits(params[1].detach(), with_ratio_p[1].detach(), "not overridden")
    assert opt.state[params[3]]["state1"].dtype == torch.float32
    with pytest.raises(ValueError, match="max_unorm"):
        pyquant.optim.override(params[0], max_unorm=-1.0)
        set_grads(params, 4)
        opt.step()


@pytest.mark.parametrize("cls, bits", [(pyquant.LAMB, torch.float32), (pyquant.LAMB32bit, torch.float32),
                                       (pyquant.LARS, torch.float32), (pyquant.LARS32bit, torch.float32)])
def test_generic_and_32bit_classes(cls, bits):
    """LAMB / LARS default to float32 states (as bitsandbytes'), optim_bits=8 is LAMB8bit / LARS8bit's bits."""
    defaults = LAMB_OPTIONS if cls.__name__.startswith("LAMB") else LARS_OPTIONS
    params = make_params()
    opt = cls(params, **defaults)
    set_grads(params, 1)
    opt.step()
    assert {opt.state[p]["state1"].dtype for p in params} == {bits}
    if cls in (pyquant.LAMB, pyquant.LARS):
        eight_p = make_params()
        eight = cls(eight_p, **defaults, optim_bits=8)
        ref_p, _ = run("LAMB8bit" if cls is pyquant.LAMB else "LARS8bit", steps=1)
        set_grads(eight_p, 1)
        eight.step()
        assert_same_bits(list(eight_p), list(ref_p), "optim_bits=8")


# ---- what is refused ----
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: pyquant.LAMB8bit(ps, amsgrad=True), "amsgrad"),
        (lambda ps: pyquant.LAMB8bit(ps, adam_w_mode=False), "adam_w_mode"),
        (lambda ps: pyquant.LAMB8bit(ps, args=object()), "args"),
        (lambda ps: pyquant.LAMB8bit(ps, max_unorm=-0.1), "max_unorm"),
        (lambda ps: pyquant.LAMB8bit(ps, max_unorm=float("inf")), "max_unorm"),
        (lambda ps: pyquant.LAMB8bit(ps, betas=(0.9, 1.0)), "betas"),
        (lambda ps: pyquant.LAMB8bit(ps, lr=-1.0), "learning rate"),
        (lambda ps: pyquant.LAMB8bit(ps, bias_correction="yes"), "bias_correction"),
        (lambda ps: pyquant.LAMB8bit(ps, trust_clip=1), "trust_clip"),
        (lambda ps: pyquant.LAMB(ps, optim_bits=4), "optim_bits"),
        (lambda ps: pyquant.LARS8bit(ps, lr=0.1), "momentum must be > 0"),
        (lambda ps: pyquant.LARS8bit(ps, lr=0.1, momentum=0.9, dampening=0.1), "dampening"),
        (lambda ps: pyquant.LARS8bit(ps, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
        (lambda ps: pyquant.LARS8bit(ps, lr=0.1, momentum=0.9, max_unorm=float("nan")), "max_unorm"),
        (lambda ps: pyquant.LARS8bit(ps, lr=0.1, momentum=0.9, args=object()), "args"),
        (lambda ps: pyquant.LARS8bit(ps, lr=0.1, momentum=0.9, nonfinite="zero"), "nonfinite"),
    ],
)
def test_refused_options(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.randn(10))])


def test_bias_correction_false_is_honoured():
    """bitsandbytes accepts bias_correction=False and ignores it; here the moments are not divided (c1 = c2 = 1):
    on the first step |m / sqrt(v)| is (1 - b1) / sqrt(1 - b2) = 0.1 / 0.0316 instead of 1."""
    options = dict(steps=1, max_unorm=0.0, betas=(0.9, 0.999), weight_decay=0.0)
    on_p, _ = run("LAMB8bit", **options)
    off_p, _ = run("LAMB8bit", **options, bias_correction=False)
    for s, on, off in zip(make_params(), on_p, off_p):
        step_on, step_off = (on - s).abs().max().item(), (off - s).abs().max().item()
        assert step_off == pytest.approx(step_on * 0.1 / math.sqrt(0.001), rel=1e-3)


def test_bad_inputs_are_refused_clearly():
    wide = torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))
    wide.grad = torch.randn(5000, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        pyquant.LAMB8bit([wide]).step()
    p = torch.nn.Parameter(torch.randn(5000))
    opt = pyquant.LARS8bit([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(5000)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["__bnb_optimizer_quant_state__"]["unorm_vec"] = torch.zeros(3)
    with pytest.raises(ValueError, match="unorm_vec"):
        opt.load_state_dict(sd)
    with torch.no_grad():
        p.data = torch.randn(6000)
    p.grad = torch.randn(6000)
    with pytest.raises(RuntimeError, match="changed size"):
        opt.step()
    kernel = pyquant.backends.lookup("lars_norms", "reference")
    assert kernel is not None
    with pytest.raises(ValueError, match="grad 0 has 3 elements"):
        pyquant.backends.lookup("lars_norms", "cpu")([torch.zeros(4)], [torch.zeros(3)], torch.zeros(1, 12), 0)


# ---- the Triton backend: the momentum kernel's ratio, and both optimizers end to end (small sizes) ----
@pytest.mark.triton
@pytest.mark.parametrize("name", list(CLASSES))
def test_triton_optimizer_end_to_end(name):
    cls, defaults = CLASSES[name]
    runs = {}
    for backend, device in [("triton", TRITON_DEVICE)] + [p for p in TRITON_PEERS if p[1] == TRITON_DEVICE]:
        params = [torch.nn.Parameter(p.detach().to(device)) for p in make_params(torch.bfloat16,
                                                                                 shapes=[(300,), (5, 1000)])]
        opt = cls(params, **defaults)
        history = []
        with use_backend(backend):
            for step in range(1, 3):
                for p, g in zip(params, grads_for(params, step)):
                    p.grad = g.to(device)
                opt.step()
                history.append([p.detach().clone() for p in params] + states_of(opt, params))
        runs[backend] = history
    for backend in runs:
        assert_same_bits(runs["triton"], runs[backend], f"{name} triton vs {backend}")


@pytest.mark.triton
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_norm_passes_equal_reference(dtype, eight_bit, nonfinite):
    """The Triton norm kernels (pyquant.kernels.trust_ratio) give the reference's sums bit for bit: the block sums in
    the same halving order, on sizes with partial blocks, an empty tensor and a NaN and an inf gradient."""
    params, grads, states, lamb, lars, codes = norm_inputs(dtype, eight_bit)
    keep = [0, 1, 2, 3, 4, 5, 6]  # small sizes for the interpreter (not the 70001-element one)
    params, grads = [params[i] for i in keep], [grads[i] for i in keep]
    states = tuple([s[i] for i in keep] for s in states)
    lamb, lars = lamb[keep], lars[keep]
    results = {}
    for backend, device in [("triton", TRITON_DEVICE)] + [p for p in TRITON_PEERS if p[1] == TRITON_DEVICE]:
        moved = [[t.to(device) for t in ts] for ts in (params, grads, *states)]
        with use_backend(backend):
            results[backend] = (
                F.lamb_norms_multi_tensor(*moved, lamb, *(c.to(device) for c in codes), nonfinite),
                F.lars_norms_multi_tensor(moved[0], moved[1], lars, nonfinite),
            )
    for backend in results:
        assert_same_bits(results["triton"], results[backend], f"triton vs {backend}", nan_blind=True)


# ---- the cuda backend (csrc/cuda/trust_ratio.cu) on a GPU: against the cpu kernels, and end to end ----
@pytest.mark.gpu
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_norm_passes_equal_cpu(ieee_cpu_sqrt, dtype, eight_bit, nonfinite):
    """The norm kernels on CUDA tensors give the cpu library's sums (its square root made IEEE, the GPU's)."""
    cpu, cuda = ieee_cpu_sqrt
    params, grads, states, lamb, lars, codes = norm_inputs(dtype, eight_bit)
    on = [[t.cuda() for t in ts] for ts in (params, grads, *states)]
    cuda_codes = [c.cuda() for c in codes]
    assert_same_bits(cuda["lamb_norms"](*on, lamb, *cuda_codes, nonfinite),
                     cpu["lamb_norms"](params, grads, *states, lamb, *codes, nonfinite), "lamb_norms", nan_blind=True)
    assert_same_bits(cuda["lars_norms"](on[0], on[1], lars, nonfinite), cpu["lars_norms"](params, grads, lars, nonfinite),
                     "lars_norms", nan_blind=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CLASSES))
def test_optimizer_on_cuda_tensors_equals_cpu(ieee_cpu_sqrt, name):
    cls, defaults = CLASSES[name]
    cpu_p = make_params(torch.bfloat16)
    cuda_p = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_p]
    cpu_opt, cuda_opt = cls(cpu_p, **defaults), cls(cuda_p, **defaults)
    for step in range(1, 4):
        for p, c, g in zip(cpu_p, cuda_p, grads_for(cpu_p, step)):
            p.grad, c.grad = g, g.cuda()
        with use_backend("cpu"):
            cpu_opt.step()
        with use_backend("cuda"):
            cuda_opt.step()
        assert_same_bits(list(cuda_p), list(cpu_p), f"{name} params, step {step}")
        assert_same_bits(states_of(cuda_opt, cuda_p), states_of(cpu_opt, cpu_p), f"{name} states, step {step}")


def test_torch_compile_of_the_step_gives_the_eager_bits():
    """Under torch.compile the norm pass's sums leave the graph (the ratios are host numbers), and the bits stay. In a
    fresh process, as tests/test_safety.py's compile test: inductor's build step trips over a stdlib distutils that
    an earlier test of the session may have imported."""
    script = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_optim_lamb_lars import CLASSES, make_params, set_grads\n"
        "for name, (cls, defaults) in CLASSES.items():\n"
        "    compiled_p, eager_p = make_params(shapes=[(5000,), (300,)]), make_params(shapes=[(5000,), (300,)])\n"
        "    compiled, eager = cls(compiled_p, **defaults), cls(eager_p, **defaults)\n"
        "    for step in (1, 2):\n"
        "        for ps in (compiled_p, eager_p):\n"
        "            set_grads(ps, step)\n"
        "        torch.compile(compiled.step)()\n"
        "        eager.step()\n"
        "    print(name, all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(compiled_p, eager_p)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["LAMB8bit", "True", "LARS8bit", "True"], done.stdout
