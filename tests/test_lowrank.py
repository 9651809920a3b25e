"""pyquant.ops.lowrank_conv2d and pyquant.nn.LowRankConv2d: every backend against the float64 reference.

Tolerance (docs/compress.md, "Numerics"): with y64 the float64 result of the unfused pair on the same
(dtype-rounded) operands and B = |W2| (|W1| * |x|) + |b| the same computation on absolute values,
|y - y64| <= 2^-16 B for float32 and 2^-16 B + u |y64| for float16 (u = 2^-11) and bfloat16 (u = 2^-8):
float32 accumulation in another order, then one rounding. Triton runs under its interpreter
(TRITON_INTERPRET=1, tests/conftest.py) on small shapes.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyquant
from pyquant import _autograd
from pyquant._contract import ISA_NAMES
from pyquant.backends import capi
from pyquant.backends.cpu import conv as cpu_conv
from pyquant.backends.cpu import set_bf16_dot
from pyquant.backends.reference import conv as reference_conv
from pyquant.nn import LowRankConv2d
from pyquant.nn.lowrank import LowRankLinear
from pyquant.ops import lowrank_conv2d
from pyquant.ops import lowrank_conv as L

from conftest import CPU_BACKENDS, HAVE_CPU_LIBRARY, needs_cpu_library

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
UNIT = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# (N, C, H, W, R, O, kernel, stride, padding, dilation)
SHAPES = [
    (2, 5, 9, 11, 3, 7, (3, 3), (1, 1), (1, 1), (1, 1)),  # odd sizes, odd rank and outputs
    (2, 6, 10, 9, 4, 8, (3, 3), (2, 2), (1, 1), (1, 1)),  # stride 2
    (1, 4, 13, 10, 5, 6, (3, 2), (2, 1), (2, 0), (2, 1)),  # asymmetric everything, dilation
    (3, 7, 7, 7, 1, 3, (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1, rank 1
    (1, 3, 17, 19, 9, 10, (5, 5), (3, 2), (2, 3), (1, 2)),  # stride 3, rank 9 (one 8-block and a rest)
    (2, 6, 8, 8, 6, 5, (1, 1), (2, 2), (0, 0), (1, 1)),  # strided 1x1
    (1, 33, 12, 30, 13, 17, (3, 3), (1, 1), (1, 1), (1, 1)),  # odd channels (bf16 pairs), wide rows
    (2, 16, 28, 28, 16, 32, (3, 3), (1, 1), (1, 1), (1, 1)),  # DenseNet-like, several tiles
    (1, 8, 3, 40, 12, 4, (3, 3), (1, 1), (3, 1), (2, 1)),  # padding larger than the input rows
    (2, 9, 30, 31, 3, 5, (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1 read in place (float32), several tiles
    (2, 5, 12, 17, 7, 6, (3, 5), (1, 1), (1, 2), (2, 1)),  # stride 1, padding below "same": x read with masks
    (1, 3, 20, 100, 2, 3, (3, 3), (1, 1), (0, 0), (1, 1)),  # no padding, wide rows: several row tiles
    (37, 9, 1, 1, 24, 40, (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1 on 1x1 images, batched: vectors span images
    (9, 21, 3, 5, 20, 37, (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1 on 3x5 images (batched but float32), odd C
]
SMALL = SHAPES[:4] + [SHAPES[5]]


def make(shape, dtype, seed=0, bias=True):
    n, c, h, w, r, o, k, *_ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    w1 = (torch.randn(r, c, *k, generator=g) / (c * k[0] * k[1]) ** 0.5).to(dtype)
    w2 = (torch.randn(o, r, generator=g) / r**0.5).to(dtype)
    b = torch.randn(o, generator=g).to(dtype) if bias else None
    return x, w1, w2, b


def exact(x, w1, w2, b, stride, padding, dilation):
    """(y64, bound, t64, t_bound): the float64 unfused pair and the same on absolute values."""
    d = torch.float64
    t = F.conv2d(x.to(d), w1.to(d), None, stride, padding, dilation)
    tb = F.conv2d(x.to(d).abs(), w1.to(d).abs(), None, stride, padding, dilation)
    y = F.conv2d(t, w2.to(d)[:, :, None, None], None if b is None else b.to(d))
    yb = F.conv2d(tb, w2.to(d).abs()[:, :, None, None], None if b is None else b.to(d).abs())
    return y, yb, t, tb


def assert_within(actual, y64, bound, dtype, what):
    assert actual.dtype == dtype and actual.shape == y64.shape, what
    err = (actual.to(torch.float64) - y64).abs()
    allowed = 2.0**-16 * bound + UNIT[dtype] * y64.abs() + (2.0**-24 if dtype == torch.float16 else 0.0)
    bad = err > allowed
    assert not bad.any(), f"{what}: {int(bad.sum())} of {err.numel()} outside the tolerance, worst {float((err - allowed).max()):.3g}"


# ---- forward ----
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"_k{s[6]}_s{s[7]}_p{s[8]}_d{s[9]}")
def test_forward_matches_float64(backend, dtype, shape):
    x, w1, w2, b = make(shape, dtype)
    stride, padding, dilation = shape[7:]
    y64, bound, t64, tbound = exact(x, w1, w2, b, stride, padding, dilation)
    with pyquant.use_backend(backend):
        y = lowrank_conv2d(x, w1, w2, b, stride, padding, dilation)
        y2, t = torch.ops.pyquant.lowrank_conv2d_train(x, w1, w2, b, list(stride), list(padding), list(dilation))
    assert_within(y, y64, bound, dtype, f"{backend} y")
    assert torch.equal(y, y2), "the inference and training ops compute the same output"
    assert_within(t, t64, tbound, dtype, f"{backend} t")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: "x".join(map(str, s[:6])))
def test_triton_matches_float64(dtype, shape):
    x, w1, w2, b = make(shape, dtype, seed=1, bias=shape[4] != 1)
    stride, padding, dilation = shape[7:]
    y64, bound, t64, tbound = exact(x, w1, w2, b, stride, padding, dilation)
    with pyquant.use_backend("triton"):
        y, t = torch.ops.pyquant.lowrank_conv2d_train(x, w1, w2, b, list(stride), list(padding), list(dilation))
        y_inf = torch.ops.pyquant.lowrank_conv2d(x, w1, w2, b, list(stride), list(padding), list(dilation))
    assert_within(y, y64, bound, dtype, "triton y")
    assert_within(t, t64, tbound, dtype, "triton t")
    assert torch.equal(y, y_inf)


@needs_cpu_library
@pytest.mark.parametrize("shape", [SHAPES[7], SHAPES[12]], ids=["3x3", "1x1-batched"])  # 1x1: tiles per thread
def test_cpu_deterministic_for_any_thread_count(shape):
    x, w1, w2, b = make(shape, torch.float32, seed=3)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            outs.append(cpu_conv.lowrank_conv2d(x, w1, w2, b, *[list(v) for v in shape[7:]], True))
    finally:
        torch.set_num_threads(before)
    for y, t in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(t, outs[0][1])


@needs_cpu_library
@pytest.mark.parametrize("isa", list(ISA_NAMES), ids=list(ISA_NAMES.values()), indirect=True)  # the isa fixture
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_every_instruction_set(isa, dtype):
    for shape in (SHAPES[2], SHAPES[4], SHAPES[6], SHAPES[12], SHAPES[13]):
        x, w1, w2, b = make(shape, dtype, seed=isa)
        y64, bound, t64, tbound = exact(x, w1, w2, b, *shape[7:])
        y, t = cpu_conv.lowrank_conv2d(x, w1, w2, b, *[list(v) for v in shape[7:]], True)
        assert_within(y, y64, bound, dtype, f"isa {isa} y")
        assert_within(t, t64, tbound, dtype, f"isa {isa} t")


@needs_cpu_library
def test_cpu_float32_same_bits_whatever_the_batch():
    """float32 3x3: x read in place (a batch of at most 2^20 floats) or staged tile by tile (larger batches) sums
    in the same order, so an image's output does not depend on the batch it came in."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(65, 64, 16, 16, generator=g)  # 65 x 16 Ki floats: staged; one image: in place
    w1, w2, b = torch.randn(4, 64, 3, 3, generator=g) / 24, torch.randn(32, 4, generator=g), torch.randn(32, generator=g)
    y_batch, _ = cpu_conv.lowrank_conv2d(x, w1, w2, b, [1, 1], [1, 1], [1, 1], False)
    for i in (0, 64):
        y_one, _ = cpu_conv.lowrank_conv2d(x[i : i + 1].contiguous(), w1, w2, b, [1, 1], [1, 1], [1, 1], False)
        assert torch.equal(y_batch[i : i + 1], y_one)


