"""Half-precision layers on pyquant's matmul, and `half(model)` to run a model in float16 / bfloat16.

- `Linear16`: a drop-in `nn.Linear` whose weight and bias are stored in float16 or bfloat16 and whose
  product runs on `pyquant.ops.matmul` (float32 accumulation, bias added to the accumulator, one rounding).
  `Linear16.from_linear(linear, dtype)` converts a trained layer.
- `Conv2d16`: the same for `nn.Conv2d` (groups=1, zero padding): one product for the whole batch, columns
  (N*Ho*Wo x kh*kw*C_in, the channels-last im2col) @ W^T, the bias added to the accumulator; the columns are
  gathered from x while the kernel packs them (`pyquant::im2col_matmul`), never copied. The output is NCHW-shaped
  in channels-last memory order (as torch's own CPU convolutions prefer); a following Conv2d16 reads it without a
  copy.
- `half(model, dtype)`: casts a model for half-precision inference or training (the "half+8bit" setting of
  docs/study.md: the whole model in 16-bit, not autocast's mixed precision): Linear and Conv2d layers become Linear16 / Conv2d16 where pyquant's kernels are the
  faster ones on the model's device, everything else is cast to `dtype`, normalisation layers keep float32
  parameters and statistics and compute in float32 (running means and variances accumulate over many
  steps and lose too much in 16-bit), and floating-point model inputs are cast to `dtype`.

Which implementation runs a layer is pyquant.nn.autotune's rule (float16 on a CPU without native FP16
arithmetic: pyquant's; otherwise measured once per layer kind and shape). `impl="pyquant"` / `"torch"` forces a
layer's choice; `"auto"` applies the rule.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from pyquant import _ops
from pyquant.nn.autotune import choose, decisions, default_impl, native_fp16_cpu
from pyquant.ops.conv16 import columns as _columns
from pyquant.ops.conv16 import out_size as _out_size
from pyquant.ops.gemm import INPUT_DTYPES, linear

__all__ = ["Linear16", "Conv2d16", "half", "decisions", "native_fp16_cpu", "default_impl", "im2col"]

IMPLS = ("auto", "pyquant", "torch")
NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


def _mixed_dtype_norms(device_type: str) -> tuple[type, ...]:
    """Norm layers whose torch kernels take a 16-bit input with float32 parameters and statistics,
    compute in float32 and return the input's dtype (checked on CPU for torch 2.14; LayerNorm and
    BatchNorm / InstanceNorm also on CUDA). Other norms get float32 inputs and their outputs rounded back."""
    common = (nn.modules.batchnorm._NormBase, nn.LayerNorm)
    return common + (nn.GroupNorm,) + _RMS if device_type == "cpu" else common


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _unfilled(cls: type, source: nn.Module, expected: type, method: str) -> nn.Module:
    """A `cls` layer with nn.Module's state and nothing else, for `method` to fill from `source`."""
    if not isinstance(source, expected):
        raise TypeError(f"{method} expects an nn.{expected.__name__}, got {type(source).__name__}")
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    return layer


