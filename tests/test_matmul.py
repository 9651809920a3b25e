"""pyquant.ops.matmul: the error bound against float64 on every backend (awkward shapes, strides, dtypes),
the cpu kernel's exact summation order, batching, autograd, the custom op, thread-count determinism and
the errors. The bound (docs/low_precision.md, section 2):

    |C - C64| <= gamma_n * S * (1 + u_out) + u_out * |C64| + eta,    S = |bias| + sum_k |a_ik| |b_kj|,

gamma_n = n u / (1 - n u), u = 2^-24, n = K (+1 with a bias) terms, u_out the unit roundoff of the output
dtype (0 for float32), eta the absolute terms of underflow (and of the flushes of the bf16 dot product).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyquant
from pyquant._ops import matmul as matmul_op
from pyquant.backends import capi
from pyquant.backends.cpu import set_bf16_dot
from pyquant.ops.gemm import linear, matmul

from conftest import CPU_BACKENDS, HAVE_CPU_LIBRARY, TRITON_DEVICE, cpu_isa, needs_cpu_library

DTYPES = (torch.float16, torch.bfloat16)
U_OUT = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TINY_OUT = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}  # half the smallest spacing


def has_cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


BF16_DOT = HAVE_CPU_LIBRARY and capi.cpu_isa().startswith("avx512") and has_cpu_flag("avx512_bf16")


# ---- the bound ----
def bound(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, bias=None, bias_dim=-1, flushes=False):
    """(C64, allowed |C - C64|) for C = a @ b (+ bias) with broadcasting, in float64."""
    a64, b64 = a.double(), b.double()
    c64 = torch.matmul(a64, b64)
    s = torch.matmul(a64.abs(), b64.abs())
    n = a.shape[-1]
    if bias is not None:
        bias64 = bias.double() if bias_dim == -1 else bias.double().unsqueeze(-1)
        c64, s, n = c64 + bias64, s + bias64.abs(), n + 1
    u, u_out = 2.0**-24, U_OUT[out_dtype]
    gamma = n * u / (1 - n * u)
    # 2 n 2^-53 S: the float64 reference's own error; n 2^-150: float32 underflow in the chain
    eta = TINY_OUT[out_dtype] + n * 2.0**-150
    if flushes:  # AVX512-BF16: inputs and results below 2^-126 flushed (docs, section 2)
        row_sums = torch.matmul(a64.abs(), torch.ones_like(b64))  # sum_k |a_ik|
        col_sums = torch.matmul(torch.ones_like(a64), b64.abs())  # sum_k |b_kj|
        eta += 2.0**-126 * (n + row_sums + col_sums)
    allowed = (gamma * (1 + u_out) + 2 * n * 2.0**-53) * s + u_out * c64.abs() + eta
    return c64, allowed * (1 + 1e-9)


def assert_within_bound(c: torch.Tensor, a, b, out_dtype, bias=None, bias_dim=-1, what=""):
    c64, allowed = bound(a, b, out_dtype, bias, bias_dim, flushes=BF16_DOT and a.dtype == b.dtype == torch.bfloat16)
    assert c.dtype == out_dtype, what
    assert c.shape == c64.shape, f"{what}: shape {tuple(c.shape)} != {tuple(c64.shape)}"
    err = (c.double() - c64).abs()
    bad = ~(err <= allowed)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {c.numel()} outside the bound, e.g. at {i}: got {c[tuple(i)].item()}, "
            f"float64 {c64[tuple(i)].item()}, |err| {err[tuple(i)].item():.3e} > {allowed[tuple(i)].item():.3e}"
        )


def operand(shape, dtype, seed, layout="contiguous"):
    """Random values spanning a few binades with both signs, laid out contiguous, transposed (the last two
    dimensions swapped in memory) or strided (every other element of a larger tensor in both dims)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))).to(dtype)
    if layout == "transposed":
        x = x.mT.contiguous().mT
    elif layout == "strided":
        big = torch.zeros(shape[:-2] + (2 * shape[-2], 2 * shape[-1]), dtype=dtype)
        big[..., ::2, ::2] = x
        x = big[..., ::2, ::2]
    return x


def backend_ctx(name):
    return pyquant.use_backend(name)


