"""Lion8bit, SGD8bit, RMSprop8bit and Adagrad8bit (pyquant/optim/one_state.py) against bitsandbytes 0.50.2 on CPU,
bit for bit: parameters and states after every step, float32/float16/bfloat16 parameters, partial last blocks,
tensors below min_8bit_size (float32 states), each optimizer's options; state_dict round trips with bitsandbytes
in both directions through torch.load(weights_only=True); the op's cpu kernel against the reference on every
instruction set and thread count; the op's triton kernel against both, and its cuda kernel against the cpu one (on
a GPU); the options and inputs that are refused."""

from __future__ import annotations

import io

import pytest
import torch

import pyquant
from pyquant import _contract, use_backend
from pyquant import functional as F

from conftest import CPU_BACKENDS, TRITON_DEVICE, TRITON_PEERS, assert_same_bits, needs_cpu_library

bnb = pytest.importorskip("bitsandbytes")

# name -> (lr, option sets)
CASES = {
    "Lion8bit": (1e-3, [{}, dict(betas=(0.8, 0.95), weight_decay=0.1)]),
    "SGD8bit": (1e-2, [dict(momentum=0.9), dict(momentum=0.5, weight_decay=0.01)]),
    "RMSprop8bit": (1e-3, [{}, dict(alpha=0.9, eps=1e-6, weight_decay=0.01)]),
    "Adagrad8bit": (1e-2, [{}, dict(eps=1e-8, weight_decay=0.01)]),
}
PARAMS = [(
    name, i) for name, (_, options) in CASES.items() for i in range(len(options))]
SHAPES = [(300,), (64, 70), (4096,), (5, 1000)]  # 32-bit states; 8-bit with a partial block; whole blocks; partial


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def grads_for(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [(torch.randn(p.shape, generator=g) * 0.1).to(p.dtype) for p in params]


def both(name, option_index, dtype, **ours_kwargs):
    lr, options = CASES[name]
    kwargs = dict(lr=lr, **options[option_index])
    ours_p, theirs_p = make_params(dtype), make_params(dtype)
    return ours_p, theirs_p, getattr(pyquant, name)(ours_p, **kwargs, **ours_kwargs), getattr(bnb.optim, name)(theirs_p, **kwargs)


def state_tensors(opt, params):
    return [{k: v for k, v in opt.state[p].items() if k in ("state1", "absmax1", "step")} for p in params]


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
@pytest.mark.parametrize("name,option_index", PARAMS)
def test_bits_equal_bitsandbytes(name, option_index, dtype, backend):
    ours_p, theirs_p, ours, theirs = both(name, option_index, dtype)
    with use_backend(backend):
        for step in range(1, 5):
            step_both(ours_p, theirs_p, ours, theirs, step)
            assert_same_bits(list(ours_p), list(theirs_p), f"{name} params, step {step}")
            assert_same_bits(state_tensors(ours, ours_p), state_tensors(theirs, theirs_p), f"{name} states, step {step}")
    assert [ours.state[p]["state1"].dtype for p in ours_p] == [torch.float32, torch.uint8, torch.uint8, torch.uint8]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_nonfinite_propagate_is_bitsandbytes_and_skip_keeps_elements(name, backend):
    def poison(g):
        g.view(-1)[3] = float("nan")
        g.view(-1)[-1] = float("inf")

    ours_p, theirs_p, ours, theirs = both(name, 1, torch.float32, nonfinite="propagate")
    with use_backend(backend):
        step_both(ours_p, theirs_p, ours, theirs, 1)
        step_both(ours_p, theirs_p, ours, theirs, 2, poison)
        step_both(ours_p, theirs_p, ours, theirs, 3)
    assert_same_bits(list(ours_p), list(theirs_p), "params", nan_blind=True)
    assert_same_bits(state_tensors(ours, ours_p), state_tensors(theirs, theirs_p), "states", nan_blind=True)

    skip_p, _, skip, _ = both(name, 1, torch.float32)
    with use_backend(backend), pytest.warns(RuntimeWarning, match="non-finite"):
        for step in (1, 2):
            for p, g in zip(skip_p, grads_for(skip_p, step)):
                if step == 2:
                    poison(g)
                p.grad = g
            before = [p.detach().clone() for p in skip_p]
            skip.step()
    assert skip.nonfinite_count == 2 * len(SHAPES)
    for p, b in zip(skip_p, before):
        assert_same_bits(p.detach().reshape(-1)[[3, -1]], b.reshape(-1)[[3, -1]], "skipped elements")
        assert torch.isfinite(p).all()


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_moves_both_ways_with_bitsandbytes(name):
    lr, options = CASES[name]
    kwargs = dict(lr=lr, **options[1])
    for source_lib, target_lib in ((bnb.optim, pyquant), (pyquant, bnb.optim)):
        src_p, ref_p, tgt_p = make_params(torch.bfloat16), make_params(torch.bfloat16), make_params(torch.bfloat16)
        src, ref = getattr(source_lib, name)(src_p, **kwargs), getattr(bnb.optim, name)(ref_p, **kwargs)
        for step in (1, 2):
            step_both(src_p, ref_p, src, ref, step)
        tgt = getattr(target_lib, name)(tgt_p, **kwargs)
        with torch.no_grad():
            for t, s in zip(tgt_p, src_p):
                t.copy_(s)
        tgt.load_state_dict(roundtrip(src.state_dict()))
        for step in (3, 4):
            step_both(tgt_p, ref_p, tgt, ref, step)
        assert_same_bits(list(tgt_p), list(ref_p), f"{source_lib.__name__} -> {target_lib.__name__}")
        assert_same_bits(state_tensors(tgt, tgt_p), state_tensors(ref, ref_p), "states")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: pyquant.SGD8bit(ps, lr=0.1), "momentum must be > 0"),
        (lambda ps: pyquant.SGD8bit(ps, lr=0.1, momentum=0.9, dampening=0.1), "dampening"),
        (lambda ps: pyquant.SGD8bit(ps, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
        (lambda ps: pyquant.RMSprop8bit(ps, momentum=0.9), "momentum"),
        (lambda ps: pyquant.RMSprop8bit(ps, centered=True), "centered"),
        (lambda ps: pyquant.RMSprop8bit(ps, alpha=0.0), "alpha"),
        (lambda ps: pyquant.Adagrad8bit(ps, lr_decay=0.1), "lr_decay"),
        (lambda ps: pyquant.Adagrad8bit(ps, initial_accumulator_value=0.1), "initial_accumulator_value"),
        (lambda ps: pyquant.Lion8bit(ps, betas=(0.9, 1.0)), "betas"),
        (lambda ps: pyquant.Lion8bit(ps, lr=-1.0), "learning rate"),
        (lambda ps: pyquant.Lion8bit(ps, weight_decay=float("nan")), "weight_decay"),
        (lambda ps: pyquant.Lion8bit(ps, is_paged=True), "is_paged"),
        (lambda ps: pyquant.Lion8bit(ps, nonfinite="zero"), "nonfinite"),
    ],
)
def test_refused_options(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.randn(10))])


