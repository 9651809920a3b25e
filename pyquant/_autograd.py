"""The backward formulas of pyquant's differentiable ops (registered by pyquant._ops): pyquant::matmul and the
fused low-rank convolution (pyquant::lowrank_conv2d, pyquant::lowrank_conv2d_train), plus the autograd.Functions
that pyquant.ops.lowrank_conv uses on its eager paths.

It calls ops through `torch.ops.pyquant.<name>` and kernels through pyquant.backends, never through pyquant._ops
or the front-ends (pyquant.ops, pyquant.nn), which import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyquant import backends
from pyquant._nvtx import kernel_range
from pyquant._shapes import conv_output_size, lowrank_shape, matmul_shape
from pyquant.backends.cpu import conv as cpu_conv
from pyquant.backends.reference.conv import compute_dtype


# ---- pyquant::matmul ----
def matmul_setup_context(ctx, inputs, output):
    a, b, bias, bias_dim, out_dtype = inputs
    ctx.save_for_backward(a, b)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.bias_dim = bias_dim


def _reduce_to(grad32: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if grad32.shape != shape:
        grad32 = grad32.sum_to_size(shape)
    return grad32.to(dtype)


def matmul_backward(ctx, grad):
    """grad_a = grad @ b^T and grad_b = a^T @ grad on the same op (float32 accumulation, one rounding; in
    float32 then summed where an operand was broadcast), grad_bias the float32 sum of grad."""
    matmul = torch.ops.pyquant.matmul.default
    a, b = ctx.saved_tensors
    grad_a = grad_b = grad_bias = None
    batch, m, n, k = matmul_shape(a, b)
    if ctx.needs_input_grad[0]:
        # summed over the batch dimensions a was broadcast along (in float32, one rounding)
        if grad.shape[:-2] == a.shape[:-2]:
            grad_a = matmul(grad, b.mT, None, -1, a.dtype)
        else:
            grad_a = _reduce_to(matmul(grad, b.mT, None, -1, torch.float32), a.shape, a.dtype)
    if ctx.needs_input_grad[1]:
        # a 2-D b shared by the whole batch: one product over the stacked rows
        if b.dim() == 2 and len(batch) > 0:
            a_rows = a.expand(batch + (m, k)).reshape(-1, k)
            grad_b = matmul(a_rows.mT, grad.reshape(-1, n), None, -1, b.dtype)
        elif grad.shape[:-2] == b.shape[:-2]:
            grad_b = matmul(a.mT, grad, None, -1, b.dtype)
        else:
            grad_b = _reduce_to(matmul(a.mT, grad, None, -1, torch.float32), b.shape, b.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        keep = grad.dim() + ctx.bias_dim
        grad_bias = grad.float().sum(dim=tuple(d for d in range(grad.dim()) if d != keep)).to(ctx.bias_dtype)
    return grad_a, grad_b, grad_bias, None, None


# ---- the fused low-rank convolution ----
LOWRANK = "lowrank_conv2d"  # the kernel of both ops (keep: also write the intermediate)


def lowrank_forward(x, w1, w2, bias, stride, padding, dilation, keep: bool):
    """The selected backend's kernel called directly (what both ops run): (y, t or an empty tensor)."""
    with kernel_range(LOWRANK):
        return backends.implementation(LOWRANK, x.device.type)(
            x, w1, w2, bias, list(stride), list(padding), list(dilation), keep
        )


# Each product of the backward runs on pyquant's CPU kernels where they beat oneDNN's (the rules are
# pyquant.backends.cpu.conv's), else on `aten.convolution_backward`. `direct`: call the kernel, not its op (the
# eager Function below, plain eager tensors only); the ops are for torch.compile, which traces the backward
# with fake tensors that have no data to hand the kernel.
def weight_grad(x, grad, weight_shape, stride, padding, dilation, direct: bool = False):
    """The weight gradient (float32) of conv2d(x, W) on the CPU kernel, or None where oneDNN's is faster or
    the kernel cannot run (other backends, devices, dtypes)."""
    r, c, kh, kw = weight_shape
    if not (cpu_conv.kernel_runs(x) and grad.dtype == x.dtype and cpu_conv.weight_grad_pays(r, c, kh * kw)):
        return None
    if direct:
        return cpu_conv.weight_grad(x, grad, (kh, kw), stride, padding, dilation)
    return torch.ops.pyquant.conv2d_weight_grad(
        x, grad, list(weight_shape), list(stride), list(padding), list(dilation)
    )


