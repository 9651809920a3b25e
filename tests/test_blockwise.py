"""Block-wise quantisation (quantize / dequantize, code tables, dynamic maps) on every backend.

- the public API and the CPU backends (reference, cpu): bits against bitsandbytes and against each other; errors;
- the triton backend (pyquant.kernels) against the reference and cpu backends, bit for bit: without a GPU the
  kernels run on CPU tensors through Triton's interpreter (the `triton` mark, tests/conftest.py); sizes are small
  there, the interpreter is slow;
- the cuda backend (csrc/cuda) against the cpu backend, bit for bit (skipped with "needs a CUDA device" without one).

"Bit equality" is exact, except between backends (triton, cuda): NaN payloads and signs are not part of the
contract (torch's own float32 -> bfloat16 rounding turns every NaN into 0xFFFF, blockwise.h keeps the sign, x86
propagates an input NaN's payload, GPUs produce a canonical NaN), so there NaNs are compared by position only.
"""

import hashlib
import math
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
from pyquant.backends import capi
from pyquant.backends.reference import blockwise as reference

from conftest import (
    CPU_BACKENDS, HAVE_CPU_LIBRARY, TRITON_DEVICE, TRITON_PEERS, assert_same_bits, needs_cpu_library, special_values,
)

try:
    import bitsandbytes.functional as bnbF
except ImportError:  # pragma: no cover - depends on the environment
    bnbF = None
needs_bitsandbytes = pytest.mark.skipif(bnbF is None, reason="bitsandbytes is not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def special_float32(n: int, seed: int = 0) -> torch.Tensor:
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


# ---- the public API and the CPU backends ----
@needs_bitsandbytes
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


@needs_bitsandbytes
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
def test_quantize_and_dequantize_match_bitsandbytes(backend, dtype, blocksize):
    x = special_float32(20_011).to(dtype)  # not a multiple of any block size: partial last block
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

@needs_cpu_library
def test_outputs_stream_beyond_the_last_level_cache():
    lib = capi.cpu_library()
    # The library asks sysconf(_SC_LEVEL3_CACHE_SIZE), which Python's os.sysconf does not name; getconf reads it.
    reported = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True).stdout.strip()
    llc = int(reported) if reported.isdigit() else 0
    assert lib.pq_streaming_bytes() == (llc if llc > 0 else 32 << 20)
    previous = lib.pq_set_streaming_bytes(1 << 20)
    try:
        assert lib.pq_streaming_bytes() == 1 << 20
        assert lib.pq_set_streaming_bytes(0) == 1 << 20 and lib.pq_streaming_bytes() == previous  # the default
    finally:
        lib.pq_set_streaming_bytes(previous)


@needs_cpu_library
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_dequantize_takes_the_streaming_path_with_the_same_bits(dtype):
    # Outputs of pq_streaming_bytes and more are written with non-temporal stores (csrc/cpu/blockwise.cpp; the
    # threshold is lowered to 32 MiB here, below this machine's cache); the partial last block still takes the
    # ordinary path.
    n = (32 << 20) // torch.tensor([], dtype=dtype).element_size() + 300
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    q, absmax = F.quantize_blockwise(x, blocksize=256)
    lib = capi.cpu_library()
    previous = lib.pq_set_streaming_bytes(32 << 20)
    try:
        with pyquant.use_backend("cpu"):
            out = F.dequantize_blockwise(q, absmax, blocksize=256, dtype=dtype)
    finally:
        lib.pq_set_streaming_bytes(previous)
    with pyquant.use_backend("reference"):
        expected = F.dequantize_blockwise(q, absmax, blocksize=256, dtype=dtype)
    assert torch.equal(out, expected)



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_every_cpu_build_quantizes_and_dequantizes_like_the_reference(isa, dtype, blocksize):
    """Each instruction-set build (the AVX2 and AVX-512 kernels have lookups of their own; blocks of the optimizers'
    size take their own instantiation) against the reference, partial last block and special values included."""
    x = special_float32(20_011).to(dtype)
    with pyquant.use_backend("reference"):
        q_ref, a_ref = F.quantize_blockwise(x, blocksize=blocksize)
        out_ref = F.dequantize_blockwise(q_ref, a_ref, blocksize=blocksize, dtype=dtype)
    q, a = F.quantize_blockwise(x, blocksize=blocksize)
    out = F.dequantize_blockwise(q_ref, a_ref, blocksize=blocksize, dtype=dtype)
    assert_same_bits(q, q_ref)
    assert_same_bits(a, a_ref)
    assert_same_bits(out, out_ref)


