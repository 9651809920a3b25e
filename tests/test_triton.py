"""The triton backend (pyquant.kernels) against the reference and cpu backends, bit for bit.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); its fma is then replaced by an exact one so that `tl.fma` rounds once, as on a GPU,
and its `tl.sqrt_rn` by torch's CPU sqrt, which is the square root the reference and cpu backends use on
CPU tensors (MKL's, not IEEE: see tests/triton_exact_fma.py). Sizes are small: the interpreter is slow.

"Bit equality" is torch.equal on integer views. The one relaxation: NaN payloads and signs are not part of
the contract (torch's own float32 -> bfloat16 rounding turns every NaN into 0xFFFF, blockwise.h keeps the
sign, GPUs produce a canonical NaN), so NaNs are compared by position only.
"""

from __future__ import annotations

import os

import pytest
import torch

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton cannot be imported: {exc}", allow_module_level=True)

import pyquant
from pyquant import _contract, backends
from pyquant.backends.reference import blockwise as reference_blockwise
from pyquant.backends.reference import optimizer as reference_optimizer
from pyquant import functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if DEVICE == "cpu" and not INTERPRETED:  # pragma: no cover
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: triton cannot run", allow_module_level=True)

import pyquant.kernels  # noqa: E402,F401  (after TRITON_INTERPRET is settled)
from triton_exact_fma import interpreter_as_device, interpreter_fma_is_exact  # noqa: E402

