"""Fixtures and helpers shared by the test files (one file per op family).

Test files import the plain helpers with `from conftest import ...` (pytest puts tests/ on sys.path) and use the
fixtures by name:

- bit comparison: `bits`, `same_bits`, `assert_same_bits` (exact by default; `nan_blind` compares NaNs by
  position only, for the places where the contract does not fix a NaN's payload);
- inputs: `special_values` (normal values at many scales with every special value sprinkled in);
- CPU backends: `HAVE_CPU_LIBRARY`, `CPU_BACKENDS` (reference, and cpu when the C++ library is built),
  `needs_cpu_library` (a skipif mark), the `isa` fixture and the `cpu_isa` context manager (the C++ library's
  instruction-set builds);
- Triton: the `triton` mark (see `_triton_test`), `TRITON_DEVICE` and `TRITON_PEERS`;
- CUDA: the `cuda_backends` fixture (skips with the reason when there is no GPU or library), and `ieee_cpu_sqrt`
  (the same, with the CPU library's square root made the GPU's IEEE one);
- `nvtx_names`, `outputs_by_thread_count`.
"""

import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. The variable must be set
# before triton decorates pyquant's kernels, so it is set here, before any test module imports pyquant.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import contextlib  # noqa: E402
import functools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from pyquant import _contract, backends  # noqa: E402
from pyquant.backends import capi  # noqa: E402


# ---- comparing bits ----
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def bits(t: torch.Tensor, nan_blind=False) -> torch.Tensor:
    """An integer view of `t` on the CPU (a non-float tensor as it is), for bitwise comparison.

    `nan_blind`: True, or the float dtypes whose NaNs all get one pattern, so that they compare by position only
    (no non-NaN float has the pattern: all bits set)."""
    t = t.detach().cpu()
    if not t.is_floating_point():
        return t
    view = t.contiguous().view(_INT_VIEW[t.element_size()])
    if nan_blind is True or t.dtype in (nan_blind or ()):
        view = torch.where(torch.isnan(t), torch.full_like(view, -1), view)
    return view


def same_bits(a: torch.Tensor, b: torch.Tensor, nan_blind=False) -> bool:
    """The same dtype, shape and bits (see `bits` for `nan_blind`)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a, nan_blind), bits(b, nan_blind))


def assert_same_bits(actual, expected, what: str = "", nan_blind=False) -> None:
    """Bitwise equality of two tensors, or of lists, tuples and dicts of tensors and plain values (see `bits` for
    `nan_blind`); a failure names the first elements that differ."""
    if isinstance(actual, torch.Tensor):
        assert isinstance(expected, torch.Tensor), what
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
            f"{what}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
        )
        a, e = bits(actual, nan_blind), bits(expected, nan_blind)
        if not torch.equal(a, e):
            where = (a != e).reshape(-1).nonzero().flatten().tolist()[:8]
            flat_a, flat_e = actual.detach().cpu().reshape(-1), expected.detach().cpu().reshape(-1)
            raise AssertionError(
                f"{what}: {int((a != e).sum())} of {a.numel()} elements differ, first at {where}: "
                f"{flat_a[where[:4]].tolist()} vs {flat_e[where[:4]].tolist()}"
            )
    elif isinstance(actual, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), what
        for i, (x, y) in enumerate(zip(actual, expected)):
            assert_same_bits(x, y, f"{what}[{i}]", nan_blind)
    elif isinstance(actual, dict):
        assert actual.keys() == expected.keys(), what
        for k in actual:
            assert_same_bits(actual[k], expected[k], f"{what}[{k!r}]", nan_blind)
    else:
        assert type(actual) is type(expected) and actual == expected, f"{what}: {actual!r} != {expected!r}"


# ---- inputs ----
def special_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values at many scales, with zeros, +-0, NaN, +-inf, subnormals and huge values sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    finfo = torch.finfo(dtype)
    specials = torch.tensor(
        [0.0, -0.0, float("nan"), float("inf"), -float("inf"), finfo.tiny / 4, -finfo.tiny / 2, finfo.max, -finfo.max,
         1.0, -1.0, finfo.eps, 1e-30]
    )
    pick = torch.rand(n, generator=g) < 0.02
    x[pick] = specials[torch.randint(0, len(specials), (int(pick.sum()),), generator=g)]
    return x.to(dtype)


# ---- the CPU backends ----
HAVE_CPU_LIBRARY = backends.available("cpu", "cpu")
CPU_BACKENDS = ["reference"] + (["cpu"] if HAVE_CPU_LIBRARY else [])
needs_cpu_library = pytest.mark.skipif(not HAVE_CPU_LIBRARY, reason="the compiled CPU library is not built")


@contextlib.contextmanager
def cpu_isa(isa: int):
    """Within the block the C++ library runs its build for instruction set `isa` (a code of
    _contract.ISA_NAMES), or its best one below where this CPU lacks it; yields the one it runs."""
    lib = capi.cpu_library()
    previous = lib.pq_set_isa(isa)
    try:
        yield lib.pq_isa()
    finally:
        lib.pq_set_isa(previous)


@pytest.fixture(params=list(_contract.ISA_NAMES), ids=list(_contract.ISA_NAMES.values()))
def isa(request):
    """Each instruction-set build of the CPU library in turn (skipped where the CPU lacks it)."""
    if not HAVE_CPU_LIBRARY:
        pytest.skip("the compiled CPU library is not built")
    with cpu_isa(request.param) as running:
        if running != request.param:
            pytest.skip("this CPU lacks the instruction set")
        yield request.param


# ---- Triton ----
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The (backend, device) pairs that the triton backend's results are compared with.
TRITON_PEERS = [("reference", TRITON_DEVICE)] + ([("cpu", "cpu")] if HAVE_CPU_LIBRARY else [])


@functools.cache
def _triton_cannot_run() -> str | None:
    """Why Triton kernels cannot run here, or None."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton cannot be imported: {exc}"
    if TRITON_DEVICE == "cpu" and not backends.triton_interpreted():  # pragma: no cover
        return "no CUDA device and TRITON_INTERPRET is not 1: triton cannot run"
    return None


