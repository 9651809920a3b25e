"""The Adam step kernels (`adam_step`, the op under pyquant's optimizers) on every backend, bit for bit.

- the triton backend (pyquant.kernels) against the reference and cpu backends: without a GPU the kernels run on
  CPU tensors through Triton's interpreter (the `triton` mark, tests/conftest.py), whose fma is then replaced by
  an exact one so that `tl.fma` rounds once, as on a GPU, and whose `tl.sqrt_rn` by torch's CPU sqrt, the square
  root the reference and cpu backends use on CPU tensors (MKL's, not IEEE: see tests/triton_exact_fma.py);
- the cuda backend (csrc/cuda) against the cpu backend and the reference on the GPU (skipped with "needs a CUDA
  device" without one).

The optimizer classes (pyquant.Adam8bit, ...) are tests/test_optim.py's. NaN payloads are not part of the
contract (x86 propagates an input NaN's payload, GPUs produce a canonical NaN), so NaNs are compared by position.
"""

from __future__ import annotations

import pytest
import torch

import pyquant
from pyquant import _contract, backends
from pyquant.backends import capi
from pyquant import functional as F
from pyquant.backends.reference import blockwise as reference_blockwise
from pyquant.backends.reference import optimizer as reference_optimizer

from conftest import TRITON_DEVICE, TRITON_PEERS, assert_same_bits, bits, needs_cpu_library


def constants_row(step: int, eight_bit: bool, *, lr: float, wd: float = 0.0, inv_grad_scale: float = 1.0,
                  betas=(0.9, 0.999), eps: float = 1e-8) -> list[float]:
    group = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd)
    return _contract.adam_constants(group, step, eight_bit, inv_grad_scale)


# ---- the triton backend: the fma it relies on ----
@pytest.mark.triton
def test_interpreter_fma_is_patched_exact():
    if not backends.triton_interpreted():
        pytest.skip("runs on a GPU: tl.fma is a real fused multiply-add there")
    from triton_exact_fma import interpreter_fma_is_exact

    assert interpreter_fma_is_exact()


@pytest.mark.triton
def test_exact_fma_matches_reference_fma32():
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(a_ptr + offs, mask=mask)
        b = tl.load(b_ptr + offs, mask=mask)
        c = tl.load(c_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, tl.fma(a, b, c), mask=mask)

    gen = torch.Generator().manual_seed(1)
    n = 3000
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    c = -(a.double() * b.double()).float() + torch.randn(n, generator=gen) * 1e-6  # heavy cancellation
    a, b, c = (t.to(TRITON_DEVICE) for t in (a, b, c))
    out = torch.empty_like(a)
    fma_kernel[(triton.cdiv(n, 1024),)](a, b, c, out, n, BLOCK=1024, enable_fp_fusion=False)
    assert_same_bits(out, reference_optimizer.fma32(a, b, c), "tl.fma vs fma32", nan_blind=True)
    assert not torch.equal(bits(out, nan_blind=True), bits(a * b + c, nan_blind=True)), (
        "the case should distinguish fma from a*b+c"
    )


# ---- the triton backend against the reference and cpu backends ----
LR = 1e-2
# (numel, param dtype, grad dtype, 8-bit states, weight decay): 8-bit tensors have numel >= 4096 and not a
# multiple of 256; the rest keep float32 states.
ADAM_TENSORS = (
    (4099, torch.float32, torch.float32, True, 0.01),
    (4608 + 77, torch.bfloat16, torch.bfloat16, True, 0.0),
    (4200, torch.float16, torch.float16, True, 0.01),
    (300, torch.float32, torch.float32, False, 0.01),
    (257, torch.bfloat16, torch.bfloat16, False, 0.0),
    (1000, torch.float16, torch.float16, False, 0.0),
    (4100, torch.bfloat16, torch.float32, True, 0.01),  # grads in float32 for a bfloat16 parameter
)