@pytest.mark.parametrize("name", list(CASES))
def test_bad_inputs_are_refused_clearly(name):
    lr, options = CASES[name]
    wide = torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))
    wide.grad = torch.randn(5000, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        getattr(pyquant, name)([wide], lr=lr, **options[0]).step()
    p = torch.nn.Parameter(torch.randn(5000))
    opt = getattr(pyquant, name)([p], lr=lr, **options[0])
    p.grad = torch.randn(5000)
    opt.step()
    with torch.no_grad():
        p.data = torch.randn(6000)
    p.grad = torch.randn(6000)
    with pytest.raises(RuntimeError, match="changed size"):
        opt.step()
    q = torch.nn.Parameter(torch.randn(300))
    other = getattr(pyquant, name)([q], lr=lr, **options[0])
    q.grad = torch.randn(300)
    other.step()
    sd = other.state_dict()
    sd["state"][0]["__bnb_optimizer_quant_state__"]["state1"] = torch.full((300,), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        other.load_state_dict(sd)


@pytest.mark.parametrize("name", ["RMSprop8bit", "Adagrad8bit"])
def test_negative_squared_state_is_refused_on_load(name):
    q = torch.nn.Parameter(torch.randn(300))
    opt = getattr(pyquant, name)([q])
    q.grad = torch.randn(300)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["__bnb_optimizer_quant_state__"]["state1"] = -torch.ones(300)
    with pytest.raises(ValueError, match="negative"):
        opt.load_state_dict(sd)


# ---- the op's cpu kernel against the reference ----
def kernel_inputs(rule, dtype, eight_bit, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 255, 256, 257, 1000, 4099]
    params = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    grads = [(torch.randn(n, generator=g) * 0.1).to(dtype) for n in sizes]
    grads[4][7] = float("nan")
    grads[5][300] = float("inf")
    code = F.create_dynamic_map(signed=True)
    if eight_bit:
        states = [F.quantize_blockwise(torch.randn(n, generator=g).abs() if rule >= 2 else torch.randn(n, generator=g),
                                       code, 256) for n in sizes]
        state1, absmax1 = [s for s, _ in states], [a for _, a in states]
    else:
        state1 = [torch.randn(n, generator=g).abs() if rule >= 2 else torch.randn(n, generator=g) for n in sizes]
        absmax1 = [torch.empty(0) for _ in sizes]
    group = dict(lr=1e-2, betas=(0.9, 0.99) if rule == 1 else (0.9, 0.0), eps=1e-8, weight_decay=0.01)
    constants = torch.tensor([_contract.one_state_constants(group, 1 + i % 2, eight_bit) for i in range(len(sizes))])
    return params, grads, state1, absmax1, constants, code


def run_kernel(backend, rule, dtype, eight_bit, nonfinite, seed=0):
    params, grads, state1, absmax1, constants, code = kernel_inputs(rule, dtype, eight_bit, seed)
    with use_backend(backend):
        count = F.one_state_step_multi_tensor(params, grads, state1, absmax1, constants, code, rule, nonfinite)
    return params, state1, absmax1, int(count)


@needs_cpu_library
@pytest.mark.parametrize("nonfinite", [0, 1])
@pytest.mark.parametrize("eight_bit", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rule", list(_contract.ONE_STATE_RULES.values()), ids=list(_contract.ONE_STATE_RULES))
def test_cpu_kernel_equals_reference(isa, rule, dtype, eight_bit, nonfinite):
    assert_same_bits(run_kernel("cpu", rule, dtype, eight_bit, nonfinite),
                     run_kernel("reference", rule, dtype, eight_bit, nonfinite), "cpu vs reference", nan_blind=True)


@needs_cpu_library
def test_cpu_kernel_is_the_same_for_any_thread_count(outputs_by_thread_count):
    script = (
        "import hashlib, sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_optim_family import run_kernel\n"
        "h = hashlib.sha256()\n"
        "for rule in range(4):\n"
        "    for eight_bit in (True, False):\n"
        "        ps, ss, aa, c = run_kernel('cpu', rule, torch.bfloat16, eight_bit, 1)\n"
        "        for t in ps + ss + aa: h.update(t.contiguous().view(torch.uint8).numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    assert len(outputs_by_thread_count(script)) == 1


# ---- the op's triton kernel (kernels/one_state.py) against the reference and cpu backends ----
# Without a GPU the kernel runs on CPU tensors through Triton's interpreter; the `triton` mark (tests/conftest.py)
# makes the interpreter's fma exact and its sqrt_rn torch's CPU sqrt, the device's, so the bits must be equal.
def run_steps(backend, device, rule, dtype, eight_bit, nonfinite, steps=3):
    """`steps` calls of the op on `backend` with kernel_inputs' tensors on `device` (new gradients, with NaN and inf
    elements, and step counts each call); returns the tensors after the last one and every call's count."""
    params, _, state1, absmax1, _, code = kernel_inputs(rule, dtype, eight_bit, seed=0)
    params, state1, absmax1 = ([t.to(device) for t in ts] for ts in (params, state1, absmax1))
    counts = []
    for step in range(1, steps + 1):
        _, grads, _, _, constants, _ = kernel_inputs(rule, dtype, eight_bit, seed=step)
        grads[2][255] = -float("inf")  # the last element of a whole block
        grads[3][256] = float("nan")  # the only element of a partial last block
        with use_backend(backend):
            count = F.one_state_step_multi_tensor(params, [g.to(device) for g in grads], state1, absmax1, constants,
                                                  code.to(device), rule, nonfinite)
        counts.append(count)
    return params, state1, absmax1, counts


def triton_peers():
    """The (backend, device) pairs whose bits the triton backend must give: those on the kernel's device."""
    return [(name, dev) for name, dev in TRITON_PEERS if dev == TRITON_DEVICE]


@pytest.mark.triton
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rule", list(_contract.ONE_STATE_RULES.values()), ids=list(_contract.ONE_STATE_RULES))
def test_triton_kernel_equals_reference(rule, dtype, eight_bit, nonfinite):
    *ours, counts = run_steps("triton", TRITON_DEVICE, rule, dtype, eight_bit, nonfinite)
    bad = 4  # per call: kernel_inputs' NaN and inf, and run_steps' two
    for count in counts:
        assert count.dtype == torch.int64 and count.dim() == 0 and count.device.type == TRITON_DEVICE
        assert int(count) == (bad if nonfinite == _contract.SKIP_ELEMENT else 0)
    for name, dev in triton_peers():
        *theirs, their_counts = run_steps(name, dev, rule, dtype, eight_bit, nonfinite)
        assert [int(c) for c in counts] == [int(c) for c in their_counts], f"counts vs {name}"
        assert_same_bits(ours, theirs, f"triton vs {name}", nan_blind=True)
    params = ours[0]
    if nonfinite == _contract.SKIP_ELEMENT:
        assert all(torch.isfinite(p.float()).all() for p in params), "skip must keep every parameter finite"
    elif rule != _contract.ONE_STATE_RULES["lion"]:  # Lion's step is sign(u): 0 for a NaN u
        assert torch.isnan(params[4].float()).any(), "a NaN gradient should reach the parameter"


@pytest.mark.triton
@pytest.mark.parametrize("rule", list(_contract.ONE_STATE_RULES.values()), ids=list(_contract.ONE_STATE_RULES))
def test_triton_kernel_mixed_dtypes_in_one_call(rule):
    """One call with several (param dtype, grad dtype) pairs (one launch each, with its rows of the constants), 8-bit
    and float32 states, an empty tensor, and GradScaler's unscale fused in (inv_grad_scale != 1)."""
    g = torch.Generator().manual_seed(3)
    layout = [(4099, torch.bfloat16, torch.float32, True), (300, torch.float32, torch.float32, False),
              (0, torch.float16, torch.float16, False), (1000, torch.float16, torch.float16, True),
              (513, torch.float32, torch.bfloat16, True), (257, torch.bfloat16, torch.float32, False)]
    code = F.create_dynamic_map(signed=True)
    group = dict(lr=1e-2, betas=(0.9, 0.99) if rule == 1 else (0.9, 0.0), eps=1e-8, weight_decay=0.01)
    constants = torch.tensor([_contract.one_state_constants(group, 2, eight_bit, 2.0**-6)
                              for _, _, _, eight_bit in layout])
    tensors = []
    for n, p_dtype, g_dtype, eight_bit in layout:
        s = torch.randn(n, generator=g).abs() if rule >= 2 else torch.randn(n, generator=g)
        s, a = F.quantize_blockwise(s, code, 256) if eight_bit else (s, torch.empty(0))
        grad = (torch.randn(n, generator=g) * 64).to(g_dtype)
        tensors.append([torch.randn(n, generator=g).to(p_dtype), grad, s, a])
    runs = {}
    for name, dev in [("triton", TRITON_DEVICE)] + triton_peers():
        p, grads, s, a = ([t.clone().to(dev) for t in col] for col in zip(*tensors))
        with use_backend(name):
            count = F.one_state_step_multi_tensor(p, grads, s, a, constants, code.to(dev), rule, 0)
        runs[name] = (p, s, a, int(count))
    for name in runs:
        assert_same_bits(runs["triton"], runs[name], f"triton vs {name}", nan_blind=True)


@pytest.mark.triton
@pytest.mark.parametrize("name", list(CASES))
def test_triton_optimizer_end_to_end(name):
    """The optimizer class on the triton backend: the reference's (bitsandbytes') bits after every step."""
    lr, options = CASES[name]
    runs = {}
    for backend in ("triton", "reference"):
        params = [torch.nn.Parameter(p.detach().to(TRITON_DEVICE)) for p in make_params(torch.bfloat16)]
        opt = getattr(pyquant, name)(params, lr=lr, **options[1])
        history = []
        with use_backend(backend):
            for step in range(1, 4):
                for p, grad in zip(params, grads_for(params, step)):
                    p.grad = grad.to(TRITON_DEVICE)
                opt.step()
                history.append([p.detach().clone() for p in params] + [
                    t.clone() for t in (v for s in state_tensors(opt, params) for v in s.values())
                    if isinstance(t, torch.Tensor)])
        runs[backend] = history
    assert_same_bits(runs["triton"], runs["reference"], f"{name} triton vs reference")


@pytest.mark.triton
def test_triton_kernel_checks_operands_as_the_cpu_backend():
    p = torch.zeros(64, 2, device=TRITON_DEVICE).t()
    constants = torch.tensor([_contract.one_state_constants(dict(lr=0.1, betas=(0.9, 0.0), eps=1e-8, weight_decay=0),
                                                            1, False)])
    code = F.create_dynamic_map(signed=True).to(TRITON_DEVICE)
    kernel = pyquant.backends.lookup("one_state_step", "triton")
    with pytest.raises(ValueError, match="contiguous"):
        kernel([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.empty(0)], constants, code, 0, 0)
    q = torch.zeros(300, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="rule"):
        kernel([q], [q.clone()], [q.clone()], [torch.empty(0)], constants, code, 7, 0)
    with pytest.raises(ValueError, match="absmax1 0 has 0 elements, expected 2"):
        kernel([q], [q.clone()], [q.to(torch.uint8)], [torch.empty(0, device=TRITON_DEVICE)], constants, code, 0, 0)


@pytest.mark.triton
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("rule", [_contract.ONE_STATE_RULES["rmsprop"], _contract.ONE_STATE_RULES["adagrad"]],
                         ids=["rmsprop", "adagrad"])
def test_triton_kernel_ieee_sqrt(monkeypatch, rule, eight_bit):
    """With an IEEE square root everywhere (tl.sqrt_rn and torch.sqrt on a GPU) the kernel still equals the
    reference: the only sqrt-dependent difference is the device's sqrt itself (as tests/test_optimizer_kernels.py
    shows for Adam)."""
    if pyquant.backends.triton_interpreted():
        import numpy as np
        from triton.runtime import interpreter

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_precise_sqrt",
                            lambda self, arg: interpreter.TensorHandle(np.sqrt(arg.data), arg.dtype.scalar))
    torch_sqrt = torch.sqrt
    monkeypatch.setattr(torch, "sqrt", lambda x: torch_sqrt(x.double()).to(x.dtype))  # exact, then one rounding
    ours = run_steps("triton", TRITON_DEVICE, rule, torch.float32, eight_bit, 0, steps=2)
    theirs = run_steps("reference", TRITON_DEVICE, rule, torch.float32, eight_bit, 0, steps=2)
    assert_same_bits(ours[:3], theirs[:3], "triton vs reference, IEEE sqrt", nan_blind=True)


# ======== the op's cuda kernel (csrc/cuda/one_state.cu) on a GPU: against the cpu kernel, and end to end ========
# Self-contained: it uses kernel_inputs and the optimizer helpers above, conftest's `ieee_cpu_sqrt` fixture (the cpu and
# cuda kernels, the CPU library's square root made IEEE as the GPU's) and the `gpu` mark.
CUDA_STEPS = 3


def cuda_step_grads(params, step, dtype):
    """The gradients of a step after the first (kernel_inputs gives the first's), with a NaN and an inf again."""
    g = torch.Generator().manual_seed(500 + step)
    grads = [(torch.randn(p.shape, generator=g) * 0.1).to(dtype) for p in params]
    grads[3][100] = float("nan")
    grads[5][4098] = -float("inf")  # in the partial last block
    return grads


@pytest.mark.gpu
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rule", list(_contract.ONE_STATE_RULES.values()), ids=list(_contract.ONE_STATE_RULES))
def test_cuda_kernel_equals_cpu(ieee_cpu_sqrt, rule, dtype, eight_bit, nonfinite):
    """Several steps of one group (sizes 1 to 4099: partial last blocks, a lone element), the same inputs on both."""
    cpu, cuda = ieee_cpu_sqrt
    params, grads, state1, absmax1, constants, code = kernel_inputs(rule, dtype, eight_bit, seed=rule)
    host = dict(params=params, state1=state1, absmax1=absmax1)
    dev = {k: [t.cuda() for t in v] for k, v in host.items()}
    group = dict(lr=1e-2, betas=(0.9, 0.99) if rule == 1 else (0.9, 0.0), eps=1e-8, weight_decay=0.01)
    for step in range(1, CUDA_STEPS + 1):
        if step > 1:
            grads = cuda_step_grads(params, step, dtype)
            constants = torch.tensor(
                [_contract.one_state_constants(group, step + i % 2, eight_bit) for i in range(len(params))]
            )
        counts = [
            int(ops["one_state_step"](st["params"], [g.to(device) for g in grads], st["state1"], st["absmax1"],
                                      constants, code.to(device), rule, nonfinite))
            for ops, device, st in ((cpu, "cpu", host), (cuda, "cuda", dev))
        ]
        assert counts[1] == counts[0] == (2 if nonfinite == 0 else 0), f"step {step}: non-finite counts"
        for key in host:
            assert_same_bits(dev[key], host[key], f"step {step}: {key}", nan_blind=True)


@pytest.mark.gpu
def test_cuda_kernel_group_of_many_tensors_in_one_launch(ieee_cpu_sqrt):
    """Many tensors and blocks in one launch (the block -> tensor search), fresh all-zero 8-bit states, an empty
    tensor, mixed parameter and gradient dtypes."""
    cpu, cuda = ieee_cpu_sqrt
    g = torch.Generator().manual_seed(13)
    sizes = [int(s) for s in torch.randint(1, 20_000, (40,), generator=g)] + [0, 1_000_003]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    params = [torch.randn(n, generator=g).to(dtypes[i % 3]) for i, n in enumerate(sizes)]
    grads = [(torch.randn(n, generator=g) * 1e-2).to(dtypes[(i + 1) % 3]) for i, n in enumerate(sizes)]
    eight = [n >= 4096 for n in sizes]
    code = F.create_dynamic_map(signed=True)
    for rule in _contract.ONE_STATE_RULES.values():
        group = dict(lr=1e-3, betas=(0.9, 0.99) if rule == 1 else (0.9, 0.0), eps=1e-8, weight_decay=0.0)
        constants = torch.tensor([_contract.one_state_constants(group, 1, e) for e in eight])
        host = dict(
            params=[p.clone() for p in params],
            state1=[torch.zeros(n, dtype=torch.uint8 if e else torch.float32) for n, e in zip(sizes, eight)],
            absmax1=[torch.zeros(-(-n // 256) if e else 0) for n, e in zip(sizes, eight)],
        )
        dev = {k: [t.cuda() for t in v] for k, v in host.items()}
        cpu["one_state_step"](host["params"], grads, host["state1"], host["absmax1"], constants, code, rule, 0)
        bad = cuda["one_state_step"](dev["params"], [t.cuda() for t in grads], dev["state1"], dev["absmax1"],
                                     constants, code.cuda(), rule, 0)
        assert int(bad) == 0 and bad.device.type == "cuda"
        for key in host:
            assert_same_bits(dev[key], host[key], f"rule {rule}: {key}", nan_blind=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_on_cuda_tensors_equals_cpu(ieee_cpu_sqrt, name, dtype):
    """Each optimizer on CUDA parameters (the cuda backend's kernel) against the same optimizer on CPU parameters
    (the cpu backend), bit for bit after every step: 8-bit and float32 states, partial blocks, each option set."""
    lr, options = CASES[name]
    for option in options:
        cpu_p = make_params(dtype)
        cuda_p = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_p]
        cpu_opt = getattr(pyquant, name)(cpu_p, lr=lr, **option)
        cuda_opt = getattr(pyquant, name)(cuda_p, lr=lr, **option)
        for step in range(1, 5):
            for p, c, grad in zip(cpu_p, cuda_p, grads_for(cpu_p, step)):
                p.grad, c.grad = grad, grad.cuda()
            with use_backend("cpu"):
                cpu_opt.step()
            with use_backend("cuda"):
                cuda_opt.step()
            assert_same_bits(list(cuda_p), list(cpu_p), f"{name} {option} params, step {step}")
            assert_same_bits(state_tensors(cuda_opt, cuda_p), state_tensors(cpu_opt, cpu_p),
                             f"{name} {option} states, step {step}")
        assert [cuda_opt.state[p]["state1"].device.type for p in cuda_p] == ["cuda"] * len(SHAPES)


@pytest.mark.gpu
def test_cuda_kernel_refuses_what_the_cpu_kernel_refuses(cuda_backends):
    """The cuda kernel runs the cpu backend's argument checks before anything reaches the device."""
    _cpu, cuda = cuda_backends
    params, grads, state1, absmax1, constants, code = kernel_inputs(2, torch.float32, True, seed=0)
    args = dict(params=[t.cuda() for t in params], grads=[t.cuda() for t in grads], state1=[t.cuda() for t in state1],
                absmax1=[t.cuda() for t in absmax1], constants=constants, code1=code.cuda(), rule=2, nonfinite=0)
    for change, match in (
        (dict(state1=args["state1"][:4] + [args["state1"][4][:-1]] + args["state1"][5:]), "state1 4 has 999 elements"),
        (dict(grads=[grads[0]] + args["grads"][1:]), "grad 0 is on cpu"),
        (dict(rule=7), "rule must be one of"),
        (dict(nonfinite=2), "nonfinite must be 0"),
    ):
        with pytest.raises(ValueError, match=match):
            cuda["one_state_step"](**{**args, **change})