@needs_cpu_library
def test_cpu_bfloat16_pair_kernel_and_float32_path_agree():
    x, w1, w2, b = make(SHAPES[6], torch.bfloat16, seed=5)
    y64, bound, *_ = exact(x, w1, w2, b, (1, 1), (1, 1), (1, 1))
    previous = set_bf16_dot(False)
    try:
        y_f32path, _ = cpu_conv.lowrank_conv2d(x, w1, w2, b, [1, 1], [1, 1], [1, 1], False)
        set_bf16_dot(True)
        y_pairs, _ = cpu_conv.lowrank_conv2d(x, w1, w2, b, [1, 1], [1, 1], [1, 1], False)
    finally:
        set_bf16_dot(previous)
    assert_within(y_f32path, y64, bound, torch.bfloat16, "float32 path")
    assert_within(y_pairs, y64, bound, torch.bfloat16, "pair kernel")
    # both round the same float32 value up to reordering: at most one bfloat16 ulp apart
    ulp = torch.finfo(torch.bfloat16).eps * y64.abs().clamp_min(1e-30)
    assert ((y_f32path.double() - y_pairs.double()).abs() <= ulp * 1.01 + 2.0**-16 * bound).all()


@needs_cpu_library
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_single_convolution_for_the_input_gradient(dtype):
    """The kernel's first stage alone (w2 NULL): backward's input gradient at low rank."""
    g = torch.Generator().manual_seed(9)
    for n, c, h, w, r, k, pad, dil in ((2, 3, 9, 11, 20, (3, 3), (2, 2), (1, 1)), (1, 5, 12, 7, 7, (3, 2), (2, 1), (2, 1)),
                                       (2, 4, 6, 6, 9, (1, 1), (0, 0), (1, 1))):
        x = torch.randn(n, c, h, w, generator=g).to(dtype)
        wt = (torch.randn(r, c, *k, generator=g) / 3).to(dtype)
        y = cpu_conv.stride1_conv(x, wt, pad, dil)
        y64 = F.conv2d(x.double(), wt.double(), None, 1, pad, dil)
        bound = F.conv2d(x.double().abs(), wt.double().abs(), None, 1, pad, dil)
        assert_within(y, y64, bound, dtype, "single convolution")
    # the input gradient through it equals torch's
    x, w1, w2, b = make((2, 6, 10, 9, 5, 4, (3, 3), None, None, None), dtype)
    gt = torch.randn(2, 5, 10, 5, generator=g).to(dtype)
    ours = _autograd.input_grad(gt, x, w1, (1, 1), (1, 0), (1, 2))
    ref = torch.ops.aten.convolution_backward(gt.double(), x.double(), w1.double(), None, [1, 1], [1, 0], [1, 2], False,
                                              [0, 0], 1, [True, False, False])[0]
    bound = torch.ops.aten.convolution_backward(gt.double().abs(), x.double(), w1.double().abs(), None, [1, 1], [1, 0],
                                                [1, 2], False, [0, 0], 1, [True, False, False])[0]
    assert_within(ours, ref, bound, dtype, "input gradient")