def pytest_collection_modifyitems(items):
    # numpy's warnings from inside the interpreter (inf * 0, overflow to inf on a float16 store) are expected.
    for item in items:
        if item.get_closest_marker("triton"):
            item.add_marker(pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"))


@pytest.fixture(autouse=True)
def _triton_test(request):
    """A test marked `triton` runs Triton kernels (on TRITON_DEVICE): it is skipped with the reason where triton
    cannot run, and under the interpreter the interpreter's fma and sqrt_rn are made the device's (an exact fma,
    torch's CPU sqrt: tests/triton_exact_fma.py says why) for the test's duration."""
    if request.node.get_closest_marker("triton") is None:
        yield
        return
    reason = _triton_cannot_run()
    if reason is not None:
        pytest.skip(reason)
    if backends.triton_interpreted():
        from triton_exact_fma import interpreter_as_device

        with interpreter_as_device():
            yield
    else:
        yield


# ---- CUDA ----
@pytest.fixture
def cuda_backends():
    """(cpu ops, cuda ops): the kernels of the cpu and the cuda backend; skips where they cannot both run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if capi.cpu_library() is None:
        pytest.skip("the C++ CPU library was not built (pip install -e .)")
    if capi.cuda_library() is None:
        pytest.skip("the CUDA library was not built (PYQUANT_CUDA=ON pip install -e .)")
    return backends.kernels_of("cpu"), backends.kernels_of("cuda")


@pytest.fixture
def ieee_cpu_sqrt(cuda_backends):
    """(cpu ops, cuda ops), as `cuda_backends`, with the CPU library taking IEEE sqrtf for the optimizers' square
    roots (Adam's denominator, RMSprop's and Adagrad's), as the CUDA kernels (and torch on a GPU) do.

    The CPU library may take sqrt(v) from torch's CPU sqrt routine (MKL's vsSqrt, up to 1 ulp from IEEE,
    see pyquant.backends.capi._torch_cpu_sqrt) to match torch and bitsandbytes on a CPU; the GPU has IEEE sqrt.
    The kernels' own logic is compared with the CPU drivers under the same (IEEE) square root.
    """
    setter = capi.cpu_library().pq_set_cpu_sqrt
    setter(None)
    try:
        yield cuda_backends
    finally:
        setter(capi._torch_cpu_sqrt())


# ---- profiling and threads ----
@pytest.fixture
def nvtx_names(monkeypatch):
    """The (message, domain) of every NVTX range pyquant opens while the test runs."""
    from pyquant import _nvtx

    names = []

    class Range:  # recorded each time it is entered: pyquant makes each kernel's range once and reuses it
        def __init__(self, message, domain):
            self.name = (message, domain)

        def __enter__(self):
            names.append(self.name)

        def __exit__(self, *exc):
            return False

    class Recorder:
        annotate = Range

    monkeypatch.setattr(_nvtx, "_nvtx", Recorder)
    _nvtx._nvtx_range.cache_clear()  # ranges made before the test are the real package's
    yield names
    _nvtx._nvtx_range.cache_clear()  # and the test's are the recorder's


@pytest.fixture
def outputs_by_thread_count():
    """Run a Python script under OMP_NUM_THREADS=1, 2 and 3; return the set of its last printed lines."""

    def run(script: str) -> set[str]:
        lines = set()
        for threads in ("1", "2", "3"):
            env = dict(os.environ, OMP_NUM_THREADS=threads)
            out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            lines.add(out.stdout.strip().splitlines()[-1])
        return lines

    return run