# The numel of the tensor with full blocks of zero gradients and moments, and of subnormal ones
# (make_adam_problem, make_grads).
SPECIAL_BLOCKS_NUMEL = 4099


def adam_constants(step: int, inv_grad_scale: float = 1.0) -> torch.Tensor:
    rows = [constants_row(step, eight_bit, lr=LR, wd=wd, inv_grad_scale=inv_grad_scale)
            for _, _, _, eight_bit, wd in ADAM_TENSORS]
    return torch.tensor(rows, dtype=torch.float32)


def make_adam_problem(seed: int):
    """Parameters and non-zero initial states (8-bit states quantised from random moments)."""
    gen = torch.Generator().manual_seed(seed)
    code1, code2 = F.create_dynamic_map(True), F.create_dynamic_map(False)
    tensors = []
    for numel, p_dtype, g_dtype, eight_bit, _ in ADAM_TENSORS:
        p = torch.randn(numel, generator=gen).to(p_dtype)
        m = torch.randn(numel, generator=gen) * 1e-2
        v = torch.rand(numel, generator=gen) * 1e-4
        if numel == SPECIAL_BLOCKS_NUMEL:
            m[256:512] = 0.0  # with make_grads' zero gradients: a block whose moments stay 0 (absmax 0) and one
            v[256:768] = 0.0  # whose second moment alone does, which the kernels' requantisation special-cases;
            m[768:1024] = 0.0  # with subnormal gradients, a first moment whose absmax has an infinite inverse
        if eight_bit:
            s1, a1 = reference_blockwise.quantize_blockwise(m, code1, 256)
            s2, a2 = reference_blockwise.quantize_blockwise(v, code2, 256)
        else:
            s1, s2, a1, a2 = m, v, torch.empty(0), torch.empty(0)
        tensors.append([p, s1, s2, a1, a2])
    return tensors, code1, code2


def make_grads(step: int, seed: int):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads = []
    for i, (numel, _, g_dtype, _, _) in enumerate(ADAM_TENSORS):
        g = torch.randn(numel, generator=gen) * 10 ** torch.randint(-4, 1, (numel,), generator=gen).float()
        if numel == SPECIAL_BLOCKS_NUMEL:
            g[256:768] = 0.0
            g[768:1024] = torch.randn(256, generator=gen) * 1e-39
        if i == 0 or (i == 3 and step == 2):
            g[17] = float("nan")
        if i == 1:
            g[300] = float("inf")
            g[301] = -float("inf")
        if i == 4:
            g[256] = float("nan")  # the only element of the last 256-block
        grads.append(g.to(g_dtype))
    return grads


def clone_to(tensors, device):
    return [[t.clone().to(device) for t in group] for group in tensors]


def run_adam(name: str, device: str, tensors, grads, step: int, code1, code2, nonfinite: int):
    fn = backends.lookup("adam_step", name)
    cols = list(zip(*tensors))
    return fn(
        list(cols[0]), [g.to(device) for g in grads], list(cols[1]), list(cols[2]), list(cols[3]), list(cols[4]),
        adam_constants(step), code1.to(device), code2.to(device), nonfinite,
    )