# numpy's warnings from inside the interpreter (inf * 0, overflow to inf on a float16 store) are expected.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
HAVE_CPU_BACKEND = backends.available("cpu", "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (64, 256, 100, 4096, 5000)  # 5000 > the kernel's 4096-column tile: the chunked path


@pytest.fixture(autouse=True)
def _interpreter_as_device():
    if INTERPRETED:
        with interpreter_as_device():
            yield
    else:
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of `t` on the CPU, with every NaN replaced by one pattern (see the module docstring)."""
    t = t.detach().cpu()
    if not t.is_floating_point():
        return t
    view = {4: torch.int32, 2: torch.int16}[t.element_size()]
    canonical = torch.full((), float("nan"), dtype=t.dtype).view(view)
    return torch.where(torch.isnan(t), canonical, t.view(view))


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        where = (a != e).nonzero().flatten().tolist()[:8]
        raise AssertionError(
            f"{what}: {int((a != e).sum())} of {a.numel()} differ, first at {where}: "
            f"{actual.detach().cpu().reshape(-1)[where[:4]].tolist()} vs {expected.detach().cpu().reshape(-1)[where[:4]].tolist()}"
        )


def others():
    """The backends the triton results are compared with: (name, device)."""
    out = [("reference", DEVICE)]
    if HAVE_CPU_BACKEND:
        out.append(("cpu", "cpu"))
    return out


def special_input(n: int, blocksize: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with NaN, +-inf, subnormals, zeros, an all-zero block, huge values and tiny blocks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    finfo = torch.finfo(dtype)
    nb = -(-n // blocksize)
    x[3] = float("nan")
    x[blocksize + 1] = float("inf")  # block 1 has absmax inf
    x[blocksize + 2] = -float("inf")
    x[blocksize + 5] = float("nan")
    x[7] = finfo.tiny / 4  # subnormal
    x[8] = -finfo.tiny / 8
    x[9] = 0.0
    x[10] = -0.0
    x[11] = finfo.max  # huge
    if nb >= 3:
        x[2 * blocksize : 3 * blocksize] = 0.0  # an all-zero block
        x[2 * blocksize + 1] = -0.0
    if nb >= 4:
        size = min(n, 4 * blocksize) - 3 * blocksize
        x[3 * blocksize : 3 * blocksize + size] = torch.randn(size, generator=gen) * finfo.tiny / 16  # subnormal absmax
        x[3 * blocksize + 2] = float("nan")
    x[-1] = -finfo.max
    return x.to(dtype)


def test_interpreter_fma_is_patched_exact():
    if not INTERPRETED:
        pytest.skip("runs on a GPU: tl.fma is a real fused multiply-add there")
    assert interpreter_fma_is_exact()


def test_exact_fma_matches_reference_fma32():
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
    a, b, c = (t.to(DEVICE) for t in (a, b, c))
    out = torch.empty_like(a)
    fma_kernel[(triton.cdiv(n, 1024),)](a, b, c, out, n, BLOCK=1024, enable_fp_fusion=False)
    assert_bits_equal(out, reference_optimizer.fma32(a, b, c), "tl.fma vs fma32")
    assert not torch.equal(bits(out), bits(a * b + c)), "the case should distinguish fma from a*b+c"


@pytest.mark.parametrize("signed", (True, False), ids=("signed", "unsigned"))
def test_code_table_bits(signed):
    code = F.create_dynamic_map(signed)
    table = backends.lookup("code_table", "triton")(code.to(DEVICE))
    assert table.dtype == torch.uint8 and table.shape == (65536,)
    assert_bits_equal(table, reference_blockwise.code_table(code), "code table vs reference")
    if HAVE_CPU_BACKEND:
        assert_bits_equal(table, backends.lookup("code_table", "cpu")(code), "code table vs cpu")
    # a code with ties and equal neighbours: ties go to the lower index
    odd = torch.linspace(-1, 1, 256)
    odd[100:110] = odd[100]
    assert_bits_equal(backends.lookup("code_table", "triton")(odd.to(DEVICE)), reference_blockwise.code_table(odd),
                      "tied code vs reference")


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_blockwise_bits(dtype, blocksize):
    n = 4 * blocksize + 37 if blocksize < 4096 else blocksize + 123  # a partial last block
    x = special_input(n, blocksize, dtype, seed=blocksize)
    code = F.create_dynamic_map(True)
    q, absmax = backends.lookup("quantize_blockwise", "triton")(x.to(DEVICE), code.to(DEVICE), blocksize)
    assert q.dtype == torch.uint8 and q.shape == x.shape and absmax.shape == (-(-n // blocksize),)
    for name, dev in others():
        with pyquant.use_backend(name):
            q_e, absmax_e = F.quantize_blockwise(x.to(dev), code.to(dev), blocksize)
        assert_bits_equal(absmax, absmax_e, f"absmax vs {name}")
        assert_bits_equal(q, q_e, f"codes vs {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_unsigned_map_and_2d_shape(dtype):
    gen = torch.Generator().manual_seed(7)
    x = (torch.rand(37, 29, generator=gen) * 1e-3).to(dtype)
    x[0, :5] = 0.0
    code = F.create_dynamic_map(False)
    with pyquant.use_backend("triton"):
        q, absmax = F.quantize_blockwise(x.to(DEVICE), code.to(DEVICE), 128)
    assert q.shape == x.shape
    for name, dev in others():
        with pyquant.use_backend(name):
            q_e, absmax_e = F.quantize_blockwise(x.to(dev), code.to(dev), 128)
        assert_bits_equal(absmax, absmax_e, f"absmax vs {name}")
        assert_bits_equal(q, q_e, f"codes vs {name}")


def test_quantize_contract_consequences():
    """docs/numerics.md section 2: zero never gets the zero code, NaN -> 0, an all-zero block -> all 0."""
    code = F.create_dynamic_map(True).to(DEVICE)
    x = torch.tensor([0.0, 1e-30, -1e-30, float("nan"), 1.0] + [0.0] * 59 + [0.0] * 64, device=DEVICE)
    q, absmax = backends.lookup("quantize_blockwise", "triton")(x, code, 64)
    assert q[:5].tolist() == [131, 131, 131, 0, 255]
    assert absmax.tolist() == [1.0, 0.0] and q[64:].eq(0).all()


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_blockwise_bits(dtype, blocksize):
    gen = torch.Generator().manual_seed(100 + blocksize)
    n = 3 * blocksize + 11
    nb = -(-n // blocksize)
    q = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(nb, generator=gen) * 10
    absmax[0] = 1e30  # overflows float16 / rounds in bfloat16
    absmax[1] = 0.0
    absmax[2] = float("inf")  # code 0 * inf = NaN for the signed map's zero
    absmax[3] = 1e-40  # subnormal scale
    code = F.create_dynamic_map(True)
    out = backends.lookup("dequantize_blockwise", "triton")(q.to(DEVICE), absmax.to(DEVICE), code.to(DEVICE), blocksize,
                                                           dtype)
    assert out.dtype == dtype and out.shape == q.shape
    for name, dev in others():
        with pyquant.use_backend(name):
            expected = F.dequantize_blockwise(q.to(dev), absmax.to(dev), code.to(dev), blocksize, dtype)
        assert_bits_equal(out, expected, f"dequantize vs {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_through_public_api(dtype):
    x = special_input(1000, 256, dtype, seed=3)
    with pyquant.use_backend("triton"):
        q, absmax = F.quantize_blockwise(x.to(DEVICE))
        out = F.dequantize_blockwise(q, absmax, dtype=dtype)
    with pyquant.use_backend("reference"):
        q_e, absmax_e = F.quantize_blockwise(x.to(DEVICE))
        out_e = F.dequantize_blockwise(q_e, absmax_e, dtype=dtype)
    assert_bits_equal(out, out_e, "round trip")


# ---- Adam ----
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8
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


def constants_row(step: int, wd: float, eight_bit: bool, inv_grad_scale: float = 1.0) -> list[float]:
    group = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=wd)
    return _contract.adam_constants(group, step, eight_bit, inv_grad_scale)


def make_adam_problem(seed: int):
    """Parameters and non-zero initial states (8-bit states quantised from random moments)."""
    gen = torch.Generator().manual_seed(seed)
    code1, code2 = F.create_dynamic_map(True), F.create_dynamic_map(False)
    tensors = []
    for numel, p_dtype, g_dtype, eight_bit, _ in ADAM_TENSORS:
        p = torch.randn(numel, generator=gen).to(p_dtype)
        m = torch.randn(numel, generator=gen) * 1e-2
        v = torch.rand(numel, generator=gen) * 1e-4
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
    constants = torch.tensor(
        [constants_row(step, wd, eight_bit) for _, _, _, eight_bit, wd in ADAM_TENSORS], dtype=torch.float32
    )
    fn = backends.lookup("adam_step", name)
    cols = list(zip(*tensors))
    return fn(
        list(cols[0]), [g.to(device) for g in grads], list(cols[1]), list(cols[2]), list(cols[3]), list(cols[4]),
        constants, code1.to(device), code2.to(device), nonfinite,
    )


@pytest.mark.parametrize("nonfinite", (_contract.SKIP_ELEMENT, _contract.PROPAGATE), ids=("skip", "propagate"))
def test_adam_step_bits(nonfinite):
    tensors, code1, code2 = make_adam_problem(seed=5)
    runs = {"triton": (DEVICE, clone_to(tensors, DEVICE))}
    # The step's square root is torch's on the tensors' device (docs/numerics.md): on a GPU, IEEE; on a CPU,
    # MKL's, up to 1 ulp away. Bits are compared on the same device; GPU against CPU is bench/gpu/check.sh's.
    for name, dev in others():
        if dev == DEVICE:
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
                    assert_bits_equal(a, e, f"step {step}, tensor {i} {field} vs {name}")
    if nonfinite == _contract.PROPAGATE:
        assert torch.isnan(runs["triton"][1][0][0].float()).any(), "a NaN gradient should reach the parameter"
    else:
        for p, *_ in runs["triton"][1]:
            assert torch.isfinite(p.float()).all(), "skip mode must keep every parameter finite"


def test_adam_step_ieee_sqrt(monkeypatch):
    """With an IEEE square root everywhere (what tl.sqrt_rn and torch.sqrt compute on a GPU) the kernel still
    equals the reference: the only sqrt-dependent difference is the device's sqrt itself."""
    if INTERPRETED:
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
    runs = {name: clone_to(tensors, DEVICE) for name in ("triton", "reference")}
    for step in (1, 2):
        grads = make_grads(step, seed=11)
        for name, ts in runs.items():
            run_adam(name, DEVICE, ts, grads, step, code1, code2, _contract.SKIP_ELEMENT)
    for i, (actual, expected) in enumerate(zip(runs["triton"], runs["reference"])):
        for a, e in zip(actual, expected):
            assert_bits_equal(a, e, f"tensor {i}, IEEE sqrt")


@pytest.mark.parametrize("inv_grad_scale", [1.0, 2.0**-7])
def test_adam_step_through_custom_op(inv_grad_scale):
    """The public multi-tensor entry point selects the triton backend and agrees with the reference, also with
    GradScaler's unscale fused into the step (gradients multiplied by 1/scale and rounded to their dtype)."""
    tensors, code1, code2 = make_adam_problem(seed=9)
    results = {}
    for name in ("triton", "reference"):
        ts = clone_to(tensors, DEVICE)
        grads = [g.to(DEVICE) for g in make_grads(1, seed=9)]
        constants = torch.tensor(
            [constants_row(1, wd, eight_bit, inv_grad_scale) for _, _, _, eight_bit, wd in ADAM_TENSORS],
            dtype=torch.float32,
        )
        cols = list(zip(*ts))
        with pyquant.use_backend(name):
            count = F.adam_step_multi_tensor(
                cols[0], grads, cols[1], cols[2], cols[3], cols[4], constants,
                code1.to(DEVICE), code2.to(DEVICE), _contract.SKIP_ELEMENT,
            )
        results[name] = (int(count), ts)
    assert results["triton"][0] == results["reference"][0] > 0
    for actual, expected in zip(results["triton"][1], results["reference"][1]):
        for a, e in zip(actual, expected):
            assert_bits_equal(a, e, "custom op vs reference")


def test_adam_step_rejects_non_contiguous():
    p = torch.zeros(64, 2, device=DEVICE).t()
    g = torch.zeros_like(p)
    s = torch.zeros(2, 64, device=DEVICE)
    constants = torch.tensor([constants_row(1, 0.0, False)], dtype=torch.float32)
    code = F.create_dynamic_map(True).to(DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        backends.lookup("adam_step", "triton")([p], [g], [s], [s.clone()], [torch.empty(0, device=DEVICE)], [torch.empty(0, device=DEVICE)], constants, code, code, 0)