def other_code_map(name: str) -> torch.Tensor:
    """Sorted float32 maps of 256 codes other than the dynamic ones."""
    if name == "beyond_one":  # the top codes lie beyond 1: the last grid bins' index is below 255
        return torch.linspace(-1.0, 1.5, 256)
    if name == "below_minus_one":  # the bottom codes lie below -1: the first grid bins' index is above 0
        return torch.linspace(-1.5, 1.0, 256)
    if name == "crowded":  # many codes inside one grid bin around 0: equal step positions in the search
        return torch.cat([torch.linspace(-1.0, 1.0, 200), torch.linspace(-1e-6, 1e-6, 56)]).sort().values
    return torch.linspace(-1.0, 1.0, 256)


@pytest.mark.parametrize("code_name", ["beyond_one", "below_minus_one", "crowded", "linear"])
def test_every_cpu_build_takes_other_code_maps_like_the_reference(isa, code_name):
    """The vector codecs describe any sorted map by its step positions; maps unlike the dynamic ones reach the
    repairs the dynamic ones never need (a top index below 255, a bottom one above 0, positions shared by several
    codes)."""
    code = other_code_map(code_name)
    x = special_float32(20_011)
    with pyquant.use_backend("reference"):
        q_ref, a_ref = F.quantize_blockwise(x, code=code)
        out_ref = F.dequantize_blockwise(q_ref, a_ref, code=code)
    q, a = F.quantize_blockwise(x, code=code)
    assert_same_bits(q, q_ref)
    assert_same_bits(a, a_ref)
    assert_same_bits(F.dequantize_blockwise(q_ref, a_ref, code=code), out_ref)
    if code_name == "beyond_one":  # the case is what it claims: no element reaches the codes beyond 1
        assert int(q_ref.max()) < 255
    if code_name == "below_minus_one":  # nor here the codes below -1 (NaN's index 0 aside)
        assert int(q_ref[~torch.isnan(x)].min()) > 0


def mirror_case_map(name: str) -> torch.Tensor:
    """The signed dynamic map (code[127] = +0, code[i] = -code[254 - i] below 127) and maps that break the mirror by
    one bit or keep it with another top code."""
    code = F.create_dynamic_map(True)
    if name == "negative_zero":
        code[127] = -0.0
    elif name == "one_ulp_off":
        code[3] = torch.nextafter(code[3], torch.tensor(0.0))
    elif name == "other_top":  # code[255] has no mirror image: any value keeps the mirror
        code[255] = 1.5
    return code


@pytest.mark.parametrize("broken_bin", [0, 40, 64, 1023, 1024, 32768, 65535])
def test_every_cpu_build_quantizes_through_a_table_that_is_not_monotone_by_plain_lookups(isa, broken_bin):
    """The vector codecs describe a table by its step positions, which only a monotone table has (any sorted map's
    is; a C caller may pass another). One bin out of order, at the first bin, inside and at the edges of the
    64-bin chunks and 1024-bin groups the check reads, or at the last bin, must send every build to the table's own
    lookups: values in that bin get the entry written there."""
    table = reference.code_table(F.create_dynamic_map(True)).clone()
    table[broken_bin] = 0 if broken_bin > 32767 else 255  # below the bin before it, or above the bin after it
    bins = torch.tensor([broken_bin, max(broken_bin - 1, 0), min(broken_bin + 1, 65535)])
    y = (bins.double() / 32767.5 - 1.0).float()  # each bin's centre; blocks of absmax 1, so x = y
    x = torch.cat([y.repeat(85), torch.ones(1)]).repeat(4)
    assert torch.equal(reference.grid_bins(x, torch.tensor(1.0))[:3], bins)  # the values are in the bins named
    q, absmax = torch.empty(x.numel(), dtype=torch.uint8), torch.empty(4)
    lib = capi.cpu_library()
    status = lib.pq_quantize_blockwise(x.data_ptr(), capi.DTYPE_CODES[torch.float32], x.numel(), 256,
                                       table.data_ptr(), q.data_ptr(), absmax.data_ptr())
    assert status == 0
    expected = reference.quantize_with_absmax(x.view(4, 256), torch.ones(4), table).flatten()
    assert int(expected[0]) == int(table[broken_bin])
    assert_same_bits(q, expected)