@needs_cpu_library
@pytest.mark.parametrize("nonfinite", (_contract.SKIP_ELEMENT, _contract.PROPAGATE), ids=("skip", "propagate"))
def test_adam_step_of_every_cpu_build_equals_the_reference(isa, nonfinite):
    """Each instruction-set build's Adam step (the AVX2 and AVX-512 kernels have their own lookups and loops) on
    tensors whose last blocks are partial, in three dtypes, with NaN and inf gradients: the reference's bits. The
    last step's count makes the bias correction c2 exactly 1 in float32, which the AVX-512 kernels' common path
    takes without dividing by it."""
    tensors, code1, code2 = make_adam_problem(seed=3)
    runs = {name: clone_to(tensors, "cpu") for name in ("cpu", "reference")}
    late = 20000
    assert adam_constants(late)[0, _contract.CONSTANT_FIELDS.index("c2")] == 1.0
    assert adam_constants(3)[0, _contract.CONSTANT_FIELDS.index("c2")] < 1.0
    for step in (1, 2, 3, late):
        grads = make_grads(step, seed=3)
        counts = {name: int(run_adam(name, "cpu", ts, grads, step, code1, code2, nonfinite)) for name, ts in runs.items()}
        expected_bad = sum(int((~torch.isfinite(g.float())).sum()) for g in grads)
        assert counts["cpu"] == counts["reference"] == (expected_bad if nonfinite == _contract.SKIP_ELEMENT else 0)
        for i, (actual, expected) in enumerate(zip(runs["cpu"], runs["reference"])):
            for field, a, e in zip(("param", "state1", "state2", "absmax1", "absmax2"), actual, expected):
                assert_same_bits(a, e, f"{_contract.ISA_NAMES[isa]} build, step {step}, tensor {i} {field}", nan_blind=True)


@needs_cpu_library
@pytest.mark.parametrize("c2", [1.0, 0.5, 1.0 - 2.0**-24, 0.0316227766, 2.0**-60, 2.0**-61, 3.0, 0.0],
                         ids=["1", "0.5", "below-1", "beta2-0.999", "2^-60", "2^-61", "3", "0"])
@pytest.mark.parametrize("sqrt", ["torch", "ieee"])
def test_adam_8bit_bias_correction_of_every_cpu_build_equals_the_reference(isa, c2, sqrt, monkeypatch):
    """root / c2 of the 8-bit update: the AVX-512 builds take it from the reciprocal of c2 with two corrections
    (exact for c2 in [2^-60, 1] and the roots of the emulated sqrt's common path), the division elsewhere. Values
    of c2 on both sides of that range, as a constants row may hold them (Adam's own lie in (0, 1]), give the
    reference's bits on second moments across the float range, with zero, tiny and overflowing ones; also with an
    IEEE sqrt on both sides, whose every root takes the library's common path."""
    routine = capi._torch_cpu_sqrt()  # before torch.sqrt is patched: it probes torch.sqrt
    if sqrt == "ieee":
        torch_sqrt = torch.sqrt
        monkeypatch.setattr(torch, "sqrt", lambda x: torch_sqrt(x.double()).to(x.dtype))  # exact, then one rounding
        capi.cpu_library().pq_set_cpu_sqrt(None)
    try:
        run_bias_correction_case(isa, c2)
    finally:
        capi.cpu_library().pq_set_cpu_sqrt(routine)


def run_bias_correction_case(isa, c2):
    gen = torch.Generator().manual_seed(5)
    n = 4096
    code1, code2 = F.create_dynamic_map(True), F.create_dynamic_map(False)
    m = torch.randn(n, generator=gen)
    v = torch.rand(n, generator=gen) * torch.exp2(torch.randint(-120, 120, (n,), generator=gen).float())
    v[:256] = 0.0  # a block of zero second moments: with the gradients below, roots of zero and subnormal ones
    s1, a1 = reference_blockwise.quantize_blockwise(m, code1, 256)
    s2, a2 = reference_blockwise.quantize_blockwise(v, code2, 256)
    row = constants_row(1, True, lr=1e-3)
    row[_contract.CONSTANT_FIELDS.index("c2")] = c2
    constants = torch.tensor([row], dtype=torch.float32)
    grad = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-60, 60, (n,), generator=gen).float())
    grad[:8] = 0.0  # roots of zero
    grad[8:16] = 1e-20  # subnormal second moments, tiny roots
    grad[16:24] = 2.0**70  # v overflows: infinite roots
    runs = {}
    for name in ("cpu", "reference"):
        ts = [torch.randn(n, generator=torch.Generator().manual_seed(6)), s1.clone(), s2.clone(), a1.clone(), a2.clone()]
        backends.lookup("adam_step", name)([ts[0]], [grad], [ts[1]], [ts[2]], [ts[3]], [ts[4]], constants, code1, code2,
                                           _contract.SKIP_ELEMENT)
        runs[name] = ts
    for field, a, e in zip(("param", "state1", "state2", "absmax1", "absmax2"), runs["cpu"], runs["reference"]):
        assert_same_bits(a, e, f"{_contract.ISA_NAMES[isa]} build, c2 {c2}, {field}", nan_blind=True)