def _take_parameters(layer: nn.Module, source: nn.Module, dtype: torch.dtype, impl: str) -> nn.Module:
    """`layer` with copies of `source`'s weight and bias rounded to `dtype` (requires_grad and train mode kept)."""
    _check_dtype(dtype)
    layer.weight = nn.Parameter(source.weight.detach().to(dtype).clone(), requires_grad=source.weight.requires_grad)
    if source.bias is not None:
        layer.bias = nn.Parameter(source.bias.detach().to(dtype).clone(), requires_grad=source.bias.requires_grad)
    else:
        layer.register_parameter("bias", None)
    layer.impl = _check_impl(impl)
    layer.train(source.training)
    return layer


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# ---- im2col and the convolution ----
def _col2im(cols: torch.Tensor, shape, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """The adjoint of _columns: (N*Ho*Wo, kh*kw*C) summed back into (N, H, W, C), in cols' dtype (one
    strided add per kernel position)."""
    n, h, w, c = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    g = cols.reshape(n, ho, wo, kh, kw, c)
    acc = torch.zeros(n, h + 2 * ph, w + 2 * pw, c, dtype=cols.dtype, device=cols.device)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            acc[:, y0 : y0 + sh * (ho - 1) + 1 : sh, x0 : x0 + sw * (wo - 1) + 1 : sw] += g[:, :, :, ky, kx]
    return acc[:, ph : ph + h, pw : pw + w]


class _Im2col(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation):
        ctx.geometry = (x.shape, x.dtype, kernel_size, stride, padding, dilation)
        return _columns(x, kernel_size, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, *geometry = ctx.geometry
        wide = torch.float64 if grad.dtype == torch.float64 else torch.float32
        return _col2im(grad.to(wide), shape, *geometry).to(dtype), None, None, None, None


def im2col(x: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """Columns of a convolution of a channels-last x (N, H, W, C): (N*Ho*Wo, kh*kw*C), the kernel
    positions ordered (ky, kx, c); pairs of ints for the geometry. Differentiable (the backward sums the
    column gradients in float32 and rounds once)."""
    return _Im2col.apply(x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))


def _flat(geometry) -> list[int]:
    """(kernel, stride, padding, dilation) pairs as pyquant::im2col_matmul's geometry list."""
    return [int(v) for pair in geometry for v in pair]


class _Conv2d16Fn(torch.autograd.Function):
    """out = columns(x) @ W^T + bias over the whole batch (channels-last result), with a backward that is
    three products again:
      grad_W = G^T @ columns(x)                            (one product over all N*Ho*Wo positions)
      grad_x = columns(G padded by d(k-1)-p) @ flip(W)^T   (stride 1: the transposed convolution)
             = col2im(G @ W), summed in float32            (stride > 1)
      grad_bias = sum of G (float32)
    each rounded once to its tensor's dtype. The columns of x are recomputed in backward, not stored."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, out_dtype):
        kernel, stride, padding, dilation = geometry
        n, c, h, w = x.shape
        cout = weight.shape[0]
        ho, wo = (_out_size(size, *g) for size, g in zip((h, w), zip(kernel, stride, padding, dilation)))
        x_nhwc = x.permute(0, 2, 3, 1)  # a view; contiguous when x is channels_last
        w2 = weight.permute(0, 2, 3, 1).reshape(cout, -1)  # (C_out, (ky, kx, c))
        if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0):
            out = _ops.matmul(x_nhwc.reshape(n * h * w, c), w2.t(), bias, -1, out_dtype)
        else:  # the columns gathered while packing, not copied
            out = _ops.im2col_matmul(x_nhwc, w2.t(), bias, -1, _flat(geometry), True, out_dtype)
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(n, ho, wo, cout).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kernel, stride, padding, dilation = ctx.geometry
        n, c, h, w = x.shape
        cout = weight.shape[0]
        g_nhwc = grad.permute(0, 2, 3, 1)
        ho, wo = g_nhwc.shape[1:3]
        g = g_nhwc.reshape(n * ho * wo, cout)
        if g.dtype != weight.dtype:  # a float32 output's gradient: the products take 16-bit operands
            g = g.to(weight.dtype)
        grad_x = grad_w = grad_bias = None
        w2 = weight.permute(0, 2, 3, 1).reshape(cout, -1)
        if ctx.needs_input_grad[1]:
            gw = _ops.im2col_matmul(x.permute(0, 2, 3, 1), g.t(), None, -1, _flat(ctx.geometry), False,
                                   weight.dtype)  # G^T @ columns(x): (C_out, (ky, kx, c))
            grad_w = gw.view(cout, kernel[0], kernel[1], c).permute(0, 3, 1, 2)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.float().sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            flip_pad = tuple(d * (k - 1) - p for k, p, d in zip(kernel, padding, dilation))
            if stride == (1, 1) and min(flip_pad) >= 0:
                w_flip = weight.flip(2, 3).permute(1, 2, 3, 0).reshape(c, -1)  # (C, (ky, kx, o))
                flip_geometry = _flat((kernel, (1, 1), flip_pad, dilation))
                gx = _ops.im2col_matmul(g.view(n, ho, wo, cout), w_flip.t(), None, -1, flip_geometry, True, x.dtype)
            else:
                gx = _col2im(_ops.matmul(g, w2, None, -1, torch.float32), (n, h, w, c), kernel, stride, padding,
                             dilation).to(x.dtype)
            grad_x = gx.view(n, h, w, c).permute(0, 3, 1, 2)
        return grad_x, grad_w, grad_bias, None, None


# ---- layers ----
class Linear16(nn.Linear):
    """`nn.Linear` with float16 / bfloat16 weight and bias, on pyquant's matmul.

    Input: float16, bfloat16 or float32 (cast to the weight's dtype). Output: the weight's dtype, or
    float32 for a float32 input (the accumulator is then returned without the 16-bit rounding).
    `weight` and `bias` are ordinary parameters (out_features x in_features, out_features): state dicts
    and optimizers work as for nn.Linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype: torch.dtype = torch.float16,
        impl: str = "pyquant",
    ) -> None:
        _check_dtype(dtype)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=torch.float32)
        self.to(dtype)
        self.impl = _check_impl(impl)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.float16, impl: str = "pyquant") -> "Linear16":
        """A Linear16 holding `linear`'s weight and bias rounded to `dtype` (requires_grad kept)."""
        layer = _unfilled(cls, linear, nn.Linear, "from_linear")
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        return _take_parameters(layer, linear, dtype, impl)

    def _use_torch(self, x: torch.Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "torch"
        rows = _pow2(x.numel() // max(x.shape[-1], 1))
        out_features, in_features = self.weight.shape  # what is measured: the weight, not the attributes
        key = ("linear", rows, in_features, out_features, self.bias is not None, x.dtype, x.device.type,
               torch.get_num_threads())

        def make_runs():
            probe = torch.randn(rows, in_features, device=x.device).to(x.dtype)
            w, b = self.weight.detach(), None if self.bias is None else self.bias.detach()
            return lambda: linear(probe, w, b), lambda: F.linear(probe, w, b)

        return choose(key, make_runs) == "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        out_dtype = torch.float32 if x.dtype == torch.float32 else dtype
        x = x.to(dtype)
        if self._use_torch(x):
            return F.linear(x, self.weight, self.bias).to(out_dtype)
        return linear(x, self.weight, self.bias, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dtype={self.weight.dtype}, impl={self.impl}"


class Conv2d16(nn.Conv2d):
    """`nn.Conv2d` (groups=1, padding_mode="zeros") with float16 / bfloat16 weight and bias, on pyquant's
    matmul: out = im2col(x) @ W^T + bias over the whole batch (see the module docstring), float32
    accumulation and one rounding. Input / output dtypes as Linear16; the output is channels-last.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype: torch.dtype = torch.float16,
                 impl: str = "pyquant") -> None:
        _check_dtype(dtype)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=torch.float32)
        self._check_supported()
        self.to(dtype)
        self.impl = _check_impl(impl)

    def _check_supported(self) -> None:
        """Refuse what the kernel cannot do and bring the geometry to pairs of ints. Run on every forward too:
        these are plain attributes that nn.Conv2d honours when changed after construction."""
        if self.groups != 1:
            raise ValueError(f"Conv2d16 supports groups=1 only, got groups={self.groups}")
        if self.padding_mode != "zeros":
            raise ValueError(f"Conv2d16 supports padding_mode='zeros' only, got {self.padding_mode!r}")
        self.stride, self.dilation = tuple(_pair(self.stride)), tuple(_pair(self.dilation))
        if not isinstance(self.padding, str):
            self.padding = tuple(_pair(self.padding))
        elif self.padding == "valid":
            self.padding = (0, 0)
        elif self.padding == "same" and self.stride == (1, 1):  # symmetric padding needs an odd effective kernel
            pads = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if any(p % 2 for p in pads):
                raise ValueError("Conv2d16 supports padding='same' only with odd (dilated) kernel sizes")
            self.padding = tuple(p // 2 for p in pads)
        else:
            raise ValueError(f"padding={self.padding!r} needs stride 1 and is 'same' or 'valid', got stride {self.stride}")

    @classmethod
    def supports(cls, conv: nn.Conv2d) -> bool:
        """Whether `conv` can become a Conv2d16."""
        if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros":
            return False
        if conv.padding == "same":
            return all(d * (k - 1) % 2 == 0 for d, k in zip(conv.dilation, conv.kernel_size))
        return True

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, dtype: torch.dtype = torch.float16, impl: str = "pyquant") -> "Conv2d16":
        """A Conv2d16 holding `conv`'s weight and bias rounded to `dtype`."""
        layer = _unfilled(cls, conv, nn.Conv2d, "from_conv")
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(layer, name, getattr(conv, name))
        layer._check_supported()
        return _take_parameters(layer, conv, dtype, impl)

    def _pyquant(self, x: torch.Tensor, weight, bias, out_dtype) -> torch.Tensor:
        geometry = (self.kernel_size, self.stride, tuple(self.padding), self.dilation)
        return _Conv2d16Fn.apply(x, weight, bias, geometry, out_dtype)

    def _use_torch(self, x: torch.Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "torch"
        # every input of the measured choice: the weight's shape rather than attributes that describe it
        key = ("conv2d", tuple(x.shape), tuple(self.weight.shape), self.stride, self.padding, self.dilation,
               self.bias is not None, x.dtype, x.device.type, torch.get_num_threads())

        def make_runs():
            probe = torch.randn(x.shape, device=x.device).to(x.dtype)
            w, b = self.weight.detach(), None if self.bias is None else self.bias.detach()
            return (
                lambda: self._pyquant(probe, w, b, x.dtype),
                lambda: F.conv2d(probe, w, b, self.stride, self.padding, self.dilation),
            )

        return choose(key, make_runs) == "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        out_dtype = torch.float32 if x.dtype == torch.float32 else dtype
        x = x.to(dtype)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(f"Conv2d16 expects a 3-D or 4-D input, got shape {tuple(x.shape)}")
        self._check_supported()
        if self._use_torch(x):
            out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation).to(out_dtype)
        else:
            out = self._pyquant(x, self.weight, self.bias, out_dtype)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dtype={self.weight.dtype}, impl={self.impl}"


# ---- the model transform ----
def _widen_inputs(module, args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _cast_tree(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_tree(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_tree(v, dtype) for k, v in value.items()}
    return value


def half(
    model: nn.Module,
    dtype: torch.dtype = torch.float16,
    keep_norm_fp32: bool = True,
    impl: Optional[str] = None,
    cast_inputs: bool = True,
) -> nn.Module:
    """Convert `model` in place for the "half" setting and return it (a new module when `model` itself is
    an nn.Linear or nn.Conv2d).

    - every `nn.Linear` becomes a `Linear16` and every supported `nn.Conv2d` (groups=1, zero padding) a
      `Conv2d16` (same parameter names: state dicts load both ways after a dtype cast);
    - `impl`: "pyquant" / "torch" for all of them, or by default the module rule (`default_impl`: always
      pyquant's for float16 on a CPU without native FP16, otherwise measured per layer and input shape);
    - every other parameter and floating-point buffer is cast to `dtype`, except those of normalisation
      layers when `keep_norm_fp32` (BatchNorm, LayerNorm, GroupNorm, RMSNorm, ...): their parameters and
      running statistics stay float32 and they compute in float32, returning `dtype`:
      torch's own mixed-dtype kernels where it has them (16-bit input, float32 parameters: BatchNorm,
      InstanceNorm, LayerNorm, and on CPU GroupNorm and RMSNorm), else the input is widened to float32
      and the output rounded back;
    - `cast_inputs`: floating-point tensors passed to `model` are cast to `dtype` (the caller can feed
      float32 batches); the output is in `dtype`: call `.float()` on logits before the loss or softmax.
    """
    _check_dtype(dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    impl = _check_impl(impl) if impl is not None else default_impl(device, dtype)

    def convert(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, Linear16.from_linear(child, dtype, impl))
            elif type(child) is nn.Conv2d and Conv2d16.supports(child):
                setattr(parent, name, Conv2d16.from_conv(child, dtype, impl))
            else:
                convert(child)

    if type(model) is nn.Linear:
        model = Linear16.from_linear(model, dtype, impl)
    elif type(model) is nn.Conv2d and Conv2d16.supports(model):
        model = Conv2d16.from_conv(model, dtype, impl)
    else:
        convert(model)
    norm_ids = set()
    mixed = _mixed_dtype_norms(device.type)
    for module in model.modules():
        if keep_norm_fp32 and isinstance(module, NORM_TYPES):
            norm_ids.add(id(module))
            module.float()
            if not isinstance(module, mixed):  # torch's kernel needs one dtype: widen, compute, round back
                module.register_forward_pre_hook(_widen_inputs)
                module.register_forward_hook(lambda m, args, out: _cast_tree(out, dtype))
    for module in model.modules():
        if id(module) in norm_ids:
            continue
        module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    if cast_inputs:
        model.register_forward_pre_hook(
            lambda m, args, kwargs: (_cast_tree(args, dtype), _cast_tree(kwargs, dtype)), with_kwargs=True
        )
    return model

