"""AdEMAMix8bit, AdEMAMix (optim_bits 32 and 8) and AdEMAMix32bit (pyquant/optim/ademamix.py) against bitsandbytes
0.50.2 on CPU, bit for bit: parameters and every state after every step, float32/float16/bfloat16 parameters, partial
last blocks, tensors below min_8bit_size (float32 states), weight decay, the alpha and beta3 schedulers; the
non-finite policy, master weights and GradScaler's fused unscale; state_dict round trips with bitsandbytes in both
directions through torch.load(weights_only=True); the op's cpu kernel against the reference on every instruction
set and thread count, its triton kernel against both (interpreted here), its cuda kernel against the cpu one (on a
GPU); the options and inputs that are refused."""

from __future__ import annotations

import io

import pytest
import torch

import pyquant
from pyquant import _contract, use_backend
from pyquant import functional as F
from pyquant.amp import GradScaler

from conftest import CPU_BACKENDS, TRITON_DEVICE, TRITON_PEERS, assert_same_bits, bits, needs_cpu_library

bnb = pytest.importorskip("bitsandbytes")

# (class name, constructor keywords): bitsandbytes' classes of the same names take the same keywords.
CLASSES = [("AdEMAMix8bit", {}), ("AdEMAMix", {}), ("AdEMAMix", dict(optim_bits=8)), ("AdEMAMix32bit", {})]
# bitsandbytes 0.50.2's AdEMAMix32bit cannot step on CPU (test_bitsandbytes_ademamix32bit_fails_on_cpu): pyquant's is
# compared with what it stands for, bitsandbytes' AdEMAMix with optim_bits=32.
BNB_STAND_IN = {"AdEMAMix32bit": ("AdEMAMix", dict(optim_bits=32))}
OPTIONS = [
    {},  # the defaults: lr 1e-3, betas (0.9, 0.999, 0.9999), alpha 5, weight_decay 1e-2
    dict(lr=1e-2, betas=(0.8, 0.95, 0.99), alpha=2.0, eps=1e-6, weight_decay=0.0),
    dict(t_alpha=3, t_beta3=4, weight_decay=0.1),  # both schedulers, reaching their ends within the test's steps
    dict(t_beta3=10, betas=(0.5, 0.99, 0.999)),
]
SHAPES = [(300,), (64, 70), (4096,), (5, 1000)]  # 32-bit states; 8-bit with a partial block; whole blocks; partial


def make_params(dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype).to(device)) for s in SHAPES]