@needs_cpu_library
def test_adam_sqrt_of_every_cpu_build_equals_torch_over_the_float_range(isa):
    """The builds emulate torch's CPU sqrt (MKL's vsSqrt: csrc/cpu/cpu_sqrt.h, one emulation per MKL kernel) and
    call vsSqrt for the inputs they do not cover. Second moments of every exponent, subnormals and the largest
    floats included, each halved by the step (beta2 = 0.5, zero gradient) and then rooted, as Adam's float32-state
    step divides by the root alone (eps = 0): a root one ulp off changes the parameter, and the reference takes
    torch.sqrt itself."""
    gen = torch.Generator().manual_seed(11)
    exponents = torch.arange(-149, 128).repeat_interleave(64).float()
    v = (torch.rand(exponents.numel(), generator=gen) + 1.0) * torch.exp2(exponents)  # inf beyond FLT_MAX
    v = torch.cat([v[torch.isfinite(v)], torch.tensor([0.0, -0.0, 1e-45, 3e38, 2.0**-78, 2.0**-79, 2.0**-77])])
    n = v.numel()
    group = dict(lr=1.0, betas=(0.5, 0.5), eps=0.0, weight_decay=0.0)
    constants = torch.tensor([_contract.adam_constants(group, 1, False, 1.0)], dtype=torch.float32)
    code1, code2 = F.create_dynamic_map(True), F.create_dynamic_map(False)
    runs = {}
    for name in ("cpu", "reference"):
        p, m, state2 = torch.zeros(n), torch.ones(n), v.clone()
        backends.lookup("adam_step", name)(
            [p], [torch.zeros(n)], [m], [state2], [torch.empty(0)], [torch.empty(0)], constants, code1, code2,
            _contract.SKIP_ELEMENT,
        )
        runs[name] = (p, state2)
    assert_same_bits(runs["cpu"][1], runs["reference"][1], "the halved second moments", nan_blind=True)
    assert_same_bits(runs["cpu"][0], runs["reference"][0], f"{_contract.ISA_NAMES[isa]} build's roots", nan_blind=True)


@pytest.mark.triton
@pytest.mark.parametrize("nonfinite", (_contract.SKIP_ELEMENT, _contract.PROPAGATE), ids=("skip", "propagate"))
def test_adam_step_bits(nonfinite):
    tensors, code1, code2 = make_adam_problem(seed=5)
    runs = {"triton": (TRITON_DEVICE, clone_to(tensors, TRITON_DEVICE))}
    # The step's square root is torch's on the tensors' device (docs/numerics.md): on a GPU, IEEE; on a CPU,
    # MKL's, up to 1 ulp away. Bits are compared on the same device; GPU against CPU is bench/gpu/check.sh's.
    for name, dev in TRITON_PEERS:
        if dev == TRITON_DEVICE:
            runs[name] = (dev, clone_to(tensors, dev))
    for step in (1, 2, 3):
        grads = make_grads(step, seed=5)
        counts = {name: run_adam(name, dev, ts, grads, step, code1, code2, nonfinite) for name, (dev, ts) in runs.items()}
        expected_bad = sum(int((~torch.isfinite(g.float())).sum()) for g in grads)
        assert int(counts["triton"]) == (expected_bad if nonfinite == _contract.SKIP_ELEMENT else 0)
        assert counts["triton"].dtype == torch.int64 and counts["triton"].dim() == 0
        for name, (_, ts) in runs.items():
            if name == "triton":
                continue
            assert int(counts[name]) == int(counts["triton"]), f"count vs {name}"
            for i, (actual, expected) in enumerate(zip(runs["triton"][1], ts)):
                for field, a, e in zip(("param", "state1", "state2", "absmax1", "absmax2"), actual, expected):
                    assert_same_bits(a, e, f"step {step}, tensor {i} {field} vs {name}", nan_blind=True)
    if nonfinite == _contract.PROPAGATE:
        assert torch.isnan(runs["triton"][1][0][0].float()).any(), "a NaN gradient should reach the parameter"
    else:
        for p, *_ in runs["triton"][1]:
            assert torch.isfinite(p.float()).all(), "skip mode must keep every parameter finite"