def _weight_grad64(x, g, k, stride, pad, dil, absolute=False):
    """The float64 weight gradient of conv2d(x, W) (kernel k) for y's gradient g; `absolute`: on |x|, |g|."""
    x, g = x.double(), g.double()
    if absolute:
        x, g = x.abs(), g.abs()
    w = torch.zeros(g.shape[1], x.shape[1], *k, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(g, x, w, None, list(stride), list(pad), list(dil), False, [0, 0], 1,
                                               [False, True, False])[1]


# (N, C, H, W, R, kernel, stride, padding, dilation): odd sizes, strides 1-3, asymmetric padding and dilation,
# 1 x 1, rank 1, ranks and channel counts that leave partial register blocks and channel groups
WGRAD_SHAPES = (
    (2, 3, 7, 9, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 5, 11, 10, 3, (3, 3), (2, 2), (1, 1), (1, 1)),
    (3, 4, 12, 13, 6, (3, 2), (1, 2), (2, 0), (2, 1)),
    (2, 7, 9, 8, 9, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 2, 5, 5, 1, (5, 5), (3, 3), (0, 0), (1, 1)),
    (2, 13, 6, 6, 4, (3, 3), (1, 1), (2, 2), (1, 1)),  # padding past "same"
    (1, 9, 40, 3, 7, (1, 3), (1, 1), (0, 1), (1, 1)),
)


@needs_cpu_library
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_weight_gradient_against_float64(dtype, isa):
    """The kernel's weight gradient (float32 out, float32 accumulation) within 2^-16 of the float64 one on
    absolute values, for every geometry and instruction set."""
    g = torch.Generator().manual_seed(11)
    for n, c, h, w, r, k, st, pad, dil in WGRAD_SHAPES:
        x = torch.randn(n, c, h, w, generator=g).to(dtype)
        ho, wo = (L.conv_output_size((h, w)[i], k[i], st[i], pad[i], dil[i]) for i in range(2))
        gy = torch.randn(n, r, ho, wo, generator=g).to(dtype)
        gw = cpu_conv.weight_grad(x, gy, k, st, pad, dil)
        what = f"isa {isa} weight gradient {(n, c, h, w, r, k, st, pad, dil)}"
        assert_within(gw, _weight_grad64(x, gy, k, st, pad, dil), _weight_grad64(x, gy, k, st, pad, dil, True),
                      torch.float32, what)


@needs_cpu_library
def test_cpu_weight_gradient_deterministic_and_bad_input():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 24, 15, 15, generator=g)
    gy = torch.randn(4, 6, 15, 15, generator=g)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results.append(cpu_conv.weight_grad(x, gy, (3, 3), (1, 1), (1, 1), (1, 1)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])
    with pytest.raises(ValueError, match="grad has shape"):
        cpu_conv.weight_grad(x, gy[:, :, :14], (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="grad has shape"):
        cpu_conv.weight_grad(x, gy, (3, 3), (2, 2), (1, 1), (1, 1))
    assert cpu_conv.weight_grad(x, gy.double(), (3, 3), (1, 1), (1, 1), (1, 1)) is None  # dtypes differ


@needs_cpu_library
def test_cpu_weight_gradient_nonfinite_only_where_the_reference_has_them(isa):
    """The kernel reads input columns past the output's width on the extended grid and masks them off: an inf
    there stays out of the taps that do not use it (0 * inf would be a NaN)."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 8, 10, generator=g)
    x[0, 1, 3, 9] = float("inf")  # the last column: only the right-hand taps read it
    x[1, 2, 0, 0] = float("nan")
    gy = torch.randn(2, 4, 8, 10, generator=g)
    gw = cpu_conv.weight_grad(x, gy, (3, 3), (1, 1), (1, 1), (1, 1))
    ref = _weight_grad64(x, gy, (3, 3), (1, 1), (1, 1), (1, 1))
    assert torch.equal(gw.isnan(), ref.isnan()) and torch.equal(gw.isinf(), ref.isinf())
    assert gw.isfinite().any() and not gw[:, 1, :, 0].isinf().any()  # the left taps never see column 9
    ok = ref.isfinite()
    assert torch.allclose(gw.double()[ok], ref[ok], rtol=1e-5, atol=1e-4)
    # 1 x 1 unpadded: g is read in place (AVX-512; bfloat16 and float16 widened in registers), its rows of 9 pixels
    # in vectors that reach into the next channel
    for dtype in DTYPES:
        x = torch.randn(2, 3, 3, 3, generator=g).to(dtype)
        gy = torch.randn(2, 2, 3, 3, generator=g).to(dtype)
        gy[1, 1, 0, 0] = float("inf")  # read (masked off) by the last vector of channel 0
        gw = cpu_conv.weight_grad(x, gy, (1, 1), (1, 1), (0, 0), (1, 1))
        ref = _weight_grad64(x, gy, (1, 1), (1, 1), (0, 0), (1, 1))
        assert torch.equal(gw.isinf(), ref.isinf()) and gw[0].isfinite().all() and not gw.isnan().any(), dtype
        assert torch.allclose(gw.double()[0], ref[0], rtol=1e-5, atol=1e-5), dtype


def test_nonfinite_inputs_propagate():
    x, w1, w2, b = make(SHAPES[1], torch.float32)
    x[0, 1, 4, 4] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    ref = reference_conv.lowrank_conv2d(x, w1, w2, b, [2, 2], [1, 1], [1, 1], False)[0]
    for backend in CPU_BACKENDS:
        with pyquant.use_backend(backend):
            y = lowrank_conv2d(x, w1, w2, b, 2, 1)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref)), backend


def test_unbatched_empty_and_float64():
    x, w1, w2, b = make(SHAPES[0], torch.float32)
    y = lowrank_conv2d(x[0], w1, w2, b, padding=1)
    assert torch.allclose(y, lowrank_conv2d(x[:1], w1, w2, b, padding=1)[0])
    assert lowrank_conv2d(x[:0], w1, w2, b, padding=1).shape == (0, 7, 9, 11)
    xd, w1d, w2d, bd = (t.double() for t in (x, w1, w2, b))
    yd = lowrank_conv2d(xd, w1d, w2d[:, :, None, None], bd, padding=1)
    assert yd.dtype == torch.float64 and torch.allclose(yd, exact(xd, w1d, w2d, bd, 1, 1, 1)[0])


def test_padding_strings():
    x, w1, w2, b = make((1, 3, 8, 8, 2, 4, (3, 3), None, None, None), torch.float32)
    assert torch.equal(lowrank_conv2d(x, w1, w2, b, padding="same"), lowrank_conv2d(x, w1, w2, b, padding=1))
    assert torch.equal(lowrank_conv2d(x, w1, w2, b, padding="valid"), lowrank_conv2d(x, w1, w2, b, padding=0))
    with pytest.raises(ValueError, match="stride 1"):
        lowrank_conv2d(x, w1, w2, b, stride=2, padding="same")
    with pytest.raises(ValueError, match="asymmetric"):
        lowrank_conv2d(x, w1[:, :, :2], w2, b, padding="same")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(x=a["x"].half()), TypeError, "same dtype"),
        (lambda a: a.update(x=a["x"].int()), TypeError, "float32"),
        (lambda a: a.update(x=a["x"][:, :2]), ValueError, "channels"),
        (lambda a: a.update(w2=a["w2"][:, :1]), ValueError, "rank"),
        (lambda a: a.update(w2=a["w2"][:, :, None]), ValueError, "weight_second"),
        (lambda a: a.update(w1=a["w1"][0]), ValueError, "weight_first"),
        (lambda a: a.update(b=a["b"][:2]), ValueError, "bias"),
        (lambda a: a.update(stride=0), ValueError, "stride"),
        (lambda a: a.update(padding=-1), ValueError, "padding"),
        (lambda a: a.update(dilation=(1, 1, 1)), TypeError, "dilation"),
        (lambda a: a.update(x=a["x"][..., :1, :1]), ValueError, "smaller than the dilated kernel"),
        (lambda a: a.update(x=[1.0]), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(change, error, match):
    x, w1, w2, b = make(SHAPES[0], torch.float32)
    args = {"x": x, "w1": w1, "w2": w2, "b": b, "stride": 1, "padding": 0, "dilation": 1}
    change(args)
    with pytest.raises(error, match=match):
        lowrank_conv2d(args["x"], args["w1"], args["w2"], args["b"], args["stride"], args["padding"], args["dilation"])


# ---- backward ----
def test_gradcheck_reference_float64():
    x, w1, w2, b = (t.double().requires_grad_() for t in make((1, 3, 5, 6, 2, 3, (3, 2), None, None, None), torch.float32))
    with pyquant.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *a: lowrank_conv2d(*a, stride=(2, 1), padding=1, dilation=(1, 2)), (x, w1, w2, b))
        # the inference op's backward recomputes the intermediate; the training op's t output is differentiable
        assert torch.autograd.gradcheck(
            lambda *a: torch.ops.pyquant.lowrank_conv2d(*a, [1, 1], [0, 1], [1, 1]), (x, w1, w2, b)
        )
        assert torch.autograd.gradcheck(
            lambda *a: sum(o.sum() * (i + 1) for i, o in enumerate(torch.ops.pyquant.lowrank_conv2d_train(*a, [1, 1], [1, 1], [1, 1]))),
            (x, w1, w2, b),
        )


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    fn().backward(torch.ones(()))
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# 1x1: the input gradient and the rank channels' gradient from one call of the forward kernel (W2^T, W1^T)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[3]], ids=["odd", "dilated", "stride3", "1x1"])
def test_gradients_match_unfused_float64(backend, dtype, shape):
    x, w1, w2, b = make(shape, dtype, seed=7)
    stride, padding, dilation = shape[7:]
    g = torch.randn(exact(x, w1, w2, b, stride, padding, dilation)[0].shape, generator=torch.Generator().manual_seed(8))
    leaves64 = [t.double().requires_grad_() for t in (x, w1, w2, b)]
    ref = _grads(lambda: (F.conv2d(F.conv2d(leaves64[0], leaves64[1], None, stride, padding, dilation),
                                   leaves64[2][:, :, None, None], leaves64[3]) * g.double()).sum(), leaves64)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, b)]
    with pyquant.use_backend(backend):
        got = _grads(lambda: (lowrank_conv2d(*leaves, stride, padding, dilation).float() * g).sum(), leaves)
        got_recompute = _grads(
            lambda: (torch.ops.pyquant.lowrank_conv2d(*leaves, list(stride), list(padding), list(dilation)).float() * g).sum(),
            leaves,
        )
    rtol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    for name, a, e, c in zip(("x", "weight_first", "weight_second", "bias"), got, ref, got_recompute):
        assert a.dtype == dtype
        scale = e.abs().max().item() + 1e-12
        assert (a.double() - e).abs().max().item() <= rtol * scale, f"grad {name}"
        assert (c.double() - e).abs().max().item() <= rtol * scale, f"grad {name} (recomputed intermediate)"


# ---- the layer ----
def test_layer_parameters_state_dict_and_forms():
    torch.manual_seed(0)
    layer = LowRankConv2d(6, 10, 3, rank=4, stride=2, padding=1)
    assert layer.weight_first.shape == (4, 6, 3, 3) and layer.weight_second.shape == (10, 4, 1, 1)
    sd = layer.state_dict()
    assert set(sd) == {"weight_first", "weight_second", "bias"} and all(type(v) is torch.Tensor for v in sd.values())
    other = LowRankConv2d(6, 10, 3, rank=4, stride=2, padding=1)
    other.load_state_dict(sd)
    x = torch.randn(2, 6, 11, 9)
    y = layer(x)
    assert torch.equal(y, other(x))
    assert torch.allclose(y, layer.to_sequential()(x), atol=1e-5)
    assert torch.allclose(y, layer.to_dense()(x), atol=1e-5)
    assert "rank=4" in repr(layer) and "stride=(2, 2)" in repr(layer)
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert LowRankConv2d(6, 10, (3, 1), rank=2, padding="same", bias=False)(x).shape == (2, 10, 11, 9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_from_conv_exact_when_rank_suffices(dtype):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2).to(dtype)
    with torch.no_grad():  # a weight of rank 5
        conv.weight.copy_((torch.randn(12, 5, dtype=dtype) @ torch.randn(5, 72, dtype=dtype)).reshape(12, 8, 3, 3))
    x = torch.randn(2, 8, 15, 13, dtype=dtype)
    for rank in (5, 7):
        layer = LowRankConv2d.from_conv(conv, rank)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert torch.allclose(layer(x), conv(x), atol=tol, rtol=tol)
        assert torch.allclose(layer.dense_weight(), conv.weight, atol=tol)
    worse = LowRankConv2d.from_conv(conv, 3)
    assert (worse(x) - conv(x)).abs().max() > 1e-3


def test_from_conv_rejects():
    with pytest.raises(ValueError, match="grouped"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(TypeError, match="Conv2d"):
        LowRankConv2d.from_conv(nn.ConvTranspose2d(4, 4, 3), 2)
    with pytest.raises(ValueError, match="padding_mode"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 2)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3), 5)
    with pytest.raises(ValueError, match="rank must be in"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3), 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3), 2.0)
    with pytest.raises(ValueError, match="asymmetric"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 2, padding="same"), 2)
    with pytest.raises(ValueError, match="in_channels"):
        LowRankConv2d(0, 4, 3, 1)


def test_lowrank_linear():
    torch.manual_seed(2)
    lin = nn.Linear(20, 9)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(9, 3) @ torch.randn(3, 20))
    low = LowRankLinear.from_linear(lin, 3)
    x = torch.randn(4, 5, 20)
    assert torch.allclose(low(x), lin(x), atol=1e-5)
    assert torch.allclose(low.to_dense()(x), lin(x), atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_linear(lin, 10)


# ---- torch.library integration ----
def test_fake_tensors_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w1, w2, b = make(SHAPES[1], torch.bfloat16)
    with FakeTensorMode() as mode:
        fx, f1, f2, fb = (mode.from_tensor(t) for t in (x, w1, w2, b))
        y, t = torch.ops.pyquant.lowrank_conv2d_train(fx, f1, f2, fb, [2, 2], [1, 1], [1, 1])
        assert y.shape == (2, 8, 5, 5) and t.shape == (2, 4, 5, 5) and y.dtype == torch.bfloat16
    xf = x.float()
    for stride in (2, 1):  # stride 1: the backward's own kernels (input and weight gradients) as ops too
        torch.manual_seed(0)
        layer = LowRankConv2d(6, 8, 3, rank=4, stride=stride, padding=1)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(xf), layer(xf))
        xg = xf.clone().requires_grad_()
        compiled(xg).sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        xe = xf.clone().requires_grad_()
        layer(xe).sum().backward()
        assert torch.allclose(xg.grad, xe.grad)
        assert all(torch.allclose(a, p.grad) for a, p in zip(grads, layer.parameters()))


def test_torch_func_grad_matches_autograd():
    """torch.func.grad (functorch) runs the eager autograd.Function with torch's convolutions in backward (its
    wrapped tensors have no data for the kernels); the gradients equal autograd's."""
    import torch.func as tf

    torch.manual_seed(0)
    layer = LowRankConv2d(4, 6, 3, rank=2, padding=1)
    x = torch.randn(2, 4, 5, 5)
    params = dict(layer.named_parameters())

    def loss(p, x):
        return tf.functional_call(layer, p, (x,)).square().sum()

    grads, grad_x = tf.grad(loss, argnums=(0, 1))(params, x)
    xr = x.clone().requires_grad_()
    loss(params, xr).backward()
    assert torch.allclose(grad_x, xr.grad, rtol=1e-5, atol=1e-6)
    for name, p in layer.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-6), name