def grads_for(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [(torch.randn(p.shape, generator=g) * 0.1).to(p.dtype).to(p.device) for p in params]


def make(lib, which, params, options, **extra):
    cls, kwargs = CLASSES[which]
    if lib is bnb.optim:
        cls, kwargs = BNB_STAND_IN.get(cls, (cls, kwargs))
    return getattr(lib, cls)(params, **kwargs, **options, **extra)


def test_bitsandbytes_ademamix32bit_fails_on_cpu():
    """Why pyquant's AdEMAMix32bit is compared with bitsandbytes' AdEMAMix(optim_bits=32): bitsandbytes' own
    AdEMAMix32bit allocates unstacked states and its CPU step indexes state1[0], a scalar, and fails."""
    params = make_params(torch.float32)
    opt = bnb.optim.AdEMAMix32bit(params)
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        opt.step()


def state_tensors(opt, params):
    keys = ("state1", "state2", "absmax1", "absmax2", "step")
    return [{k: v for k, v in opt.state[p].items() if k in keys} for p in params]


def step_both(ours_p, theirs_p, ours, theirs, step, mutate=None):
    for ps in (ours_p, theirs_p):
        for p, g in zip(ps, grads_for(ps, step)):
            if mutate:
                mutate(g)
            p.grad = g
    ours.step()
    theirs.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option", range(len(OPTIONS)))
@pytest.mark.parametrize("which", range(len(CLASSES)), ids=[f"{c}{k or ''}" for c, k in CLASSES])
def test_bits_equal_bitsandbytes(which, option, dtype, backend):
    ours_p, theirs_p = make_params(dtype), make_params(dtype)
    ours, theirs = make(pyquant, which, ours_p, OPTIONS[option]), make(bnb.optim, which, theirs_p, OPTIONS[option])
    with use_backend(backend):
        for step in range(1, 6):
            step_both(ours_p, theirs_p, ours, theirs, step)
            assert_same_bits(list(ours_p), list(theirs_p), f"params, step {step}")
            assert_same_bits(state_tensors(ours, ours_p), state_tensors(theirs, theirs_p), f"states, step {step}")
    eight_bit = CLASSES[which][0] == "AdEMAMix8bit" or CLASSES[which][1].get("optim_bits") == 8
    expected = [torch.float32] + [torch.uint8 if eight_bit else torch.float32] * 3
    assert [ours.state[p]["state1"].dtype for p in ours_p] == expected
    assert [tuple(ours.state[p]["state1"].shape) for p in ours_p] == [(2, *s) for s in SHAPES]


def test_schedulers_change_the_update():
    """The schedulers are not no-ops: with them, the parameters differ from a run without them."""
    runs = []
    for option in (dict(weight_decay=0.1), dict(t_alpha=3, t_beta3=4, weight_decay=0.1)):
        params = make_params(torch.float32)
        opt = pyquant.AdEMAMix8bit(params, **option)
        for step in range(1, 3):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
            opt.step()
        runs.append([p.detach().clone() for p in params])
    assert not torch.equal(runs[0][1], runs[1][1])
    alpha1, beta3_1 = _contract.ademamix_schedules(dict(betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=3, t_beta3=4), 1)
    assert alpha1 == 5.0 / 3 and 0.9 < beta3_1 < 0.9999
    assert _contract.ademamix_schedules(dict(betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=3, t_beta3=4), 9) == (
        5.0, 0.9999)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("which", [0, 3], ids=["8bit", "32bit"])
def test_nonfinite_propagate_is_bitsandbytes_and_skip_keeps_elements(which, backend):
    def poison(g):
        g.view(-1)[3] = float("nan")
        g.view(-1)[-1] = float("inf")

    ours_p, theirs_p = make_params(torch.float32), make_params(torch.float32)
    ours = make(pyquant, which, ours_p, OPTIONS[2], nonfinite="propagate")
    theirs = make(bnb.optim, which, theirs_p, OPTIONS[2])
    with use_backend(backend):
        for step in (1, 2, 3):
            step_both(ours_p, theirs_p, ours, theirs, step, poison if step == 2 else None)
    assert_same_bits(list(ours_p), list(theirs_p), "params", nan_blind=True)
    assert_same_bits(state_tensors(ours, ours_p), state_tensors(theirs, theirs_p), "states", nan_blind=True)
    assert torch.isnan(ours_p[1]).any(), "propagate: the NaN reaches the parameters"

    skip_p = make_params(torch.float32)
    skip = make(pyquant, which, skip_p, OPTIONS[2])
    with use_backend(backend), pytest.warns(RuntimeWarning, match="non-finite"):
        for step in (1, 2):
            for p, g in zip(skip_p, grads_for(skip_p, step)):
                if step == 2:
                    poison(g)
                p.grad = g
            before = [p.detach().clone() for p in skip_p]
            states_before = [{k: v.clone() for k, v in skip.state[p].items() if k in ("state1", "state2")}
                             for p in skip_p]
            skip.step()
    assert skip.nonfinite_count == 2 * len(SHAPES)
    for p, b, sb in zip(skip_p, before, states_before):
        assert_same_bits(p.detach().reshape(-1)[[3, -1]], b.reshape(-1)[[3, -1]], "skipped elements")
        assert torch.isfinite(p).all()
        if sb["state1"].dtype == torch.float32:  # float32 states: the skipped elements' states are kept exactly
            s1 = skip.state[p]["state1"].reshape(2, -1)
            assert_same_bits(s1[:, [3, -1]], sb["state1"].reshape(2, -1)[:, [3, -1]], "kept EMAs")
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in skip.state[p] and skip.state[p][key].dtype == torch.float32:
                assert torch.isfinite(skip.state[p][key]).all(), key


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("which", [0, 1], ids=["8bit", "32bit"])
def test_state_dict_moves_both_ways_with_bitsandbytes(which):
    for source_lib, target_lib in ((bnb.optim, pyquant), (pyquant, bnb.optim)):
        src_p, ref_p, tgt_p = make_params(torch.bfloat16), make_params(torch.bfloat16), make_params(torch.bfloat16)
        src, ref = make(source_lib, which, src_p, OPTIONS[2]), make(bnb.optim, which, ref_p, OPTIONS[2])
        for step in (1, 2):
            step_both(src_p, ref_p, src, ref, step)
        sd = roundtrip(src.state_dict())
        assert set(sd["state"][1]) == {"step", "__bnb_optimizer_quant_state__"}
        tgt = make(target_lib, which, tgt_p, OPTIONS[2])
        with torch.no_grad():
            for t, s in zip(tgt_p, src_p):
                t.copy_(s)
        tgt.load_state_dict(sd)
        for step in (3, 4):
            step_both(tgt_p, ref_p, tgt, ref, step)
        what = f"{source_lib.__name__} -> {target_lib.__name__}"
        assert_same_bits(list(tgt_p), list(ref_p), what)
        assert_same_bits(state_tensors(tgt, tgt_p), state_tensors(ref, ref_p), f"{what}: states")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights_are_the_float32_run(backend):
    """A bfloat16 parameter with master weights follows the float32 parameter's trajectory exactly (same gradient
    values); the parameter is that trajectory rounded once."""
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(6000, generator=gen).bfloat16().float()
    half, full = torch.nn.Parameter(init.bfloat16()), torch.nn.Parameter(init.clone())
    opt_half = pyquant.AdEMAMix8bit([half], master_weights=True, t_alpha=2)
    opt_full = pyquant.AdEMAMix8bit([full], master_weights=True, t_alpha=2)  # float32: no master copy
    with use_backend(backend):
        for _ in range(4):
            g = torch.randn(6000, generator=gen).bfloat16()
            half.grad, full.grad = g, g.float()
            opt_half.step()
            opt_full.step()
    master = opt_half.state[half]["master"]
    assert "master" not in opt_full.state[full]
    assert_same_bits(master, full.detach(), "master vs float32 run")
    assert_same_bits(half.detach(), master.bfloat16(), "parameter vs its master")
    assert_same_bits(state_tensors(opt_half, [half]), state_tensors(opt_full, [full]), "states")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_unscale_gives_the_bits_of_unscale_then_step(backend, dtype):
    runs = []
    for fused in (True, False):
        params = make_params(dtype)
        opt = pyquant.AdEMAMix8bit(params, lr=1e-2)
        scaler = GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        with use_backend(backend):
            for step in range(1, 5):
                scaler.scale(torch.ones(()))
                for p, g in zip(params, grads_for(params, step)):
                    p.grad = (g.float() * scaler.get_scale()).to(dtype)
                    if step == 3 and p is params[1]:
                        p.grad[7] = float("inf")  # an overflowing step: skipped whole
                if not fused:
                    scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
        runs.append((params, opt))
    (pf, of), (pu, ou) = runs
    assert [of.state[p]["step"] for p in pf] == [3] * len(SHAPES)
    assert_same_bits(list(pf), list(pu), "params")
    assert_same_bits(state_tensors(of, pf), state_tensors(ou, pu), "states")


@pytest.mark.parametrize(
    "make_opt, match",
    [
        (lambda ps: pyquant.AdEMAMix8bit(ps, betas=(0.9, 0.999)), "three values"),
        (lambda ps: pyquant.AdEMAMix8bit(ps, betas=(0.9, 0.999, 1.0)), "betas"),
        (lambda ps: pyquant.AdEMAMix8bit(ps, alpha=-1.0), "alpha"),
        (lambda ps: pyquant.AdEMAMix8bit(ps, alpha=float("inf")), "alpha"),
        (lambda ps: pyquant.AdEMAMix8bit(ps, t_alpha=-5), "t_alpha"),
        (lambda ps: pyquant.AdEMAMix8bit(ps, t_beta3="10"), "t_beta3"),
        (lambda ps: pyquant.AdEMAMix8bit(ps, t_beta3=10, betas=(0.0, 0.999, 0.9999)), "logarithms"),
        (lambda ps: pyquant.AdEMAMix8bit(ps, lr=-1.0), "learning rate"),
        (lambda ps: pyquant.AdEMAMix8bit(ps, weight_decay=float("nan")), "weight_decay"),
        (lambda ps: pyquant.AdEMAMix8bit(ps, is_paged=True), "is_paged"),
        (lambda ps: pyquant.AdEMAMix(ps, optim_bits=4), "optim_bits"),
        (lambda ps: pyquant.AdEMAMix8bit(ps, nonfinite="zero"), "nonfinite"),
    ],
)
def test_refused_options(make_opt, match):
    with pytest.raises(ValueError, match=match):
        make_opt([torch.nn.Parameter(torch.randn(10))])


def test_an_undefined_beta3_schedule_is_a_clear_error():
    """With beta1 > beta3 the denominator of bitsandbytes' beta3 schedule crosses 0: near it the exponential
    overflows (bitsandbytes raises OverflowError at that step); pyquant raises an error naming the schedule."""
    for lib, error, match in ((pyquant, ValueError, "beta3 schedule .* undefined at step 87"),
                              (bnb.optim, OverflowError, "math range error")):
        p = torch.nn.Parameter(torch.randn(10))
        opt = lib.AdEMAMix8bit([p], betas=(0.9, 0.999, 0.01), t_beta3=85)
        with pytest.raises(error, match=match):
            for _ in range(100):
                p.grad = torch.randn(10)
                opt.step()


def test_bad_inputs_are_refused_clearly():
    wide = torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))
    wide.grad = torch.randn(5000, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        pyquant.AdEMAMix8bit([wide]).step()
    p = torch.nn.Parameter(torch.randn(5000))
    opt = pyquant.AdEMAMix8bit([p])
    p.grad = torch.randn(5000)
    opt.step()
    with torch.no_grad():
        p.data = torch.randn(6000)
    p.grad = torch.randn(6000)
    with pytest.raises(RuntimeError, match="changed size"):
        opt.step()

    for n, eight_bit in ((300, False), (5000, True)):
        q = torch.nn.Parameter(torch.randn(n))
        other = pyquant.AdEMAMix8bit([q])
        q.grad = torch.randn(n)
        other.step()
        good = other.state_dict()

        def broken(key, value):
            sd = roundtrip(good)
            sd["state"][0]["__bnb_optimizer_quant_state__"][key] = value
            return sd

        with pytest.raises(ValueError, match=r"state1 must be the fast and slow EMAs stacked.*\(2, %d\)" % n):
            other.load_state_dict(broken("state1", good["state"][0]["__bnb_optimizer_quant_state__"]["state1"][0]))
        if eight_bit:
            with pytest.raises(ValueError, match="absmax1 must hold 2 x 20 block scales"):
                other.load_state_dict(broken("absmax1", torch.zeros(20)))
            scales = torch.ones(2, 20)
            scales[1, 4] = float("nan")
            with pytest.raises(ValueError, match=r"absmax1 has 1 NaN or negative.*slow EMA"):
                other.load_state_dict(broken("absmax1", scales))
        else:
            stacked = torch.zeros(2, n)
            stacked[1, 5] = float("nan")
            with pytest.raises(ValueError, match=r"state1 has 1 NaN entries \(the first at flat index 5.*slow EMA"):
                other.load_state_dict(broken("state1", stacked))
            with pytest.raises(ValueError, match="state2 has 300 negative"):
                other.load_state_dict(broken("state2", -torch.ones(n)))
        other.load_state_dict(roundtrip(good))  # the unbroken one still loads


# ---- the op's kernels ----
SIZES = [1, 255, 256, 257, 1000, 4099]


def kernel_inputs(dtype, eight_bit, seed, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    grads = [(torch.randn(n, generator=g) * 0.1).to(dtype) for n in sizes]
    grads[4 % len(sizes)][7 % sizes[4 % len(sizes)]] = float("nan")
    grads[-1][-1] = float("inf")
    code1, code2 = F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False)
    m = [torch.randn(2, n, generator=g) for n in sizes]
    nu = [torch.randn(n, generator=g).abs() * 0.01 for n in sizes]
    if eight_bit:
        q = [[F.quantize_blockwise(x[i], code1, 256) for i in (0, 1)] for x in m]
        state1 = [torch.stack([a for a, _ in pair]) for pair in q]
        absmax1 = [torch.stack([b for _, b in pair]) for pair in q]
        q2 = [F.quantize_blockwise(x, code2, 256) for x in nu]
        state2, absmax2 = [a for a, _ in q2], [b for _, b in q2]
    else:
        state1, state2 = m, nu
        absmax1 = absmax2 = [torch.empty(0) for _ in sizes]
    group = dict(lr=1e-2, betas=(0.9, 0.99, 0.999), alpha=5.0, t_alpha=4, t_beta3=None, eps=1e-8, weight_decay=0.01)
    constants = torch.tensor([_contract.ademamix_constants(group, seed + 1 + i % 2) for i in range(len(sizes))])
    return params, grads, state1, state2, absmax1, absmax2, constants, code1, code2


def run_steps(backend, device, dtype, eight_bit, nonfinite, steps=2, sizes=SIZES):
    """`steps` calls of the op on `backend` with tensors on `device` (new gradients and constants each call);
    returns the written tensors and every call's count."""
    params, _, state1, state2, absmax1, absmax2, _, code1, code2 = kernel_inputs(dtype, eight_bit, 0, sizes)
    written = [[t.to(device) for t in ts] for ts in (params, state1, state2, absmax1, absmax2)]
    counts = []
    for step in range(1, steps + 1):
        _, grads, *_, constants, _, _ = kernel_inputs(dtype, eight_bit, step, sizes)
        p, s1, s2, a1, a2 = written
        with use_backend(backend):
            counts.append(F.ademamix_step_multi_tensor(p, [g.to(device) for g in grads], s1, s2, a1, a2, constants,
                                                       code1.to(device), code2.to(device), nonfinite))
    return written, [int(c) for c in counts]


@needs_cpu_library
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpu_kernel_equals_reference(isa, dtype, eight_bit, nonfinite):
    cpu = run_steps("cpu", "cpu", dtype, eight_bit, nonfinite)
    assert cpu[1] == [2 if nonfinite == 0 else 0] * 2
    assert_same_bits(cpu, run_steps("reference", "cpu", dtype, eight_bit, nonfinite), "cpu vs reference",
                     nan_blind=True)


@needs_cpu_library
def test_cpu_kernel_is_the_same_for_any_thread_count(outputs_by_thread_count):
    script = (
        "import hashlib, sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_optim_ademamix import run_steps\n"
        "h = hashlib.sha256()\n"
        "for eight_bit in (True, False):\n"
        "    (tensors, counts) = run_steps('cpu', 'cpu', torch.bfloat16, eight_bit, 1, sizes=[100_000, 3, 70_001])\n"
        "    for t in (x for ts in tensors for x in ts): h.update(t.contiguous().view(torch.uint8).numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    assert len(outputs_by_thread_count(script)) == 1


@needs_cpu_library
def test_cpu_kernel_refuses_bad_operands():
    params, grads, state1, state2, absmax1, absmax2, constants, code1, code2 = kernel_inputs(torch.float32, True, 0)
    kernel = pyquant.backends.lookup("ademamix_step", "cpu")
    args = dict(params=params, grads=grads, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2,
                constants=constants, code1=code1, code2=code2, nonfinite=0)
    for change, match in (
        (dict(state1=state1[:4] + [state1[4][0]] + state1[5:]), "state1 4 has 1000 elements, expected 2000"),
        (dict(absmax1=absmax2), "absmax1 0 has 1 elements, expected 2"),
        (dict(state2=state2[:1] + [state2[1].float()] + state2[2:]), "state2 1 is torch.float32"),
        (dict(constants=constants[:, :5]), "constants must be a tensor of shape"),
        (dict(nonfinite=2), "nonfinite must be 0"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            kernel(**{**args, **change})


def triton_peers():
    """The (backend, device) pairs whose bits the triton backend must give: those on the kernel's device."""
    return [(name, dev) for name, dev in TRITON_PEERS if dev == TRITON_DEVICE]


@pytest.mark.triton
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_kernel_equals_reference(dtype, eight_bit, nonfinite):
    ours = run_steps("triton", TRITON_DEVICE, dtype, eight_bit, nonfinite)
    assert ours[1] == [2 if nonfinite == 0 else 0] * 2
    for name, dev in triton_peers():
        assert_same_bits(ours, run_steps(name, dev, dtype, eight_bit, nonfinite), f"triton vs {name}", nan_blind=True)


@pytest.mark.triton
def test_triton_optimizer_end_to_end():
    """The optimizer class on the triton backend: the reference's (bitsandbytes') bits after every step, with mixed
    parameter dtypes in one group (one launch each) and GradScaler's unscale fused in."""
    runs = {}
    for backend in ("triton", "reference"):
        params = make_params(torch.bfloat16, device=TRITON_DEVICE)
        params[0] = torch.nn.Parameter(params[0].detach().float())
        opt = pyquant.AdEMAMix8bit(params, **OPTIONS[2])
        opt.grad_scale = torch.tensor(2.0**-3)  # as a GradScaler hands it over for one step
        history = []
        with use_backend(backend):
            for step in range(1, 4):
                for p, grad in zip(params, grads_for(params, step)):
                    p.grad = grad
                opt.step()
                history.append([p.detach().clone() for p in params] + [
                    t.clone() for s in state_tensors(opt, params) for t in s.values() if isinstance(t, torch.Tensor)])
        runs[backend] = history
    assert_same_bits(runs["triton"], runs["reference"], "triton vs reference")


# ---- the op's cuda kernel (csrc/cuda/ademamix.cu) on a GPU: conftest's `ieee_cpu_sqrt` fixture (the cpu and cuda
# kernels, the CPU library's square root made IEEE as the GPU's) and the `gpu` mark ----
@pytest.mark.gpu
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_kernel_equals_cpu(ieee_cpu_sqrt, dtype, eight_bit, nonfinite):
    cpu, cuda = ieee_cpu_sqrt
    params, _, state1, state2, absmax1, absmax2, _, code1, code2 = kernel_inputs(dtype, eight_bit, 0)
    host = [params, state1, state2, absmax1, absmax2]
    dev = [[t.cuda() for t in ts] for ts in host]
    for step in range(1, 4):
        _, grads, *_, constants, _, _ = kernel_inputs(dtype, eight_bit, step)
        counts = [
            int(ops["ademamix_step"](ts[0], [g.to(device) for g in grads], *ts[1:], constants, code1.to(device),
                                     code2.to(device), nonfinite))
            for ops, device, ts in ((cpu, "cpu", host), (cuda, "cuda", dev))
        ]
        assert counts[1] == counts[0] == (2 if nonfinite == 0 else 0), f"step {step}: non-finite counts"
        assert_same_bits(dev, host, f"step {step}", nan_blind=True)


@pytest.mark.gpu
def test_optimizer_on_cuda_tensors_equals_cpu(ieee_cpu_sqrt):
    cpu_p = make_params(torch.bfloat16)
    cuda_p = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_p]
    cpu_opt, cuda_opt = pyquant.AdEMAMix8bit(cpu_p, **OPTIONS[2]), pyquant.AdEMAMix8bit(cuda_p, **OPTIONS[2])
    for step in range(1, 5):
        for p, c, grad in zip(cpu_p, cuda_p, grads_for(cpu_p, step)):
            p.grad, c.grad = grad, grad.cuda()
        with use_backend("cpu"):
            cpu_opt.step()
        with use_backend("cuda"):
            cuda_opt.step()
        assert_same_bits(list(cuda_p), list(cpu_p), f"params, step {step}")
        assert_same_bits(state_tensors(cuda_opt, cuda_p), state_tensors(cpu_opt, cpu_p), f"states, step {step}")


def test_state_bytes_are_bitsandbytes_layout():
    """8-bit: 3 bytes per element (m1, m2, nu) plus 3 float32 scales per block of 256."""
    p = torch.nn.Parameter(torch.randn(5000))
    opt = pyquant.AdEMAMix8bit([p])
    p.grad = torch.randn(5000)
    opt.step()
    assert opt.state_bytes() == 3 * 5000 + 3 * 20 * 4
    assert bits(opt.state[p]["absmax1"]).shape == (2, 20)