@pytest.mark.triton
def test_adam_step_ieee_sqrt(monkeypatch):
    """With an IEEE square root everywhere (what tl.sqrt_rn and torch.sqrt compute on a GPU) the kernel still
    equals the reference: the only sqrt-dependent difference is the device's sqrt itself."""
    if backends.triton_interpreted():
        import numpy as np
        from triton.runtime import interpreter

        monkeypatch.setattr(  # the interpreter's own sqrt_rn: numpy's correctly rounded float32 sqrt
            interpreter.InterpreterBuilder,
            "create_precise_sqrt",
            lambda self, arg: interpreter.TensorHandle(np.sqrt(arg.data), arg.dtype.scalar),
        )
    torch_sqrt = torch.sqrt
    monkeypatch.setattr(torch, "sqrt", lambda x: torch_sqrt(x.double()).to(x.dtype))  # exact, then one rounding
    tensors, code1, code2 = make_adam_problem(seed=11)
    runs = {name: clone_to(tensors, TRITON_DEVICE) for name in ("triton", "reference")}
    for step in (1, 2):
        grads = make_grads(step, seed=11)
        for name, ts in runs.items():
            run_adam(name, TRITON_DEVICE, ts, grads, step, code1, code2, _contract.SKIP_ELEMENT)
    for i, (actual, expected) in enumerate(zip(runs["triton"], runs["reference"])):
        for a, e in zip(actual, expected):
            assert_same_bits(a, e, f"tensor {i}, IEEE sqrt", nan_blind=True)


@pytest.mark.triton
@pytest.mark.parametrize("inv_grad_scale", [1.0, 2.0**-7])
def test_adam_step_through_custom_op(inv_grad_scale):
    """The public multi-tensor entry point selects the triton backend and agrees with the reference, also with
    GradScaler's unscale fused into the step (gradients multiplied by 1/scale and rounded to their dtype)."""
    tensors, code1, code2 = make_adam_problem(seed=9)
    results = {}
    for name in ("triton", "reference"):
        ts = clone_to(tensors, TRITON_DEVICE)
        grads = [g.to(TRITON_DEVICE) for g in make_grads(1, seed=9)]
        cols = list(zip(*ts))
        with pyquant.use_backend(name):
            count = F.adam_step_multi_tensor(
                cols[0], grads, cols[1], cols[2], cols[3], cols[4], adam_constants(1, inv_grad_scale),
                code1.to(TRITON_DEVICE), code2.to(TRITON_DEVICE), _contract.SKIP_ELEMENT,
            )
        results[name] = (int(count), ts)
    assert results["triton"][0] == results["reference"][0] > 0
    for actual, expected in zip(results["triton"][1], results["reference"][1]):
        for a, e in zip(actual, expected):
            assert_same_bits(a, e, "custom op vs reference", nan_blind=True)


