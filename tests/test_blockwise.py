"""Block-wise quantisation: bits against bitsandbytes and across pyquant's CPU backends; errors."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyquant
import pyquant.functional as F
from pyquant import _maps, backends
from pyquant.backends.reference import blockwise as reference

bnbF = pytest.importorskip("bitsandbytes.functional")

CPU_BACKENDS = ["reference"] + (["cpu"] if backends.available("cpu", "cpu") else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b)), f"{int((bits(a) != bits(b)).sum())} elements differ"


def special_values(n: int, seed: int = 0) -> torch.Tensor:
    """Normal, tiny, huge and subnormal values, zeros, an all-zero block, NaN and +-inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[: n // 8] *= 1e-30
    x[n // 8 : n // 4] *= 1e30
    x[n // 4 : n // 4 + 300] = 0.0
    x[n // 4 + 310 : n // 4 + 330] = torch.randn(20, generator=g) * 1e-41  # float32 subnormals
    x[5], x[700], x[701], x[2000] = float("nan"), float("inf"), float("-inf"), -0.0
    x[n - 3 :] = torch.tensor([1e-45, -3e-42, 7.0])
    return x


def test_dynamic_maps_match_bitsandbytes_and_stored_hashes():
    for signed, digest in ((True, _maps.SIGNED_SHA256), (False, _maps.UNSIGNED_SHA256)):
        code = F.create_dynamic_map(signed)
        assert_same_bits(code, bnbF.create_dynamic_map(signed=signed))
        assert hashlib.sha256(code.numpy().astype("<f4").tobytes()).hexdigest() == digest
    signed_map, unsigned_map = F.create_dynamic_map(True), F.create_dynamic_map(False)
    assert signed_map[127] == 0 and signed_map[255] == 1.0 and signed_map[0] == torch.tensor(-0.99296874)
    assert unsigned_map[0] == 0 and unsigned_map[255] == 1.0
    assert (signed_map[1:] > signed_map[:-1]).all()


def test_dynamic_map_construction_rule_reproduces_the_stored_bits():
    """The construction of numerics.md section 1 with torch's float32 linspace gives the stored maps."""
    for signed in (True, False):
        values = []
        for i in range(7):
            k = 2**i + 1 if signed else 2 ** (i + 1) + 1
            bounds = torch.linspace(0.1, 1, k, dtype=torch.float32)
            means = (bounds[:-1] + bounds[1:]) / 2.0
            part = (10 ** (i - 6)) * means
            values += part.tolist() + ((-part).tolist() if signed else [])
        values += [0.0, 1.0]
        built = torch.tensor(sorted(values), dtype=torch.float32)
        assert_same_bits(built, F.create_dynamic_map(signed))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
def test_quantize_and_dequantize_match_bitsandbytes(backend, dtype, blocksize):
    x = special_values(20_011).to(dtype)  # not a multiple of any block size: partial last block
    qb, state = bnbF.quantize_blockwise(x, blocksize=blocksize)
    with pyquant.use_backend(backend):
        q, absmax = F.quantize_blockwise(x, blocksize=blocksize)
        out = F.dequantize_blockwise(q, absmax, blocksize=blocksize, dtype=dtype)
    assert_same_bits(q, qb)
    assert_same_bits(absmax, state.absmax)
    assert_same_bits(out, bnbF.dequantize_blockwise(qb, state))


@pytest.mark.parametrize("signed", [True, False])
def test_code_tables_agree_between_reference_and_cpu(signed):
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("the compiled CPU library is not built")
    from pyquant.backends.cpu import blockwise as cpu

    code = F.create_dynamic_map(signed)
    assert torch.equal(cpu.code_table(code), reference.code_table(code))
    custom = torch.sort(torch.randn(256))[0]
    assert torch.equal(cpu.code_table(custom), reference.code_table(custom))


def test_contract_consequences():
    """numerics.md section 2: zero never gets the zero code, NaN gets index 0, some indices are unreachable."""
    x = torch.zeros(512)
    x[0], x[256] = 1.0, 1.0  # non-zero absmax in both blocks
    x[1], x[257] = float("nan"), 1e-30
    q, absmax = F.quantize_blockwise(x)
    assert q[2] == 131 and q[258] == 131 and q[257] == 131  # 0 and tiny -> +2.125e-5 * absmax
    assert q[1] == 0  # NaN
    uq, _ = F.quantize_blockwise(x.abs(), code=F.create_dynamic_map(False))
    assert uq[2] == 7  # unsigned: 0 -> index 7, so a stored second moment is never 0
    all_codes, _ = F.quantize_blockwise(torch.linspace(-1, 1, 1_000_001))
    reached = set(torch.unique(all_codes).tolist())
    assert reached.isdisjoint(range(124, 131)) and 131 in reached and 0 in reached and 255 in reached
    inf_block = torch.tensor([float("inf"), 2.0, -3.0, float("-inf")])
    q, absmax = F.quantize_blockwise(inf_block, blocksize=4)
    assert absmax.item() == float("inf") and q.tolist() == [0, 131, 131, 0]
    zero_q, zero_absmax = F.quantize_blockwise(torch.zeros(300), blocksize=100)
    assert zero_absmax.tolist() == [0.0, 0.0, 0.0] and (zero_q == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shapes_and_non_contiguous_inputs(backend):
    base = torch.randn(37, 300)
    x = base.t()  # non-contiguous
    with pyquant.use_backend(backend):
        q, absmax = F.quantize_blockwise(x, blocksize=256)
        q_ref, absmax_ref = F.quantize_blockwise(x.contiguous(), blocksize=256)
        out = F.dequantize_blockwise(q, absmax, blocksize=256)
    assert q.shape == x.shape and q.dtype == torch.uint8
    assert absmax.shape == (-(-x.numel() // 256),) and absmax.dtype == torch.float32
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)
    assert out.shape == x.shape
    assert (out - x).abs().max() <= 0.02 * x.abs().max()  # 8-bit codes: relative error of the dynamic map

@pytest.mark.parametrize("dtype", DTYPES)
def test_large_dequantize_takes_the_streaming_path_with_the_same_bits(dtype):
    # Outputs of 32 MiB and more are written with non-temporal stores (csrc/cpu/blockwise.cpp); the partial last
    # block still takes the ordinary path.
    n = (32 << 20) // torch.tensor([], dtype=dtype).element_size() + 300
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    q, absmax = F.quantize_blockwise(x, blocksize=256)
    with pyquant.use_backend("cpu"):
        out = F.dequantize_blockwise(q, absmax, blocksize=256, dtype=dtype)
    with pyquant.use_backend("reference"):
        expected = F.dequantize_blockwise(q, absmax, blocksize=256, dtype=dtype)
    assert torch.equal(out, expected)



@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=700),
    blocksize=st.sampled_from([1, 3, 64, 100, 256, 4096]),
    dtype=st.sampled_from(DTYPES),
)
def test_fuzz_cpu_matches_reference_and_bitsandbytes(values, blocksize, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    with pyquant.use_backend("reference"):
        q_ref, a_ref = F.quantize_blockwise(x, blocksize=blocksize)
    q, a = F.quantize_blockwise(x, blocksize=blocksize)
    assert_same_bits(q, q_ref)
    assert_same_bits(a, a_ref)
    if blocksize >= 64:  # bitsandbytes' own range
        qb, state = bnbF.quantize_blockwise(x, blocksize=blocksize)
        assert_same_bits(q, qb)
        assert_same_bits(a, state.absmax)


def test_same_bits_for_any_thread_count(outputs_by_thread_count):
    script = (
        "import torch, hashlib, pyquant.functional as F\n"
        "x = torch.randn(3_000_001, generator=torch.Generator().manual_seed(3))\n"
        "q, a = F.quantize_blockwise(x)\n"
        "d = F.dequantize_blockwise(q, a, dtype=torch.bfloat16)\n"
        "print(hashlib.sha256(q.numpy().tobytes() + a.numpy().tobytes() + d.view(torch.int16).numpy().tobytes()).hexdigest())\n"
    )
    assert len(outputs_by_thread_count(script)) == 1


def test_custom_ops_pass_opcheck():
    x = torch.randn(1000)
    code = F.create_dynamic_map(True)
    torch.library.opcheck(torch.ops.pyquant.quantize_blockwise.default, (x, code, 256))
    q, absmax = F.quantize_blockwise(x)
    torch.library.opcheck(torch.ops.pyquant.dequantize_blockwise.default, (q, absmax, code, 256, torch.float16))


def test_fake_kernels_give_shapes_on_meta_tensors():
    x = torch.empty(10, 300, device="meta")
    q, absmax = torch.ops.pyquant.quantize_blockwise(x, F.create_dynamic_map(True).to("meta"), 256)
    assert q.shape == (10, 300) and q.dtype == torch.uint8 and absmax.shape == (12,)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: F.quantize_blockwise(torch.arange(10)), "float32, float16 or bfloat16"),
        (lambda: F.quantize_blockwise(torch.randn(10), blocksize=0), "positive int"),
        (lambda: F.quantize_blockwise(torch.randn(10), blocksize=-64), "positive int"),
        (lambda: F.quantize_blockwise(torch.randn(10), blocksize=2.5), "positive int"),
        (lambda: F.quantize_blockwise(torch.randn(10), code=torch.randn(255)), "256 sorted float32"),
        (lambda: F.quantize_blockwise(torch.randn(10), code=torch.randn(256).double()), "256 sorted float32"),
        (lambda: F.quantize_blockwise(torch.randn(10), code=torch.randn(256)), "sorted in ascending order"),
        (lambda: F.quantize_blockwise(torch.randn(10), code=F.create_dynamic_map().to("meta")), "same device"),
        (lambda: F.dequantize_blockwise(torch.zeros(10), torch.ones(1)), "uint8"),
        (lambda: F.dequantize_blockwise(torch.zeros(10, dtype=torch.uint8), torch.ones(2)), "1 blocks of 256"),
        (lambda: F.dequantize_blockwise(torch.zeros(10, dtype=torch.uint8), torch.ones(1).double()), "float32"),
        (lambda: F.dequantize_blockwise(torch.zeros(10, dtype=torch.uint8), torch.ones(1), dtype=torch.int32), "dtype"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()


def test_backend_switch():
    with pyquant.use_backend("reference"):
        assert backends.select("cpu") == "reference"
    with pytest.raises(ValueError, match="unknown pyquant backend"):
        with pyquant.use_backend("fortran"):
            pass
    with pyquant.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
            F.quantize_blockwise(torch.randn(10))


def test_missing_library_falls_back_to_reference_with_one_warning():
    script = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import pyquant, pyquant.functional as F\n"
        "    from pyquant import backends\n"
        "    q1, _ = F.quantize_blockwise(torch.randn(1000))\n"
        "    q2, _ = F.quantize_blockwise(torch.randn(1000))\n"
        "print(backends.select('cpu'), sum('compiled CPU library was not found' in str(w.message) for w in caught))\n"
    )
    env = dict(os.environ, PYQUANT_NO_LIB="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "1"]


def test_every_kernel_launch_sits_in_a_named_nvtx_range(nvtx_names):
    q, absmax = F.quantize_blockwise(torch.randn(1000))
    F.dequantize_blockwise(q, absmax)
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    pyquant.Adam8bit([p]).step()
    assert nvtx_names == [
        ("pyquant::quantize_blockwise", "pyquant"),
        ("pyquant::dequantize_blockwise", "pyquant"),
        ("pyquant::adam_step", "pyquant"),
    ]