@pytest.mark.parametrize("code_name", ["signed", "negative_zero", "one_ulp_off", "other_top"])
def test_every_cpu_build_dequantizes_every_index_of_mirrored_maps_like_the_reference(isa, code_name):
    """The avx512vbmi build looks a mirrored map up in its 128-entry half (the sign from the index); each of the 256
    indices, and maps that only nearly mirror, which must take the full table."""
    code = mirror_case_map(code_name)
    q = torch.arange(256, dtype=torch.uint8).repeat(3)[torch.randperm(768, generator=torch.Generator().manual_seed(0))]
    absmax = torch.tensor([1.0, 0.5, 3.0])
    with pyquant.use_backend("reference"):
        expected = F.dequantize_blockwise(q, absmax, code=code, blocksize=256)
    out = F.dequantize_blockwise(q, absmax, code=code, blocksize=256)
    assert_same_bits(out, expected)
    if code_name == "negative_zero":  # the case is what it claims: index 127 gives -0
        assert math.copysign(1.0, float(out[q == 127][0])) == -1.0


@pytest.mark.parametrize("code_name", ["signed", "unsigned", "linear"])
def test_every_cpu_build_bins_the_values_beside_each_step_like_the_reference(isa, code_name):
    """Values within 8 ulps of the grid-bin boundary at each step of the map, in blocks whose absmax is 1 (so y = x):
    where the vector grid bins round once instead of the contract's twice (bench/micro/grid_fma_exhaustive.cpp
    proves them equal on every y), a wrong rounding changes a code exactly here."""
    code = {"signed": F.create_dynamic_map(True), "unsigned": F.create_dynamic_map(False),
            "linear": torch.linspace(-1.0, 1.0, 256)}[code_name]
    with pyquant.use_backend("reference"):
        table = backends.lookup("code_table", "reference")(code).long()
    steps = torch.nonzero(table[1:] != table[:-1]).flatten() + 1  # the first bin of each new index
    boundary = ((steps.double() - 0.5) / 32767.5 - 1.0).float()  # s = (y + 1) * 32767.5 + 0.5 crosses the step here
    near = [boundary]
    for direction in (1.0, -1.0):
        y = boundary
        for _ in range(8):
            y = torch.nextafter(y, torch.full_like(y, direction))
            near.append(y)
    values = torch.cat(near).clamp(-1.0, 1.0)
    values = torch.cat([values, torch.zeros(-len(values) % 255)]).view(-1, 255)
    x = torch.cat([values, torch.ones(len(values), 1)], dim=1).flatten()  # each block of 256 has absmax 1
    with pyquant.use_backend("reference"):
        q_ref, a_ref = F.quantize_blockwise(x, code=code)
    q, a = F.quantize_blockwise(x, code=code)
    assert bool((a_ref == 1.0).all())
    assert_same_bits(q, q_ref)


@needs_bitsandbytes
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


# ---- the triton backend against the reference and cpu backends ----
TRITON_BLOCKSIZES = (64, 256, 100, 4096, 5000)  # 5000 > the kernel's 4096-column tile: the chunked path


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


@pytest.mark.triton
@pytest.mark.parametrize("signed", (True, False), ids=("signed", "unsigned"))
def test_code_table_bits(signed):
    code = F.create_dynamic_map(signed)
    table = backends.lookup("code_table", "triton")(code.to(TRITON_DEVICE))
    assert table.dtype == torch.uint8 and table.shape == (65536,)
    assert_same_bits(table, reference.code_table(code), "code table vs reference", nan_blind=True)
    if HAVE_CPU_LIBRARY:
        assert_same_bits(table, backends.lookup("code_table", "cpu")(code), "code table vs cpu", nan_blind=True)
    # a code with ties and equal neighbours: ties go to the lower index
    odd = torch.linspace(-1, 1, 256)
    odd[100:110] = odd[100]
    assert_same_bits(backends.lookup("code_table", "triton")(odd.to(TRITON_DEVICE)), reference.code_table(odd),
                     "tied code vs reference", nan_blind=True)