@pytest.mark.triton
def test_adam_step_rejects_non_contiguous():
    p = torch.zeros(64, 2, device=TRITON_DEVICE).t()
    g = torch.zeros_like(p)
    s = torch.zeros(2, 64, device=TRITON_DEVICE)
    constants = torch.tensor([constants_row(1, False, lr=LR)], dtype=torch.float32)
    code = F.create_dynamic_map(True).to(TRITON_DEVICE)
    empty = torch.empty(0, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        backends.lookup("adam_step", "triton")([p], [g], [s], [s.clone()], [empty], [empty.clone()], constants, code,
                                               code, 0)


# ---- the cuda backend against the cpu backend and the reference ----
# (numel, 8-bit states, param dtype, grad dtype, weight decay): 8-bit and float32 states, partial last
# blocks, an empty tensor, mixed param/grad dtypes.
GROUP = [
    (5000, True, torch.float32, torch.float32, 0.0),
    (4096 * 2 + 77, True, torch.float16, torch.float16, 0.01),
    (300, False, torch.float32, torch.float32, 0.0),
    (0, False, torch.float32, torch.float32, 0.0),
    (4095, False, torch.bfloat16, torch.bfloat16, 0.1),
    (256 * 3, True, torch.bfloat16, torch.bfloat16, 0.0),
    (1, False, torch.float16, torch.float32, 0.0),
    (6000, True, torch.float32, torch.bfloat16, 0.05),
]


def make_group(seed: int):
    g = torch.Generator().manual_seed(seed)
    code1, code2 = F.create_dynamic_map(True), F.create_dynamic_map(False)
    tensors = {"params": [], "state1": [], "state2": [], "absmax1": [], "absmax2": []}
    for i, (n, eight_bit, pdt, _gdt, _wd) in enumerate(GROUP):
        tensors["params"].append((torch.randn(n, generator=g) * 0.1).to(pdt))
        if eight_bit:
            blocks = -(-n // 256)
            if i % 2:  # fresh states, as an optimizer creates them
                tensors["state1"].append(torch.zeros(n, dtype=torch.uint8))
                tensors["state2"].append(torch.zeros(n, dtype=torch.uint8))
                tensors["absmax1"].append(torch.zeros(blocks))
                tensors["absmax2"].append(torch.zeros(blocks))
            else:  # warm states
                quantize = backends.kernels_of("cpu")["quantize_blockwise"]
                q1, a1 = quantize(torch.randn(n, generator=g) * 1e-3, code1, 256)
                q2, a2 = quantize(torch.rand(n, generator=g) * 1e-6, code2, 256)
                for key, val in (("state1", q1), ("absmax1", a1), ("state2", q2), ("absmax2", a2)):
                    tensors[key].append(val)
        else:
            tensors["state1"].append(torch.randn(n, generator=g) * 1e-3)
            tensors["state2"].append(torch.rand(n, generator=g) * 1e-6)
            tensors["absmax1"].append(torch.zeros(0))
            tensors["absmax2"].append(torch.zeros(0))
    return tensors, code1, code2


def make_group_grads(step: int, bad_fraction: float):
    g = torch.Generator().manual_seed(1000 + step)
    grads = []
    for n, _eight_bit, _pdt, gdt, _wd in GROUP:
        grad = torch.randn(n, generator=g) * torch.exp2(torch.randint(-12, 2, (n,), generator=g).float())
        if bad_fraction and n:
            pick = torch.rand(n, generator=g) < bad_fraction
            bad = torch.tensor([float("nan"), float("inf"), -float("inf")])
            grad[pick] = bad[torch.randint(0, 3, (int(pick.sum()),), generator=g)]
        grads.append(grad.to(gdt))
    return grads


def run_adam_steps(ops_a, device_a, ops_b, device_b, nonfinite, bad_fraction, steps=5):
    """Run the same steps on two backends (each on its own copies) and compare everything after each step."""
    host, code1, code2 = make_group(seed=nonfinite)
    a = {k: [t.to(device_a) for t in v] for k, v in host.items()}
    b = {k: [t.to(device_b) for t in v] for k, v in host.items()}
    for step in range(1, steps + 1):
        # Per-tensor step counts may differ inside a group: offset some tensors' counts.
        constants = torch.tensor(
            [constants_row(step + (i % 3), eight_bit, lr=1e-3, wd=wd)
             for i, (_n, eight_bit, _p, _g, wd) in enumerate(GROUP)],
            dtype=torch.float32,
        )
        grads = make_group_grads(step, bad_fraction if step in (2, 4) else 0.0)
        counts = []
        for ops, dev, st in ((ops_a, device_a, a), (ops_b, device_b, b)):
            counts.append(int(ops["adam_step"](
                st["params"], [g.to(dev) for g in grads], st["state1"], st["state2"], st["absmax1"], st["absmax2"],
                constants, code1.to(dev), code2.to(dev), nonfinite,
            )))
        assert counts[0] == counts[1], f"step {step}: non-finite counts differ"
        if nonfinite == 0 and bad_fraction and step in (2, 4):
            assert counts[1] > 0
        for key in host:
            for i, (x, y) in enumerate(zip(a[key], b[key])):
                assert_same_bits(y, x, f"step {step}, {key}[{i}] {GROUP[i]}", nan_blind=True)


@pytest.mark.gpu
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
@pytest.mark.parametrize("bad_fraction", [0.0, 0.01], ids=["finite", "nonfinite"])
def test_adam_step_matches_cpu(ieee_cpu_sqrt, nonfinite, bad_fraction):
    cpu, cuda = ieee_cpu_sqrt
    run_adam_steps(cpu, "cpu", cuda, "cuda", nonfinite, bad_fraction)


@pytest.mark.gpu
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
def test_adam_step_matches_reference_on_gpu(cuda_backends, nonfinite):
    """The torch specification on CUDA tensors (torch's GPU sqrt and division are IEEE) against the kernels."""
    _cpu_ops, cuda = cuda_backends
    run_adam_steps(backends.kernels_of("reference"), "cuda", cuda, "cuda", nonfinite, 0.01)


@pytest.mark.gpu
def test_adam_step_large_group_one_launch(ieee_cpu_sqrt):
    """Many tensors and many blocks in one launch (the block -> tensor search over the prefix sums)."""
    cpu, cuda = ieee_cpu_sqrt
    g = torch.Generator().manual_seed(11)
    sizes = [int(s) for s in torch.randint(1, 40_000, (60,), generator=g)] + [4_000_000]
    code1, code2 = F.create_dynamic_map(True), F.create_dynamic_map(False)
    params = [torch.randn(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g) * 1e-2 for n in sizes]
    eight = [n >= 4096 for n in sizes]
    s1 = [torch.zeros(n, dtype=torch.uint8) if e else torch.zeros(n) for n, e in zip(sizes, eight)]
    s2 = [torch.zeros(n, dtype=torch.uint8) if e else torch.zeros(n) for n, e in zip(sizes, eight)]
    a1 = [torch.zeros(-(-n // 256) if e else 0) for n, e in zip(sizes, eight)]
    a2 = [torch.zeros(-(-n // 256) if e else 0) for n, e in zip(sizes, eight)]
    constants = torch.tensor([constants_row(1, e, lr=1e-3) for e in eight], dtype=torch.float32)
    dev = [[t.cuda() for t in ts] for ts in (params, s1, s2, a1, a2)]
    cpu["adam_step"](params, grads, s1, s2, a1, a2, constants, code1, code2, 0)
    bad = cuda["adam_step"](dev[0], [t.cuda() for t in grads], *dev[1:], constants, code1.cuda(), code2.cuda(), 0)
    assert int(bad) == 0
    names = ("params", "state1", "state2", "absmax1", "absmax2")
    for name, host_list, dev_list in zip(names, (params, s1, s2, a1, a2), dev):
        for i, (c, d) in enumerate(zip(host_list, dev_list)):
            assert_same_bits(d, c, f"{name}[{i}] (numel {sizes[i]})", nan_blind=True)