def test_opcheck():
    x, w1, w2, b = make(SHAPES[0], torch.float32)
    args = (x, w1, w2, b, [1, 1], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.pyquant.lowrank_conv2d.default, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.pyquant.lowrank_conv2d_train.default, args, test_utils=("test_schema", "test_faketensor"))
    if HAVE_CPU_LIBRARY:  # the backward's kernels
        gy = torch.randn(2, 4, 7, 7)
        torch.library.opcheck(torch.ops.pyquant.conv2d_weight_grad.default, (x[:, :, :7, :7], gy, [4, 5, 1, 1], [1, 1],
                              [0, 0], [1, 1]), test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.pyquant.conv2d_stride1.default, (gy, torch.randn(3, 4, 3, 3), [1, 1], [1, 1]),
                              test_utils=("test_schema", "test_faketensor"))


def test_eager_inference_shortcut_leaves_modes_and_the_profiler_the_op():
    """Eager CPU inference calls the implementation without the op's dispatch; a dispatch mode and the
    profiler still see `pyquant::lowrank_conv2d`, with the same result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w1, w2, b = make(SHAPES[0], torch.float32)
    with torch.no_grad():
        direct = lowrank_conv2d(x, w1, w2, b, padding=1)
        with Record() as mode:
            seen = lowrank_conv2d(x, w1, w2, b, padding=1)
        with torch.profiler.profile() as prof:
            profiled = lowrank_conv2d(x, w1, w2, b, padding=1)
    assert "pyquant.lowrank_conv2d.default" in mode.ops
    assert any(e.name == "pyquant::lowrank_conv2d" for e in prof.events())
    assert torch.equal(direct, seen) and torch.equal(direct, profiled)


@needs_cpu_library
def test_cpu_kernel_rejects_bad_dims():
    dims = (ctypes.c_int64 * 16)(1, 1, 4, 4, 1, 1, 3, 3, 0, 1, 0, 0, 1, 1, 2, 2)  # stride 0
    assert capi.cpu_library().pq_lowrank_conv2d(None, None, None, None, None, None, 0, dims, 1, None, 0) == 2


# ---- eager inference through the layer's plan (checked once, weights packed once per change) ----
def _general(layer, x):
    """The same call on the general path, which checks and packs on every call."""
    w2 = layer.weight_second.detach().reshape(layer.out_channels, layer.rank)
    return lowrank_conv2d(x, layer.weight_first.detach(), w2, None if layer.bias is None else layer.bias.detach(),
                          layer.stride, layer.padding, layer.dilation)


@needs_cpu_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_plan_sees_every_change_of_weights_and_input(dtype):
    torch.manual_seed(0)
    layer = LowRankConv2d(12, 10, 3, rank=4, padding=1).to(dtype)
    x = torch.randn(2, 12, 9, 9).to(dtype)
    with torch.no_grad():
        y_default = layer(x)
        layer.weight_first.data.mul_(0.5)  # invisible to the version counter: by default the weights are repacked
        assert torch.equal(layer(x), _general(layer, x)) and not torch.equal(layer(x), y_default)
        layer.cache_packed_weights = True
        y0 = layer(x)
        plan = layer._eager_plan
        assert plan is not None and torch.equal(y0, _general(layer, x))
        assert torch.equal(layer(x), y0) and layer._eager_plan is plan  # reused, packed weights kept
        layer.weight_first.mul_(0.5)  # in place: version counter
        layer.bias.copy_(torch.randn(10).to(dtype))
        y1 = layer(x)
        assert not torch.equal(y1, y0) and torch.equal(y1, _general(layer, x)) and layer._eager_plan is plan
        layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
        assert torch.equal(layer(x), _general(layer, x))
        layer.weight_second = nn.Parameter(torch.randn_like(layer.weight_second))  # a new tensor
        assert torch.equal(layer(x), _general(layer, x)) and layer._eager_plan is not plan
        x2 = torch.randn(3, 12, 5, 7).to(dtype)  # another shape: a new plan
        assert torch.equal(layer(x2), _general(layer, x2))
        layer.weight_first.data.add_(1.0)  # bypasses the version counter: documented, reset_eager_plan()
        layer.reset_eager_plan()
        assert torch.equal(layer(x2), _general(layer, x2))
    # training step with an optimizer, then inference again
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x2).float().square().sum().backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(layer(x2), _general(layer, x2))
    # dtype change through .to(): the plan is dropped with the old tensors
    layer.float()
    assert layer._eager_plan is None
    with torch.no_grad():
        assert torch.equal(layer(x2.float()), _general(layer, x2.float()))


@needs_cpu_library
def test_eager_plan_repacks_when_the_bfloat16_kernel_changes_layout():
    torch.manual_seed(1)
    layer = LowRankConv2d(9, 6, 3, rank=5, padding=1).to(torch.bfloat16)
    x = torch.randn(2, 9, 8, 8).to(torch.bfloat16)
    previous = set_bf16_dot(True)
    try:
        with torch.no_grad():
            layer(x)
            for on in (False, True):  # pair layout <-> float32 layout of the same weights
                set_bf16_dot(on)
                assert torch.equal(layer(x), _general(layer, x))
    finally:
        set_bf16_dot(previous)


@needs_cpu_library
def test_eager_plan_keeps_errors_modes_and_copies():
    import copy
    import io

    layer = LowRankConv2d(6, 4, 3, rank=2)
    x = torch.randn(1, 6, 7, 7)
    with torch.no_grad():
        y = layer(x)
        with pytest.raises(ValueError, match="channels"):
            layer(torch.randn(1, 5, 7, 7))
        with pytest.raises(TypeError, match="same dtype"):
            layer(x.double())
        assert torch.equal(layer(x[0]), y[0])  # unbatched: the general path
        assert torch.equal(layer(x.transpose(2, 3).contiguous().transpose(2, 3)), y)  # not contiguous
        with pyquant.use_backend("reference"):
            assert torch.allclose(layer(x), y, rtol=1e-5, atol=1e-6)
    clone = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # the ctypes arguments are not pickled
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(clone(x), y) and torch.equal(loaded(x), y)
    # with gradients wanted, the op (and its autograd) runs
    out = layer(x.requires_grad_())
    assert out.grad_fn is not None and torch.equal(out.detach(), y)


@needs_cpu_library
def test_eager_plan_sees_a_change_of_geometry():
    """stride, padding and dilation are plain attributes: a change after the first call is honoured, as by
    nn.Conv2d (the plan's key holds them)."""
    torch.manual_seed(2)
    layer = LowRankConv2d(5, 6, 3, rank=3).eval()
    x = torch.randn(2, 5, 11, 11)
    with torch.no_grad():
        for stride, padding, dilation in (((1, 1), (0, 0), (1, 1)), ((2, 2), (0, 0), (1, 1)),
                                          ((2, 2), (1, 1), (1, 1)), ((1, 1), (1, 1), (2, 2)), (1, "same", 2)):
            layer.stride, layer.padding, layer.dilation = stride, padding, dilation
            expected = layer.to_sequential()(x)  # nn.Conv2d with the same geometry
            y = layer(x)
            assert y.shape == expected.shape and torch.allclose(y, expected, rtol=1e-5, atol=1e-5)