def input_grad(gt, x, w1, stride, padding, dilation, direct: bool = False):
    """d(conv(x, w1))/dx for gradient gt on the CPU kernel (stride 1: a convolution of gt with the flipped,
    transposed w1), or None when torch should do it."""
    if tuple(stride) != (1, 1) or not cpu_conv.kernel_runs(gt) or w1.dtype != gt.dtype:
        return None
    r, c, kh, kw = w1.shape
    pad = (dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1])
    if min(pad) < 0 or not cpu_conv.input_grad_pays(r):
        return None
    h, w = (conv_output_size(gt.shape[2 + i], (kh, kw)[i], 1, pad[i], dilation[i]) for i in range(2))
    if (h, w) != tuple(x.shape[2:]):
        return None
    if direct:
        return cpu_conv.stride1_conv(gt, w1.flip(2, 3).transpose(0, 1), pad, dilation)
    return torch.ops.pyquant.conv2d_stride1(gt, w1.flip(2, 3).transpose(0, 1), list(pad), list(dilation))


def rank_grad(grad_y, w1, w2, stride, padding, want_x: bool, direct: bool = False):
    """g_t = W2^T g_y, the gradient of the rank channels (a 1 x 1 convolution of g_y into them), on the CPU
    kernel. Returns (g_t, None); or, for want_x and a 1 x 1, stride-1, unpadded first factor, (g_t, g_x) from
    one call of the forward kernel with the factors W2^T and W1^T: g_x = W1^T g_t, g_t its intermediate. None
    where oneDNN should do it."""
    o, r = w2.shape
    if not cpu_conv.rank_grad_pays(r) or not cpu_conv.kernel_runs(grad_y) or w2.dtype != grad_y.dtype \
            or w1.dtype != grad_y.dtype:
        return None
    w2t = w2.t().reshape(r, o, 1, 1)
    c, kh, kw = w1.shape[1:]
    if want_x and (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        args = (grad_y, w2t, w1.reshape(r, c).t(), None, [1, 1], [0, 0], [1, 1])
        gx, gt = lowrank_forward(*args, True) if direct else torch.ops.pyquant.lowrank_conv2d_train(*args)
        return gt, gx
    if direct:
        return cpu_conv.stride1_conv(grad_y, w2t, [0, 0], [1, 1]), None
    return torch.ops.pyquant.conv2d_stride1(grad_y, w2t, [0, 0], [1, 1]), None


def backward_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 convolutions and matrix products are many times slower than float32 ones in torch on CPUs
    # without native float16 arithmetic (docs/compress.md): widen. bfloat16 ones run on oneDNN's bfloat16 kernels (float32
    # accumulation), faster than float32: keep (the unfused pair's autograd does the same).
    return torch.float32 if dtype == torch.float16 else dtype


def lowrank_backward_math(ctx, x, w1, w2, t, grad_y, grad_t):
    """Gradients of y = w2 . t + bias, t = conv(x, w1), from the saved (or recomputed, t None) intermediate:
    the unfused pair's math, each product on pyquant's CPU kernels where they beat oneDNN's (docs/compress.md,
    "Backward"), else `aten.convolution_backward` (oneDNN on CPU, cuDNN for CUDA tensors)."""
    cd = backward_dtype(x.dtype)
    need_x, need_w1, need_w2, need_b = ctx.needs_input_grad[:4]
    need_b = bool(need_b and ctx.has_bias)
    if grad_y is None:
        grad_y = torch.zeros(lowrank_shape(x, w1, w2, ctx.stride, ctx.padding, ctx.dilation), dtype=cd,
                             device=x.device)
    need_gt = bool(need_x or need_w1)
    grad_x = grad_w1 = grad_w2 = grad_b = None
    if need_gt or need_w2 or need_b:
        if t is None:
            t = F.conv2d(x.to(compute_dtype(x.dtype)), w1.to(compute_dtype(x.dtype)), None, ctx.stride,
                         ctx.padding, ctx.dilation)
        o, r = w2.shape
        grad_y, t = grad_y.to(cd), t.to(cd)
        gw2 = weight_grad(t, grad_y, (o, r, 1, 1), [1, 1], [0, 0], [1, 1], ctx.direct) if need_w2 else None
        w2_torch = bool(need_w2) and gw2 is None
        ours = None
        if need_gt:  # g_x comes along only when nothing is added to g_t
            want_x = bool(need_x) and grad_t is None
            ours = rank_grad(grad_y, w1.to(cd), w2.to(cd), ctx.stride, ctx.padding, want_x, ctx.direct)
        gt, gx_fused = (None, None) if ours is None else ours
        gt_torch = need_gt and ours is None
        gb = None
        if gt_torch or w2_torch:
            gt2, gw2_torch, gb = torch.ops.aten.convolution_backward(
                grad_y, t, w2.to(cd).reshape(o, r, 1, 1), [o] if need_b else None, [1, 1], [0, 0],
                [1, 1], False, [0, 0], 1, [gt_torch, w2_torch, need_b],
            )
            gt = gt2 if gt_torch else gt
        elif need_b:
            gb = grad_y.sum((0, 2, 3), dtype=torch.float32)
        if need_w2:
            grad_w2 = (gw2_torch if w2_torch else gw2).reshape(o, r).to(w2.dtype)
        if need_b:
            grad_b = gb.to(ctx.bias_dtype)
    if need_gt:
        if grad_t is not None:
            gt = gt + grad_t.to(cd)
        xc, w1c = x.to(cd), w1.to(cd)
        gx = gx_fused
        if need_x and gx is None:
            gx = input_grad(gt, xc, w1c, ctx.stride, ctx.padding, ctx.dilation, ctx.direct)
        gw1 = weight_grad(xc, gt, w1.shape, ctx.stride, ctx.padding, ctx.dilation, ctx.direct) if need_w1 else None
        gx_torch, w1_torch = bool(need_x) and gx is None, bool(need_w1) and gw1 is None
        if gx_torch or w1_torch:
            gx2, gw1_torch, _ = torch.ops.aten.convolution_backward(
                gt, xc, w1c, None, ctx.stride, ctx.padding, ctx.dilation, False, [0, 0], 1,
                [gx_torch, w1_torch, False],
            )
            gx = gx2 if gx_torch else gx
            gw1 = gw1_torch if w1_torch else gw1
        grad_x = None if gx is None else gx.to(x.dtype)
        grad_w1 = None if gw1 is None else gw1.to(w1.dtype)
    return grad_x, grad_w1, grad_w2, grad_b


def _setup(ctx, inputs, t, direct: bool = False):
    x, w1, w2, bias, stride, padding, dilation = inputs
    ctx.direct = direct  # the backward may call the kernels without their ops (the eager Function below)
    ctx.stride, ctx.padding, ctx.dilation = list(stride), list(padding), list(dilation)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, w1, w2, t)


