"""pyquant.nn.half_precision: Linear16 / Conv2d16 against float64 within the matmul bound, half(model), the
measured implementation rule, and a few training steps of a half model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyquant.nn import half_precision as H
from pyquant.nn.half_precision import Conv2d16, Linear16, half

from test_matmul import assert_within_bound

DTYPES = (torch.float16, torch.bfloat16)


def rounded(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.detach().to(dtype)


# ---- Linear16 ----
@pytest.mark.parametrize("impl", ["pyquant", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear16_matches_float64_within_bound(dtype, impl):
    torch.manual_seed(0)
    ref = nn.Linear(37, 23)
    layer = Linear16.from_linear(ref, dtype, impl=impl)
    assert layer.weight.dtype == layer.bias.dtype == dtype and layer.weight.shape == (23, 37)
    x = torch.randn(4, 5, 37).to(dtype)
    y = layer(x)
    if impl == "pyquant":  # torch's own bf16 / fp16 kernels are not held to pyquant's bound
        assert_within_bound(y, x, layer.weight.detach().t(), dtype, layer.bias.detach())
    else:
        expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert torch.allclose(y.float(), expected, rtol=3e-2, atol=3e-2)
    # float32 input: rounded to dtype, result returned in float32 without the 16-bit rounding
    x32 = torch.randn(6, 37)
    y32 = layer(x32)
    assert y32.dtype == torch.float32
    if impl == "pyquant":
        assert_within_bound(y32, x32.to(dtype), layer.weight.detach().t(), torch.float32, layer.bias.detach())


def test_linear16_constructor_state_dict_and_no_bias():
    layer = Linear16(8, 3, bias=False, dtype=torch.bfloat16)
    assert layer.bias is None and layer.weight.dtype == torch.bfloat16 and isinstance(layer, nn.Linear)
    plain = nn.Linear(8, 3, bias=False)
    plain.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(2, 8).to(torch.bfloat16)
    assert_within_bound(layer(x), x, layer.weight.detach().t(), torch.bfloat16)
    assert "impl=pyquant" in repr(layer)
    with pytest.raises(TypeError, match="float16 or torch.bfloat16"):
        Linear16(8, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="impl"):
        Linear16(8, 3, impl="fast")
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear16.from_linear(nn.Conv2d(1, 1, 1))


# ---- Conv2d16 ----
CONVS = [
    dict(in_channels=5, out_channels=7, kernel_size=3, padding=1),
    dict(in_channels=5, out_channels=7, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=5, out_channels=6, kernel_size=(3, 2), dilation=(2, 1), padding=(2, 0)),
    dict(in_channels=5, out_channels=9, kernel_size=1),
    dict(in_channels=5, out_channels=4, kernel_size=3, padding="same"),
]


def conv_terms(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor):
    """im2col of x (float64 exact copies) and the weight matrix: the conv as a product for the bound."""
    cols = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return weight.reshape(weight.shape[0], -1), cols


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", CONVS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items() if k != "in_channels"))
def test_conv2d16_matches_float64_within_bound(dtype, spec):
    torch.manual_seed(1)
    ref = nn.Conv2d(**spec)
    layer = Conv2d16.from_conv(ref, dtype)
    x = torch.randn(3, 5, 11, 9).to(dtype)
    y = layer(x)
    expected = F.conv2d(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double(),
                        layer.stride, layer.padding, layer.dilation)
    assert y.shape == expected.shape and y.dtype == dtype
    w2, cols = conv_terms(layer, x, layer.weight.detach())
    ho, wo = y.shape[-2:]
    assert_within_bound(y.reshape(3, -1, ho * wo), w2.to(dtype), cols.to(dtype), dtype,
                        None if layer.bias is None else layer.bias.detach(), bias_dim=-2)
    # unbatched input
    assert torch.equal(layer(x[0]), y[0])


def assert_grad_within_bound(g, g64, terms, n, dtype, what):
    """|g - g64| <= gamma_n S (1 + u_out) + u_out |g64| + eta, S = the sum of |terms| (docs, section 2)."""
    u_out = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    allowed = (gamma * (1 + u_out) + 2 * n * 2.0**-53) * terms + u_out * g64.abs() + 2.0**-25 + n * 2.0**-126
    err = (g.double() - g64).abs()
    assert g.dtype == dtype and g.shape == g64.shape, what
    assert (err <= allowed * (1 + 1e-9)).all(), f"{what}: max excess {(err - allowed).max().item():.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", CONVS + [dict(in_channels=5, out_channels=3, kernel_size=1, padding=1)],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items() if k != "in_channels"))
def test_conv2d16_backward_within_bound(dtype, spec):
    """grad_x (the transposed convolution for stride 1, col2im otherwise), grad_W and grad_bias against
    float64, each within the bound of its sum (n = kh*kw*C_out, N*Ho*Wo and N*Ho*Wo terms)."""
    torch.manual_seed(4)
    layer = Conv2d16.from_conv(nn.Conv2d(**spec), dtype)
    x = torch.randn(2, 5, 10, 9).to(dtype).requires_grad_()
    y = layer(x)
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)

    def conv64(xx, ww, bb=None):
        return F.conv2d(xx, ww, bb, **geometry)

    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    conv64(x64, w64).backward(g.double())
    # the sums of |terms|: the same adjoints applied to absolute values
    xa, wa = x64.detach().abs().requires_grad_(), w64.detach().abs().requires_grad_()
    conv64(xa, wa).backward(g.double().abs())
    kh, kw = layer.kernel_size
    n, _, ho, wo = y.shape
    assert_grad_within_bound(x.grad, x64.grad, xa.grad, kh * kw * layer.out_channels, dtype, "grad_x")
    assert_grad_within_bound(layer.weight.grad, w64.grad, wa.grad, n * ho * wo, dtype, "grad_W")
    if layer.bias is not None:
        gb64 = g.double().sum((0, 2, 3))
        assert_grad_within_bound(layer.bias.grad, gb64, g.double().abs().sum((0, 2, 3)), n * ho * wo, dtype, "grad_b")


def test_conv2d16_rejects_unsupported():
    assert not Conv2d16.supports(nn.Conv2d(4, 4, 3, groups=2))
    assert not Conv2d16.supports(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not Conv2d16.supports(nn.Conv2d(4, 4, 2, padding="same"))
    with pytest.raises(ValueError, match="groups"):
        Conv2d16(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        Conv2d16.from_conv(nn.Conv2d(4, 4, 3, padding_mode="circular"))


# ---- half(model) ----
class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2),  # stays torch's (groups)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 5))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_model_structure_and_forward(dtype):
    torch.manual_seed(2)
    model = SmallNet().eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
    hm = half(copy.deepcopy(model), dtype, impl="pyquant")
    kinds = [type(m) for m in hm.modules()]
    assert kinds.count(Conv2d16) == 2 and kinds.count(Linear16) == 2 and kinds.count(nn.Conv2d) == 1
    for m in hm.modules():
        for p in m.parameters(recurse=False):
            want = torch.float32 if isinstance(m, H.NORM_TYPES) else dtype
            assert p.dtype == want, (type(m).__name__, p.dtype)
    assert hm.features[1].running_var.dtype == torch.float32
    assert set(hm.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        y = hm(x)  # float32 input: cast by the model's pre-hook
    assert y.dtype == dtype and y.shape == expected.shape
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    assert torch.allclose(y.float(), expected, rtol=tol, atol=tol), (y.float() - expected).abs().max()


def test_half_default_rule():
    cpu_fp16 = H.default_impl("cpu", torch.float16)
    assert cpu_fp16 == ("auto" if H.native_fp16_cpu() else "pyquant")
    assert H.default_impl("cpu", torch.bfloat16) == "auto"
    model = half(nn.Sequential(nn.Linear(16, 16)), torch.bfloat16)
    assert model[0].impl == "auto"
    model(torch.randn(3, 16))
    keys = [k for k in H.decisions() if k[0] == "linear" and k[2:4] == (16, 16) and k[5] == torch.bfloat16]
    assert keys and H.decisions()[keys[0]] in ("pyquant", "torch")


def test_half_training_steps_reduce_the_loss():
    torch.manual_seed(3)
    model = half(SmallNet(), torch.float16, impl="pyquant").train()
    x = torch.randn(16, 3, 12, 12)
    target = torch.randint(0, 5, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x).float(), target)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_half_errors():
    with pytest.raises(TypeError, match="float16 or torch.bfloat16"):
        half(nn.Linear(2, 2), torch.float32)
    with pytest.raises(TypeError, match="nn.Module"):
        half(lambda x: x)
    with pytest.raises(ValueError, match="impl"):
        half(nn.Linear(2, 2), impl="cuda")


@pytest.mark.skipif(H.native_fp16_cpu(), reason="this CPU has FP16 arithmetic: the harness keeps torch's layers")
def test_harness_float16_setting_runs_on_pyquant_layers():
    """`half+8bit` with --half-dtype float16 on a CPU without FP16 arithmetic converts through half() (Conv2d16 /
    Linear16, norms in float32), trains with loss scaling and 8-bit states, and starts from the float32 model's loss;
    bfloat16 stays a plain cast onto torch's layers."""
    pytest.importorskip("timm")
    import pyquant
    from pyquant.amp import GradScaler
    from pyquant.experiment.models import create_model
    from pyquant.experiment.loop import train_step
    from pyquant.experiment.settings import resolve

    torch.manual_seed(0)
    reference = create_model("densenet_small", in_chans=1, num_classes=2).train()
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 1, 0])
    recipe = resolve("half+8bit", "cpu", half_dtype="float16")
    model = recipe.prepare_model(copy.deepcopy(reference))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is Conv2d16 and m.weight.dtype == torch.float16 for m in convs)
    assert isinstance(model.classifier, Linear16) and model.classifier.weight.dtype == torch.float16
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.weight.dtype == m.running_mean.dtype == torch.float32 for m in norms)

    with torch.no_grad():
        expected = F.cross_entropy(copy.deepcopy(reference)(x), y)
        first = F.cross_entropy(copy.deepcopy(model)(x.half()).float(), y)
    assert abs(first.item() - expected.item()) < 2e-2 * max(1.0, expected.item()), (first, expected)

    optimizer = recipe.make_optimizer(model.parameters(), 1e-3)
    assert isinstance(optimizer, pyquant.Adam8bit) and recipe.loss_scaling
    scaler = GradScaler("cpu", enabled=recipe.loss_scaling)
    before = [p.detach().clone() for p in model.parameters()]
    losses = [train_step(model, x.half(), y, optimizer, scaler, recipe).item() for _ in range(3)]
    assert all(math.isfinite(v) and v < 1e3 for v in losses), losses
    moved = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert moved > len(before) // 2
    assert all(p.dtype == (torch.float32 if any(p is q for n in norms for q in n.parameters()) else torch.float16)
               for p in model.parameters())

    plain = resolve("half+8bit", "cpu", half_dtype="bfloat16").prepare_model(copy.deepcopy(reference))
    assert all(type(m) is nn.Conv2d and m.weight.dtype == torch.bfloat16 for m in plain.modules()
               if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("impl", ["pyquant", "auto"])
def test_conv2d16_honours_a_change_of_geometry(impl):
    """stride, padding and dilation set after construction are used (as by nn.Conv2d), in any form nn.Conv2d
    takes; what the kernel cannot do is refused, not computed as something else."""
    torch.manual_seed(3)
    layer = Conv2d16(4, 6, 3, dtype=torch.bfloat16, impl=impl)
    x = torch.randn(2, 4, 9, 9).to(torch.bfloat16)
    for stride, padding, dilation in ((2, 0, 1), ((1, 1), 1, 2), (1, "same", 1), (2, "valid", (2, 1))):
        layer.stride, layer.padding, layer.dilation = stride, padding, dilation
        with torch.no_grad():
            y = layer(x).float()
            ref = F.conv2d(x.float(), layer.weight.float(), layer.bias.float(), stride, padding, dilation)
        assert y.shape == ref.shape and torch.allclose(y, ref, rtol=2e-2, atol=5e-2)
    layer.stride = 2
    layer.padding = "same"
    with pytest.raises(ValueError, match="needs stride 1"):
        layer(x)
    layer.padding, layer.groups = 0, 2
    with pytest.raises(ValueError, match="groups=1 only"):
        layer(x)