@pytest.mark.triton
@pytest.mark.parametrize("blocksize", TRITON_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_blockwise_bits(dtype, blocksize):
    n = 4 * blocksize + 37 if blocksize < 4096 else blocksize + 123  # a partial last block
    x = special_input(n, blocksize, dtype, seed=blocksize)
    code = F.create_dynamic_map(True)
    q, absmax = backends.lookup("quantize_blockwise", "triton")(x.to(TRITON_DEVICE), code.to(TRITON_DEVICE), blocksize)
    assert q.dtype == torch.uint8 and q.shape == x.shape and absmax.shape == (-(-n // blocksize),)
    for name, dev in TRITON_PEERS:
        with pyquant.use_backend(name):
            q_e, absmax_e = F.quantize_blockwise(x.to(dev), code.to(dev), blocksize)
        assert_same_bits(absmax, absmax_e, f"absmax vs {name}", nan_blind=True)
        assert_same_bits(q, q_e, f"codes vs {name}", nan_blind=True)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_unsigned_map_and_2d_shape(dtype):
    gen = torch.Generator().manual_seed(7)
    x = (torch.rand(37, 29, generator=gen) * 1e-3).to(dtype)
    x[0, :5] = 0.0
    code = F.create_dynamic_map(False)
    with pyquant.use_backend("triton"):
        q, absmax = F.quantize_blockwise(x.to(TRITON_DEVICE), code.to(TRITON_DEVICE), 128)
    assert q.shape == x.shape
    for name, dev in TRITON_PEERS:
        with pyquant.use_backend(name):
            q_e, absmax_e = F.quantize_blockwise(x.to(dev), code.to(dev), 128)
        assert_same_bits(absmax, absmax_e, f"absmax vs {name}", nan_blind=True)
        assert_same_bits(q, q_e, f"codes vs {name}", nan_blind=True)


@pytest.mark.triton
def test_quantize_contract_consequences():
    """docs/numerics.md section 2: zero never gets the zero code, NaN -> 0, an all-zero block -> all 0."""
    code = F.create_dynamic_map(True).to(TRITON_DEVICE)
    x = torch.tensor([0.0, 1e-30, -1e-30, float("nan"), 1.0] + [0.0] * 59 + [0.0] * 64, device=TRITON_DEVICE)
    q, absmax = backends.lookup("quantize_blockwise", "triton")(x, code, 64)
    assert q[:5].tolist() == [131, 131, 131, 0, 255]
    assert absmax.tolist() == [1.0, 0.0] and q[64:].eq(0).all()


@pytest.mark.triton
@pytest.mark.parametrize("blocksize", TRITON_BLOCKSIZES)
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
    out = backends.lookup("dequantize_blockwise", "triton")(q.to(TRITON_DEVICE), absmax.to(TRITON_DEVICE),
                                                           code.to(TRITON_DEVICE), blocksize, dtype)
    assert out.dtype == dtype and out.shape == q.shape
    for name, dev in TRITON_PEERS:
        with pyquant.use_backend(name):
            expected = F.dequantize_blockwise(q.to(dev), absmax.to(dev), code.to(dev), blocksize, dtype)
        assert_same_bits(out, expected, f"dequantize vs {name}", nan_blind=True)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_through_public_api(dtype):
    x = special_input(1000, 256, dtype, seed=3)
    with pyquant.use_backend("triton"):
        q, absmax = F.quantize_blockwise(x.to(TRITON_DEVICE))
        out = F.dequantize_blockwise(q, absmax, dtype=dtype)
    with pyquant.use_backend("reference"):
        q_e, absmax_e = F.quantize_blockwise(x.to(TRITON_DEVICE))
        out_e = F.dequantize_blockwise(q_e, absmax_e, dtype=dtype)
    assert_same_bits(out, out_e, "round trip", nan_blind=True)


# ---- the cuda backend against the cpu backend ----
def block_patterns(blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks that are special as a block: all zero, all NaN, subnormal absmax, inf absmax, constant."""
    tiny = torch.finfo(dtype).tiny
    rows = [
        torch.zeros(blocksize),
        torch.full((blocksize,), -0.0),
        torch.full((blocksize,), float("nan")),
        torch.linspace(-tiny / 2, tiny / 4, blocksize),  # subnormal absmax (in dtype): inv = inf for float32
        torch.linspace(-3.0, 3.0, blocksize).index_fill_(0, torch.tensor([blocksize // 2]), float("inf")),
        torch.full((blocksize,), 0.3),
        torch.full((blocksize,), -1e-38),
    ]
    return torch.cat(rows).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [1, 7, 32, 64, 255, 256, 257, 1000, 4096, 70000])
def test_quantize_matches_cpu(cuda_backends, dtype, blocksize):
    cpu, cuda = cuda_backends
    n = 3 * blocksize + blocksize // 3 + 5 if blocksize < 4096 else 200_003
    x = torch.cat([special_values(n, dtype, seed=blocksize), block_patterns(blocksize, dtype)])
    for signed in (True, False):
        code = F.create_dynamic_map(signed)
        q_c, a_c = cpu["quantize_blockwise"](x, code, blocksize)
        q_g, a_g = cuda["quantize_blockwise"](x.cuda(), code.cuda(), blocksize)
        assert_same_bits(a_g, a_c, f"absmax signed={signed}", nan_blind=True)
        assert_same_bits(q_g, q_c, f"codes signed={signed}", nan_blind=True)


@pytest.mark.gpu
def test_quantize_custom_code_and_shapes(cuda_backends):
    cpu, cuda = cuda_backends
    code = torch.sort(torch.randn(256, generator=torch.Generator().manual_seed(0))).values
    code = code / code.abs().max()
    for shape in [(0,), (1,), (3, 5), (17, 33, 9)]:
        x = special_values(math.prod(shape), torch.float32, seed=len(shape)).reshape(shape)
        q_c, a_c = cpu["quantize_blockwise"](x, code, 64)
        q_g, a_g = cuda["quantize_blockwise"](x.cuda(), code.cuda(), 64)
        assert q_g.shape == shape and q_g.device.type == "cuda"
        assert_same_bits(a_g, a_c, f"absmax {shape}", nan_blind=True)
        assert_same_bits(q_g, q_c, f"codes {shape}", nan_blind=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [1, 64, 256, 333, 4096])
def test_dequantize_matches_cpu(cuda_backends, dtype, blocksize):
    cpu, cuda = cuda_backends
    g = torch.Generator().manual_seed(blocksize)
    n = 5 * blocksize + 17
    q = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    blocks = -(-n // blocksize)
    absmax = torch.rand(blocks, generator=g) * torch.exp2(torch.randint(-140, 100, (blocks,), generator=g).float())
    absmax[: min(blocks, 4)] = torch.tensor([0.0, float("inf"), float("nan"), 1e-45])[: min(blocks, 4)]
    for signed in (True, False):
        code = F.create_dynamic_map(signed)
        out_c = cpu["dequantize_blockwise"](q, absmax, code, blocksize, dtype)
        out_g = cuda["dequantize_blockwise"](q.cuda(), absmax.cuda(), code.cuda(), blocksize, dtype)
        assert out_g.dtype == dtype
        assert_same_bits(out_g, out_c, f"dequantize signed={signed}", nan_blind=True)


@pytest.mark.gpu
def test_public_api_uses_cuda_backend(cuda_backends):
    x = special_values(10_000, torch.float32, seed=7)
    with pyquant.use_backend("cpu"):
        q_c, a_c = F.quantize_blockwise(x)
        out_c = F.dequantize_blockwise(q_c, a_c, dtype=torch.bfloat16)
    with pyquant.use_backend("cuda"):
        q_g, a_g = F.quantize_blockwise(x.cuda())
        out_g = F.dequantize_blockwise(q_g, a_g, dtype=torch.bfloat16)
    assert_same_bits(q_g, q_c, "codes", nan_blind=True)
    assert_same_bits(a_g, a_c, "absmax", nan_blind=True)
    assert_same_bits(out_g, out_c, "dequantized", nan_blind=True)


@pytest.mark.gpu
def test_kernels_run_on_the_current_stream(cuda_backends):
    cpu, cuda = cuda_backends
    x = special_values(1 << 20, torch.float16, seed=3)
    code = F.create_dynamic_map(True)
    q_c, a_c = cpu["quantize_blockwise"](x, code, 256)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xg, codeg = x.cuda(non_blocking=True), code.cuda(non_blocking=True)
        q_g, a_g = cuda["quantize_blockwise"](xg, codeg, 256)
        out_g = cuda["dequantize_blockwise"](q_g, a_g, codeg, 256, torch.float32)
    stream.synchronize()
    assert_same_bits(q_g, q_c, "codes", nan_blind=True)
    assert_same_bits(a_g, a_c, "absmax", nan_blind=True)
    assert_same_bits(out_g, cpu["dequantize_blockwise"](q_c, a_c, code, 256, torch.float32), "dequantized",
                     nan_blind=True)