def lowrank_setup_context(ctx, inputs, output):
    """pyquant::lowrank_conv2d keeps no intermediate: its backward recomputes it."""
    _setup(ctx, inputs, None)


def lowrank_train_setup_context(ctx, inputs, output):
    _setup(ctx, inputs, output[1])


def lowrank_backward(ctx, grad_y):
    x, w1, w2, t = ctx.saved_tensors
    return (*lowrank_backward_math(ctx, x, w1, w2, t, grad_y, None), None, None, None)


def lowrank_train_backward(ctx, grad_y, grad_t):
    x, w1, w2, t = ctx.saved_tensors
    return (*lowrank_backward_math(ctx, x, w1, w2, t, grad_y, grad_t), None, None, None)


class EagerTraining(torch.autograd.Function):
    """`pyquant::lowrank_conv2d_train` for plain eager CPU tensors, without the custom ops' dispatch: the same
    forward implementation and backward math, and the backward's kernels called directly. The ops' autograd
    and dispatch layers cost tens of microseconds a training step, a sizeable part of a small layer's compute
    (docs/compress.md). torch.compile, modes, subclasses and the profiler still get the ops. Old-style (ctx in
    forward): a Function with setup_context has its arguments bound with inspect.signature on every call."""

    @staticmethod
    def forward(ctx, x, w1, w2, bias, stride, padding, dilation):
        y, t = lowrank_forward(x, w1, w2, bias, stride, padding, dilation, True)
        _setup(ctx, (x, w1, w2, bias, stride, padding, dilation), t, direct=True)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, w2, t = ctx.saved_tensors
        return (*lowrank_backward_math(ctx, x, w1, w2, t, grad_y, None), None, None, None)


class FunctorchTraining(torch.autograd.Function):
    """EagerTraining for torch.func transforms (grad, jacrev, ...), which need setup_context (the ops'
    autograd does not support them; vmap raises). Its backward runs torch's convolutions: functorch's wrapped
    tensors have no data for the kernels (`kernel_runs` of pyquant.backends.cpu.conv)."""

    @staticmethod
    def forward(x, w1, w2, bias, stride, padding, dilation):
        return lowrank_forward(x, w1, w2, bias, stride, padding, dilation, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _setup(ctx, inputs, output[1], direct=True)

    @staticmethod
    def backward(ctx, grad_y, grad_t):
        x, w1, w2, t = ctx.saved_tensors
        return (*lowrank_backward_math(ctx, x, w1, w2, t, grad_y, None), None, None, None)