@pytest.fixture
def bf16_dot():
    """Restores the bf16 dot-product setting after a test that changes it."""
    previous = set_bf16_dot(True)
    yield
    set_bf16_dot(previous)


# ---- the bound over awkward shapes and layouts ----
SHAPES = [
    (1, 1, 1),
    (1, 33, 1),  # K = 1
    (7, 5, 3),
    (14, 32, 16),  # exactly one avx512 register tile
    (15, 31, 17),  # one more / one less than a tile in every dimension
    (29, 65, 257),  # K crosses a K block (256)
    (170, 70, 40),  # M crosses a row block
    (3, 100, 16384),  # K = 16384; N crosses a column block (packed B is K x 64 there)
]
LAYOUTS = ["contiguous", "transposed", "strided"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bound_over_shapes_and_layouts(backend, dtype, shape):
    m, n, k = shape
    for i, (la, lb) in enumerate([(x, y) for x in LAYOUTS for y in LAYOUTS]):
        if k >= 4096 and i % 3:  # the big K: fewer layout pairs
            continue
        a, b = operand((m, k), dtype, 10 * i, la), operand((k, n), dtype, 10 * i + 1, lb)
        with backend_ctx(backend):
            for out_dtype in (None, torch.float32):
                c = matmul(a, b, out_dtype=out_dtype)
                assert_within_bound(c, a, b, out_dtype or dtype, what=f"{backend} {la} x {lb} -> {out_dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bias_rows_and_columns_and_cross_dtypes(backend):
    a, b = operand((37, 45), torch.float16, 1), operand((45, 19), torch.float16, 2)
    with backend_ctx(backend):
        for bias_dim, size in ((-1, 19), (-2, 37)):
            for bias_dtype in (torch.float32, torch.float16, torch.bfloat16):
                bias = operand((1, size), bias_dtype, 3)[0]
                for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
                    c = matmul_op(a, b, bias, bias_dim, out_dtype)
                    assert_within_bound(c, a, b, out_dtype, bias, bias_dim, what=f"bias {bias_dim} {bias_dtype}")
        # mixed operand dtypes (as in backward with float32 gradients): float32 x float16
        g = operand((37, 45), torch.float32, 4)
        assert_within_bound(matmul_op(g, b, None, -1, torch.float32), g, b, torch.float32, what="f32 x f16")


# ---- the cpu kernel: exactly the sequential float32 fma chain ----
def fma_chain(a: torch.Tensor, b: torch.Tensor, order, start=None) -> torch.Tensor:
    from pyquant.backends.reference.optimizer import fma32

    c = torch.zeros(a.shape[0], b.shape[1]) if start is None else start.float().clone()
    for k in order:
        c = fma32(a[:, k : k + 1].float(), b[k : k + 1, :].float(), c)
    return c


def pair_order(k: int) -> list[int]:
    return [j for p in range(0, k, 2) for j in ((p + 1, p) if p + 1 < k else (p,))]


@needs_cpu_library
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_bits_are_the_sequential_fma_chain(dtype, bf16_dot):
    for m, n, k in ((5, 7, 3), (15, 33, 17), (20, 40, 300)):
        a, b = operand((m, k), dtype, k), operand((k, n), dtype, k + 1, "transposed")
        seq = fma_chain(a, b, range(k))
        set_bf16_dot(False)
        assert torch.equal(matmul(a, b, out_dtype=torch.float32), seq)
        assert torch.equal(matmul(a, b).view(torch.int16), seq.to(dtype).view(torch.int16))  # one rounding
        set_bf16_dot(True)
        expected = fma_chain(a, b, pair_order(k)) if (BF16_DOT and dtype == torch.bfloat16) else seq
        assert torch.equal(matmul(a, b, out_dtype=torch.float32), expected)


@needs_cpu_library
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_narrow_tile_and_transposed_products_keep_the_chain(dtype, bf16_dot):
    """At most 16 columns: the 28 x 16 tile (here over several row panels and two K blocks); at most 16 rows
    and more columns: computed as C^T = B^T @ A^T. Both must still give every element the chain c = bias;
    c = fma(a_ik, b_kj, c) in order of k (pairs of k with the bf16 dot product), biases per column and per row."""
    cases = [((70, 16, 300), "contiguous"), ((61, 9, 40), "transposed"), ((16, 100, 520), "transposed"),
             ((5, 40, 33), "strided"), ((1, 17, 8), "contiguous")]
    for (m, n, k), layout in cases:
        a, b = operand((m, k), dtype, m, layout), operand((k, n), dtype, n, "transposed")
        for bias_dim, size in ((-1, n), (-2, m)):
            bias = operand((1, size), torch.float32, 3)[0]
            start = bias.expand(m, n) if bias_dim == -1 else bias[:, None].expand(m, n)
            set_bf16_dot(False)
            seq = fma_chain(a, b, range(k), start)
            assert torch.equal(matmul_op(a, b, bias, bias_dim, torch.float32), seq), (m, n, k, bias_dim)
            set_bf16_dot(True)
            paired = BF16_DOT and dtype == torch.bfloat16
            expected = fma_chain(a, b, pair_order(k), start) if paired else seq
            assert torch.equal(matmul_op(a, b, bias, bias_dim, torch.float32), expected), (m, n, k, bias_dim)


@needs_cpu_library
def test_cpu_bits_same_on_every_instruction_set(bf16_dot):
    set_bf16_dot(False)
    cases = [(operand((29, 45), dt, 5, la), operand((45, 70), dt, 6, "transposed")) for dt in DTYPES for la in LAYOUTS]
    cases.append((operand((9, 300), torch.float16, 7), operand((300, 33), torch.float16, 8)))  # 2 K blocks
    expected = [matmul(a, b, out_dtype=torch.float32) for a, b in cases]
    for isa in range(capi.cpu_library().pq_isa()):
        with cpu_isa(isa):
            for (a, b), e in zip(cases, expected):
                assert torch.equal(matmul(a, b, out_dtype=torch.float32), e), f"isa {isa}"


# ---- batching and 1-D operands ----
BATCH_CASES = [
    ((2, 1, 5, 7), (3, 7, 4)),
    ((5, 7), (2, 3, 7, 4)),
    ((4, 5, 7), (7, 3)),  # folded into one product of 20 rows
    ((2, 3, 5, 7), (2, 3, 7, 4)),
    ((1, 6, 7), (6, 1, 7, 2)),
    ((7,), (7,)),
    ((7,), (2, 7, 4)),
    ((2, 5, 7), (7,)),
    ((3, 0, 7), (7, 4)),
    ((3, 5, 0), (0, 4)),  # K = 0: zeros
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", BATCH_CASES, ids=str)
def test_batched_broadcasting_like_torch_matmul(backend, case):
    sa, sb = case
    g = torch.Generator().manual_seed(len(sa) + 10 * len(sb))
    a, b = torch.randn(sa, generator=g).half(), torch.randn(sb, generator=g).half()
    with backend_ctx(backend):
        c = matmul(a, b)
    expected = torch.matmul(a.double(), b.double())
    assert c.shape == expected.shape and c.dtype == torch.float16
    if a.dim() >= 2 and b.dim() >= 2:
        assert_within_bound(c, a, b, torch.float16)
    else:
        assert torch.allclose(c.double(), expected, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batched_non_contiguous_batches(backend):
    base = operand((6, 9, 5, 11), torch.bfloat16, 3)
    a = base.permute(1, 0, 2, 3)[:, ::2]  # batch dims (9, 3) with strides that do not merge
    b = operand((3, 11, 4), torch.bfloat16, 4, "transposed").expand(9, 3, 11, 4)
    with backend_ctx(backend):
        assert_within_bound(matmul(a, b), a, b, torch.bfloat16)


# ---- autograd ----
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "shapes", [((6, 9), (9, 5)), ((3, 6, 9), (9, 5)), ((2, 1, 6, 9), (3, 9, 5)), ((6, 9), (2, 9, 5))], ids=str
)
def test_backward_against_float64(backend, shapes):
    sa, sb = shapes
    a = operand(sa, torch.float16, 1).requires_grad_()
    b = operand(sb, torch.float16, 2).requires_grad_()
    with backend_ctx(backend):
        c = matmul(a, b)
        grad = operand(tuple(c.shape), torch.float16, 3)
        c.backward(grad)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    torch.matmul(a64, b64).backward(grad.double())
    assert a.grad.dtype == b.grad.dtype == torch.float16
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    # grad_a = grad @ b^T summed over a's broadcast dimensions: a sum of (N x broadcast count) products
    for g, g64, left, right in ((a.grad, a64.grad, grad, b.detach().mT), (b.grad, b64.grad, a.detach().mT, grad)):
        full = torch.matmul(left.double().abs(), right.double().abs())  # per-batch |terms| sums
        terms = full.sum_to_size(g.shape)
        count = full.numel() // g.numel() * left.shape[-1]  # products summed into one gradient element
        gamma = count * 2.0**-24 / (1 - count * 2.0**-24)
        allowed = gamma * (1 + 2.0**-11) * terms + 2.0**-11 * g64.abs() + 2.0**-25
        assert ((g.double() - g64).abs() <= allowed * (1 + 1e-9)).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_bias_gradient(backend):
    x = operand((4, 3, 10), torch.bfloat16, 1).requires_grad_()
    w = operand((6, 10), torch.bfloat16, 2).requires_grad_()
    bias = operand((1, 6), torch.bfloat16, 3)[0].requires_grad_()
    with backend_ctx(backend):
        y = linear(x, w, bias)
        y.float().sum().backward()
    assert_within_bound(y, x.detach(), w.detach().t(), torch.bfloat16, bias.detach())
    assert torch.equal(bias.grad, torch.full((6,), 12.0, dtype=torch.bfloat16))
    # d/dW of sum(x @ W^T) = ones(6, 12) @ x (the 12 rows of x)
    assert_within_bound(w.grad, torch.ones(6, 12, dtype=torch.bfloat16), x.detach().flatten(0, 1), torch.bfloat16)


# ---- the custom op ----
def test_opcheck_and_meta():
    a, b = operand((2, 5, 7), torch.float16, 1), operand((7, 4), torch.float16, 2)
    bias = operand((1, 4), torch.float16, 3)[0]
    cases = [
        (a, b, None, -1, torch.float16),
        (a, b, bias, -1, torch.float32),
        (a, b, operand((1, 5), torch.float32, 4)[0], -2, torch.bfloat16),
        (a.bfloat16().mT.contiguous().mT, b.bfloat16().t().contiguous().t(), None, -1, torch.bfloat16),
    ]
    for args in cases:
        torch.library.opcheck(matmul_op, args)
        grad_args = tuple(t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
        torch.library.opcheck(matmul_op, grad_args)
    out = matmul(a.to("meta"), b.to("meta"), out_dtype=torch.float32)
    assert out.device.type == "meta" and out.shape == (2, 5, 4) and out.dtype == torch.float32


# ---- the Triton kernel under the interpreter (or on the GPU) ----
@pytest.mark.triton
def test_triton_within_bound():
    device = TRITON_DEVICE
    with pyquant.use_backend("triton"):
        for dtype in DTYPES:
            for (m, n, k), (la, lb) in (((1, 1, 1), ("contiguous", "contiguous")),
                                          ((33, 17, 40), ("transposed", "strided")),
                                          ((20, 70, 3), ("strided", "transposed"))):
                a, b = operand((m, k), dtype, m, la).to(device), operand((k, n), dtype, n, lb).to(device)
                for out_dtype in (None, torch.float32):
                    c = matmul(a, b, out_dtype=out_dtype).cpu()
                    assert_within_bound(c, a.cpu(), b.cpu(), out_dtype or dtype, what=f"triton {m}x{n}x{k}")
        a, b = operand((2, 1, 9, 20), torch.float16, 1).to(device), operand((3, 20, 18), torch.float16, 2).to(device)
        bias = operand((1, 18), torch.bfloat16, 3)[0].to(device)
        c = matmul_op(a, b, bias, -1, torch.float16).cpu()
        assert_within_bound(c, a.cpu(), b.cpu(), torch.float16, bias.cpu(), -1, what="triton batched + bias")
        row_bias = operand((1, 9), torch.float32, 4)[0].to(device)
        c = matmul_op(a, b, row_bias, -2, torch.float32).cpu()
        assert_within_bound(c, a.cpu(), b.cpu(), torch.float32, row_bias.cpu(), -2, what="triton row bias")


# ---- results independent of the number of threads ----
DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, torch
    from pyquant.ops.gemm import matmul
    torch.set_num_threads(int(sys.argv[1]))
    g = torch.Generator().manual_seed(0)
    h = hashlib.sha256()
    for dtype in (torch.float16, torch.bfloat16):
        for m, n, k in ((300, 200, 700), (64, 1000, 96), (5, 3000, 40)):
            a = torch.randn(m, k, generator=g).to(dtype)
            b = torch.randn(k, n, generator=g).to(dtype)
            h.update(matmul(a, b, out_dtype=torch.float32).numpy().tobytes())
            h.update(matmul(a, b.t().contiguous().t()).view(torch.int16).numpy().tobytes())
        a = torch.randn(8, 64, 70, generator=g).to(dtype)
        b = torch.randn(70, 90, generator=g).to(dtype)
        h.update(matmul(a, b).view(torch.int16).numpy().tobytes())
    print(h.hexdigest())
    """
)


@needs_cpu_library
def test_bits_independent_of_thread_count():
    digests = set()
    for threads in (1, 2, 3):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, str(threads)], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1


# ---- errors ----
def test_clear_errors():
    h = torch.ones(3, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        matmul(torch.ones(3, 4), torch.ones(4, 2))
    with pytest.raises(TypeError, match="same dtype"):
        matmul(h, torch.ones(4, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="inner dimensions"):
        matmul(h, torch.ones(5, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="do not broadcast"):
        matmul(torch.ones(2, 3, 4, dtype=torch.float16), torch.ones(3, 4, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="same device"):
        matmul(h, torch.ones(4, 2, dtype=torch.float16, device="meta"))
    with pytest.raises(TypeError, match="out_dtype"):
        matmul(h, h.t(), out_dtype=torch.int32)
    with pytest.raises(ValueError, match="at least one dimension"):
        matmul(torch.tensor(1.0, dtype=torch.float16), h)
    with pytest.raises(TypeError, match="torch.Tensor"):
        matmul([[1.0]], h)
    with pytest.raises(ValueError, match="features"):
        linear(h, torch.ones(2, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="bias"):
        linear(h, torch.ones(2, 4, dtype=torch.float16), torch.ones(3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_special_values(backend):
    a = torch.tensor([[1.0, 2.0], [float("inf"), 1.0], [float("nan"), 0.0], [60000.0, 60000.0]], dtype=torch.float16)
    b = torch.tensor([[1.0, -1.0], [1.0, 2.0]], dtype=torch.float16)
    with backend_ctx(backend):
        c = matmul(a, b)
    assert c[0].tolist() == [3.0, 3.0]
    assert c[1, 0] == float("inf") and c[1, 1] == -float("inf")
    assert torch.isnan(c[2]).all()
    assert c[3, 0] == float("inf") and c[3, 1] == 60000.0  # 120000 overflows float16; the float32 sum does not
    assert matmul(a[3:], b, out_dtype=torch.float32)[0, 0] == 120000.0


# ---- the implicit im2col (pyquant::im2col_matmul, pyquant/ops/conv16.py) ----
# (N, H, W, C, kernel, stride, padding, dilation): padding, stride 2, a dilated asymmetric kernel, C = 1, runs of
# C = 70 straddling the K blocks (K = 630) and the 28-row panels, and a 1 x 1 kernel with padding.
IM2COL_CASES = [
    (2, 11, 9, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 10, 9, 5, (3, 2), (2, 1), (2, 0), (2, 1)),
    (2, 13, 12, 1, (7, 7), (2, 2), (3, 3), (1, 1)),
    (2, 9, 8, 70, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 5, 6, 3, (1, 1), (1, 1), (1, 1), (1, 1)),
]


def im2col_operands(case, dtype, channels_last=True):
    from pyquant.ops.conv16 import columns

    n, h, w, c, *geometry = case
    x = operand((n, c, h, w), dtype, 11).permute(0, 2, 3, 1)  # NHWC view of an NCHW tensor
    if channels_last:
        x = x.contiguous()
    return x, geometry, columns(x, *geometry)


@needs_cpu_library
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", IM2COL_CASES, ids=str)
def test_im2col_matmul_bits_equal_the_explicit_columns(dtype, case, bf16_dot):
    """columns(x) @ W (any number of outputs: narrow and wide tiles, a bias per column) and G^T @ columns(x) (the
    transposed product, a bias per row) give the bits of the cpu matmul on the explicit copy of the columns, with
    and without the bf16 dot product, for float32 and 16-bit outputs, and within the bound of float64."""
    from pyquant.ops.conv16 import im2col_matmul

    x, geometry, cols = im2col_operands(case, dtype, channels_last=case[3] != 5)
    for dot in (True, False):
        set_bf16_dot(dot)
        for cout in (1, 7, 16, 40):
            w = operand((cout, cols.shape[1]), dtype, 12).t()
            g = operand((cols.shape[0], cout), dtype, 13)
            for out_dtype in (torch.float32, dtype):
                bias = operand((1, cout), dtype, 14)[0]
                got = im2col_matmul(x, w, *geometry, bias=bias, out_dtype=out_dtype)
                assert torch.equal(got, matmul_op(cols, w, bias, -1, out_dtype)), (cout, out_dtype, dot)
                got_t = im2col_matmul(x, g.t(), *geometry, columns_first=False, bias=bias, bias_dim=-2,
                                      out_dtype=out_dtype)
                assert torch.equal(got_t, matmul_op(g.t(), cols, bias, -2, out_dtype)), (cout, out_dtype, dot)
            assert_within_bound(got, cols, w, out_dtype, bias)
            assert_within_bound(got_t, g.t(), cols, out_dtype, bias, bias_dim=-2)


@needs_cpu_library
def test_im2col_matmul_same_bits_on_every_instruction_set_and_thread_count(bf16_dot):
    from pyquant.ops.conv16 import im2col_matmul

    set_bf16_dot(False)
    cases = []
    for dtype in DTYPES:
        x, geometry, cols = im2col_operands(IM2COL_CASES[3], dtype)
        cases.append((x, operand((cols.shape[1], 20), dtype, 15), geometry, True))
        cases.append((x, operand((9, cols.shape[0]), dtype, 16), geometry, False))

    def run_all():
        return [im2col_matmul(x, o, *geo, columns_first=first, out_dtype=torch.float32) for x, o, geo, first in cases]

    expected = run_all()
    for isa in range(capi.cpu_library().pq_isa()):
        with cpu_isa(isa):
            assert all(map(torch.equal, run_all(), expected)), f"isa {isa}"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert all(map(torch.equal, run_all(), expected)), "2 threads"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_im2col_matmul_reference_backend_and_opcheck(backend):
    from pyquant._ops import im2col_matmul as im2col_matmul_op
    from pyquant.ops.conv16 import im2col_matmul

    x, geometry, cols = im2col_operands(IM2COL_CASES[1], torch.float16)
    w = operand((cols.shape[1], 6), torch.float16, 17)
    with backend_ctx(backend):
        got = im2col_matmul(x, w, *geometry, out_dtype=torch.float32)
        flat = [v for pair in geometry for v in pair]
        torch.library.opcheck(im2col_matmul_op, (x, w, None, -1, flat, True, torch.float16))
        g = operand((6, cols.shape[0]), torch.float16, 18)
        torch.library.opcheck(im2col_matmul_op, (x, g, None, -1, flat, False, torch.float16))
    assert_within_bound(got, cols, w, torch.float32)
    meta = im2col_matmul(x.to("meta"), w.to("meta"), *geometry)
    assert meta.device.type == "meta" and meta.shape == (cols.shape[0], 6) and meta.dtype == torch.float16


def test_im2col_matmul_clear_errors():
    from pyquant.ops.conv16 import im2col_matmul

    x = torch.ones(1, 5, 5, 3, dtype=torch.float16)
    w = torch.ones(27, 4, dtype=torch.float16)
    geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="4-D"):
        im2col_matmul(x[0], w, *geometry)
    with pytest.raises(TypeError, match="float16"):
        im2col_matmul(x, w.float(), *geometry)
    with pytest.raises(ValueError, match="columns need 27"):
        im2col_matmul(x, w[:20], *geometry)
    with pytest.raises(ValueError, match="does not fit"):
        im2col_matmul(x, w, (7, 7), (1, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="padding >= 0"):
        im2col_matmul(x, w, (3, 3), (0, 1), (1, 1), (1, 1))
