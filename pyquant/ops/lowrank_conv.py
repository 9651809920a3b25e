"""Fused low-rank convolution: a k x k convolution into `rank` channels followed by a 1 x 1 convolution.

`pyquant.ops.lowrank_conv2d(x, weight_first, weight_second, bias=None, stride=1, padding=0, dilation=1)` is

    F.conv2d(F.conv2d(x, weight_first, None, stride, padding, dilation), weight_second, bias)

for NCHW `x` [N, C, H, W] (or unbatched [C, H, W]), `weight_first` [R, C, kh, kw], `weight_second` [O, R] or
[O, R, 1, 1] and `bias` [O], all float32, float16 or bfloat16 (float64 runs the reference math). Products
are accumulated in float32 and rounded once to the output dtype: the intermediate [N, R, Ho, Wo] is never
rounded (nor, on the cpu and triton backends, written to memory at inference).

It is two `torch.library` custom ops with fake kernels (meta tensors, torch.compile) and autograd:

- ``pyquant::lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation) -> y``: inference, and what
  `torch.ops.pyquant.lowrank_conv2d` users get; its backward recomputes the intermediate;
- ``pyquant::lowrank_conv2d_train(...) -> (y, t)``: the same kernel also writes the intermediate `t`
  (what the unfused pair keeps for backward anyway); `lowrank_conv2d` calls it when a gradient is needed.

Implementations picked by `pyquant.backends`:

- ``reference``: two `F.conv2d` calls in float32 (float64 stays float64), one rounding;
- ``cpu``: csrc/cpu/lowrank_conv.cpp: per output tile, the rank channels and their 1 x 1 projection from
  registers and an L1/L2-resident tile buffer (AVX-512 micro-kernel, OpenMP over (image, tile), the same
  bits for any thread count);
- ``triton``: kernels/lowrank_conv.py (also what CUDA tensors use: the CUDA library has no such kernel).

Backward (all backends): the unfused pair's math from the intermediate the training op wrote (the inference op
recomputes it). On the cpu backend each product runs on this module's CPU kernels where they beat oneDNN's
(few channels on one side, where oneDNN's blocks of 16 channels idle): the rank channels' gradient W2^T g_y and,
for 1 x 1 first factors, the input gradient in the same call (the forward kernel with the factors W2^T, W1^T);
the input gradient of a stride-1 k x k factor at low rank (its first stage alone); the weight gradients
(`conv2d_weight_grad_cpu`). The rest is torch's convolution backward (oneDNN on CPU; cuDNN for CUDA tensors).
The kernels are custom ops too (`pyquant::conv2d_weight_grad`, `pyquant::conv2d_stride1`) for torch.compile;
eager CPU training uses an autograd.Function that calls them directly. float16 is widened to float32 for
backward (torch's float16 kernels are slow on CPUs); bfloat16 and float32 run as they are. docs/compress.md
("Backward") has the rules, their measurements and the tolerances.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import warnings
from typing import Optional, Sequence

import torch
import torch.autograd.profiler as _torch_profiler
import torch.nn.functional as F

from pyquant import _native, backends
from pyquant._nvtx import kernel_range

__all__ = ["lowrank_conv2d", "conv_output_size", "KERNEL_DTYPES"]

OP = "lowrank_conv2d"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_HALF = (torch.float16, torch.bfloat16)
LOWRANK_ABI = 4  # csrc/capi_lowrank.cpp pq_lowrank_abi()


# ---- shapes ----
def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _out_shape(x, w1, w2, stride, padding, dilation) -> tuple[int, int, int, int]:
    n, _, h, w = x.shape
    kh, kw = w1.shape[2], w1.shape[3]
    return (
        n,
        w2.shape[0],
        conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
        conv_output_size(w, kw, stride[1], padding[1], dilation[1]),
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


# ---- implementations: (x, w1, w2 [O, R], bias, stride, padding, dilation, keep) -> (y, t or empty) ----
def lowrank_conv2d_reference(x, w1, w2, bias, stride, padding, dilation, keep: bool):
    """Two F.conv2d calls in float32 (float64 stays float64), rounded once to x's dtype."""
    cd = _compute_dtype(x.dtype)
    t = F.conv2d(x.to(cd), w1.to(cd), None, stride, padding, dilation)
    y = F.conv2d(t, w2.to(cd)[:, :, None, None], None if bias is None else bias.to(cd))
    return y.to(x.dtype), (t.to(x.dtype) if keep else x.new_empty(0))


@functools.cache
def _cpu_fn():
    lib = _native.cpu_library()
    if lib is None:
        return None
    try:
        abi = lib.pq_lowrank_abi
        abi.argtypes, abi.restype = [], ctypes.c_int32
        version = abi()
        fn = lib.pq_lowrank_conv2d
    except AttributeError:
        version = None
    if version != LOWRANK_ABI:
        warnings.warn(
            "pyquant: the compiled CPU library has another version of the low-rank convolution kernel "
            f"({version} instead of {LOWRANK_ABI}: rebuild it); lowrank_conv2d runs the reference implementation",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    P = ctypes.c_void_p
    fn.argtypes = [P, P, P, P, P, P, ctypes.c_int32, ctypes.POINTER(ctypes.c_int64), ctypes.c_int32, P, ctypes.c_int32]
    fn.restype = ctypes.c_int32
    size = lib.pq_lowrank_packed_floats
    size.argtypes, size.restype = [ctypes.c_int32, ctypes.POINTER(ctypes.c_int64)], ctypes.c_int64
    wgrad = lib.pq_lowrank_conv2d_wgrad
    wgrad.argtypes = [P, P, P, ctypes.c_int32, ctypes.POINTER(ctypes.c_int64), ctypes.c_int32]
    wgrad.restype = ctypes.c_int32
    return fn


def cpu_bf16_dot(on: Optional[bool] = None) -> bool:
    """Whether the CPU kernel runs bfloat16 input on the AVX512_BF16 pair kernel where the CPU has it
    (default True); `on` changes it. Returns the previous setting (tests and benchmarks compare both)."""
    lib = _native.cpu_library()
    if lib is None or _cpu_fn() is None:
        return False
    fn = lib.pq_lowrank_set_bf16_dot
    fn.argtypes, fn.restype = [ctypes.c_int32], ctypes.c_int32
    previous = bool(fn(1))
    fn(int(previous if on is None else bool(on)))
    return previous


def lowrank_conv2d_cpu(x, w1, w2, bias, stride, padding, dilation, keep: bool):
    """csrc/cpu/lowrank_conv.cpp for float32 / float16 / bfloat16 (other dtypes: the reference)."""
    fn = _cpu_fn()
    if fn is None or x.dtype not in _DTYPE_CODES:
        return lowrank_conv2d_reference(x, w1, w2, bias, stride, padding, dilation, keep)
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    bias = None if bias is None else bias.contiguous()
    n, o, ho, wo = _out_shape(x, w1, w2, stride, padding, dilation)
    r, c, kh, kw = w1.shape
    y = torch.empty((n, o, ho, wo), dtype=x.dtype)
    t = torch.empty((n, r, ho, wo), dtype=x.dtype) if keep else x.new_empty(0)
    if y.numel() == 0:
        return y, t
    dims = (ctypes.c_int64 * 16)(
        n, c, x.shape[2], x.shape[3], r, o, kh, kw, *stride, *padding, *dilation, ho, wo
    )
    rc = fn(
        x.data_ptr(), w1.data_ptr(), w2.data_ptr(), None if bias is None else bias.data_ptr(),
        y.data_ptr(), t.data_ptr() if keep else None, _DTYPE_CODES[x.dtype], dims, torch.get_num_threads(), None, 0,
    )
    if rc == 1:
        raise MemoryError("pyquant lowrank_conv2d: the CPU kernel could not allocate its buffers")
    if rc != 0:
        raise RuntimeError(f"pyquant lowrank_conv2d: the CPU kernel rejected its arguments (code {rc})")
    return y, t


def conv2d_cpu(x, w, padding, dilation):
    """A stride-1 convolution (no bias) on the CPU kernel's first stage alone, or None when it cannot run
    (no library, dtype). The backward pass uses it for the input gradient at low rank, where oneDNN's
    convolution with few input channels is slow."""
    fn = _cpu_fn()
    if fn is None or x.dtype not in _DTYPE_CODES or x.device.type != "cpu":
        return None
    x, w = x.contiguous(), w.contiguous()
    n, c, h, wd = x.shape
    r, _, kh, kw = w.shape
    ho = conv_output_size(h, kh, 1, padding[0], dilation[0])
    wo = conv_output_size(wd, kw, 1, padding[1], dilation[1])
    y = torch.empty((n, r, ho, wo), dtype=x.dtype)
    if y.numel() == 0:
        return y
    dims = (ctypes.c_int64 * 16)(n, c, h, wd, r, r, kh, kw, 1, 1, *padding, *dilation, ho, wo)
    rc = fn(x.data_ptr(), w.data_ptr(), None, None, y.data_ptr(), None, _DTYPE_CODES[x.dtype], dims,
            torch.get_num_threads(), None, 0)
    if rc == 1:
        raise MemoryError("pyquant conv2d_cpu: the CPU kernel could not allocate its buffers")
    if rc != 0:
        raise RuntimeError(f"pyquant conv2d_cpu: the CPU kernel rejected its arguments (code {rc})")
    return y


def conv2d_weight_grad_cpu(x, grad, kernel_size, stride, padding, dilation):
    """The weight gradient [R, C, kh, kw] (float32) of y = conv2d(x, W, None, stride, padding, dilation) for y's
    gradient `grad` [N, R, Ho, Wo], on the CPU kernel (csrc/cpu/lowrank_conv.cpp, `wgrad`): float32
    accumulation, one fixed order of sums per element whatever the thread count. None when it cannot run (no
    library, dtype, device)."""
    if _cpu_fn() is None or x.dtype not in _DTYPE_CODES or grad.dtype != x.dtype or x.device.type != "cpu":
        return None
    if x.dim() != 4 or grad.dim() != 4:
        raise ValueError(f"x and grad must be 4-d (NCHW), got shapes {tuple(x.shape)} and {tuple(grad.shape)}")
    x, grad = x.contiguous(), grad.contiguous()
    n, c, h, w = x.shape
    r, ho, wo = grad.shape[1], grad.shape[2], grad.shape[3]
    kh, kw = kernel_size
    expected = (n, r, *(conv_output_size((h, w)[i], (kh, kw)[i], stride[i], padding[i], dilation[i]) for i in range(2)))
    if tuple(grad.shape) != expected or min(kh, kw, *stride, *dilation) < 1 or min(padding) < 0 or r < 1:
        raise ValueError(
            f"grad has shape {tuple(grad.shape)} but a {kh}x{kw} convolution of x {tuple(x.shape)} with stride "
            f"{tuple(stride)}, padding {tuple(padding)} and dilation {tuple(dilation)} gives {expected}"
        )
    gw = torch.empty((r, c, kh, kw), dtype=torch.float32)
    dims = (ctypes.c_int64 * 16)(n, c, h, w, r, r, kh, kw, *stride, *padding, *dilation, ho, wo)
    rc = _native.cpu_library().pq_lowrank_conv2d_wgrad(
        x.data_ptr(), grad.data_ptr(), gw.data_ptr(), _DTYPE_CODES[x.dtype], dims, torch.get_num_threads()
    )
    if rc == 1:
        raise MemoryError("pyquant conv2d_weight_grad_cpu: the CPU kernel could not allocate its buffers")
    if rc != 0:
        raise RuntimeError(f"pyquant conv2d_weight_grad_cpu: the CPU kernel rejected its arguments (code {rc})")
    return gw


def _weight_grad_pays(out_channels: int, in_channels: int, taps: int) -> bool:
    """Whether the CPU kernel's weight gradient beats oneDNN's for a convolution with these channels and kernel
    taps. oneDNN vectorises over channels in blocks of 16 and wastes lanes at few channels; pyquant's kernel
    vectorises over pixels. Measured (float32 and bfloat16, two threads, the weight gradients of both factors at
    DenseNet-121 and EfficientNet-B0 shapes; docs/compress.md): 3x3, 2.4-4x faster at 4 output channels, 1.5-1.9x
    at 8, 0.8-1.1x at 16; 1 x 1 (batch 8 and 32), 0.88-5.7x (all but two above 1.1x) when one channel count is at
    most 16, 0.74-3.8x when it is at most 56 and the other at most 672, 0.62-1.2x beyond (the 1280-channel head)."""
    if out_channels <= 8:
        return True
    fewest, most = min(out_channels, in_channels), max(out_channels, in_channels)
    return taps == 1 and (fewest <= 16 or (fewest <= 56 and most <= 672))


def _kernel_runs(x) -> bool:
    """Whether the backward may use the CPU kernel for x (a CPU tensor, fake ones included, of a kernel dtype,
    the cpu backend selected, the library loaded)."""
    forced = backends.forced_backend()  # backends.select("cpu") without its cost (6 us), which counts here
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPE_CODES
        and forced in (None, "cpu")
        and _cpu_fn() is not None
        and not torch._C._are_functorch_transforms_active()  # torch.func.grad's wrapped tensors have no data
    )


# The backward's kernel calls are custom ops too: torch.compile traces the backward with fake tensors, which
# have no data to hand the kernel.
@torch.library.custom_op("pyquant::conv2d_weight_grad", mutates_args=())
def _weight_grad_op(
    x: torch.Tensor,
    grad: torch.Tensor,
    weight_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    if len(weight_size) != 4 or tuple(weight_size[:2]) != (grad.shape[1], x.shape[1]):
        raise ValueError(
            f"weight_size {tuple(weight_size)} does not match grad {tuple(grad.shape)} and x {tuple(x.shape)}"
        )
    gw = conv2d_weight_grad_cpu(x, grad, tuple(weight_size[2:]), list(stride), list(padding), list(dilation))
    if gw is None:
        raise RuntimeError("pyquant::conv2d_weight_grad: the CPU kernel cannot run here (no library, device, dtype)")
    return gw


@_weight_grad_op.register_fake
def _(x, grad, weight_size, stride, padding, dilation):
    return x.new_empty(tuple(weight_size), dtype=torch.float32)


@torch.library.custom_op("pyquant::conv2d_stride1", mutates_args=())
def _conv2d_stride1_op(
    x: torch.Tensor, w: torch.Tensor, padding: Sequence[int], dilation: Sequence[int]
) -> torch.Tensor:
    y = conv2d_cpu(x, w, list(padding), list(dilation))
    if y is None:
        raise RuntimeError("pyquant::conv2d_stride1: the CPU kernel cannot run here (no library, device, dtype)")
    return y


@_conv2d_stride1_op.register_fake
def _(x, w, padding, dilation):
    n, _, h, wd = x.shape
    r, _, kh, kw = w.shape
    return x.new_empty((n, r, conv_output_size(h, kh, 1, padding[0], dilation[0]),
                        conv_output_size(wd, kw, 1, padding[1], dilation[1])))


def _weight_grad_cpu(x, grad, weight_shape, stride, padding, dilation, direct: bool = False):
    """The weight gradient (float32) of conv2d(x, W) on the CPU kernel, or None where oneDNN's is faster or
    the kernel cannot run (other backends, devices, dtypes). `direct`: call the kernel, not its op (plain eager
    tensors only)."""
    r, c, kh, kw = weight_shape
    if not (_kernel_runs(x) and grad.dtype == x.dtype and _weight_grad_pays(r, c, kh * kw)):
        return None
    if direct:
        return conv2d_weight_grad_cpu(x, grad, (kh, kw), stride, padding, dilation)
    return torch.ops.pyquant.conv2d_weight_grad(
        x, grad, list(weight_shape), list(stride), list(padding), list(dilation)
    )


def _input_grad_cpu(gt, x, w1, stride, padding, dilation, direct: bool = False):
    """d(conv(x, w1))/dx for gradient gt with the CPU kernel (stride 1: a convolution of gt with the
    flipped, transposed w1), or None when torch should do it. `direct` as for _weight_grad_cpu."""
    if tuple(stride) != (1, 1) or not _kernel_runs(gt) or w1.dtype != gt.dtype:
        return None
    r, c, kh, kw = w1.shape
    pad = (dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1])
    # oneDNN pads fewer than 16 input channels to 16 and is slow there: 2.1-6.7x slower than this kernel at
    # ranks 4-8 (DenseNet-121 3x3 shapes); at 16, as fast at 14x14 and 28x28 (bfloat16 too), and in float32 at
    # 56x56 2.3-6.3 ms between runs against 2.3-2.6 ms. Above 16 its blocking fits. (Its combined input and
    # weight gradient call costs the sum of the two: nothing is lost by splitting them.)
    if min(pad) < 0 or r > 16:
        return None
    h, w = (conv_output_size(gt.shape[2 + i], (kh, kw)[i], 1, pad[i], dilation[i]) for i in range(2))
    if (h, w) != tuple(x.shape[2:]):
        return None
    if direct:
        return conv2d_cpu(gt, w1.flip(2, 3).transpose(0, 1), pad, dilation)
    return torch.ops.pyquant.conv2d_stride1(gt, w1.flip(2, 3).transpose(0, 1), list(pad), list(dilation))


def lowrank_conv2d_triton(x, w1, w2, bias, stride, padding, dilation, keep: bool):
    if x.dtype not in KERNEL_DTYPES:
        return lowrank_conv2d_reference(x, w1, w2, bias, stride, padding, dilation, keep)
    return importlib.import_module("pyquant.kernels.lowrank_conv").lowrank_conv2d(
        x, w1, w2, bias, stride, padding, dilation, keep
    )


backends.register(OP, "reference", lowrank_conv2d_reference)
backends.register(OP, "cpu", lowrank_conv2d_cpu)
backends.register(OP, "triton", lowrank_conv2d_triton)
# The CUDA library has no low-rank convolution: CUDA tensors use the Triton kernel.
backends.register(OP, "cuda", lowrank_conv2d_triton)


def _forward(x, w1, w2, bias, stride, padding, dilation, keep):
    with kernel_range(OP):
        return backends.implementation(OP, x.device.type)(
            x, w1, w2, bias, list(stride), list(padding), list(dilation), keep
        )


# ---- the custom ops ----
@torch.library.custom_op("pyquant::lowrank_conv2d", mutates_args=())
def _lowrank_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    return _forward(x, w1, w2, bias, stride, padding, dilation, False)[0]


@_lowrank_op.register_fake
def _(x, w1, w2, bias, stride, padding, dilation):
    return x.new_empty(_out_shape(x, w1, w2, stride, padding, dilation))


@torch.library.custom_op("pyquant::lowrank_conv2d_train", mutates_args=())
def _lowrank_train_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, w1, w2, bias, stride, padding, dilation, True)


@_lowrank_train_op.register_fake
def _(x, w1, w2, bias, stride, padding, dilation):
    n, o, ho, wo = _out_shape(x, w1, w2, stride, padding, dilation)
    return x.new_empty((n, o, ho, wo)), x.new_empty((n, w1.shape[0], ho, wo))


def _rank_grad_cpu(grad_y, w1, w2, stride, padding, want_x: bool, direct: bool = False):
    """g_t = W2^T g_y, the gradient of the rank channels (a 1 x 1 convolution of g_y into them), on the CPU kernel
    up to 64 rank channels: oneDNN's data gradient into few channels is slow (it pads them to multiples of 16),
    2-4.4x slower at 16-56 channels of the benchmark shapes, 0.9-1.1x at 80 (float32, bfloat16, two threads).
    Returns (g_t, None); or, for want_x and a 1 x 1, stride-1, unpadded first factor, (g_t, g_x) from one call
    of the forward kernel with the factors W2^T and W1^T: g_x = W1^T g_t, g_t its intermediate. None where
    oneDNN should do it. `direct` as for _weight_grad_cpu."""
    o, r = w2.shape
    if r > 64 or not _kernel_runs(grad_y) or w2.dtype != grad_y.dtype or w1.dtype != grad_y.dtype:
        return None
    w2t = w2.t().reshape(r, o, 1, 1)
    c, kh, kw = w1.shape[1:]
    if want_x and (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        args = (grad_y, w2t, w1.reshape(r, c).t(), None, [1, 1], [0, 0], [1, 1])
        gx, gt = _forward(*args, True) if direct else torch.ops.pyquant.lowrank_conv2d_train(*args)
        return gt, gx
    if direct:
        return conv2d_cpu(grad_y, w2t, [0, 0], [1, 1]), None
    return torch.ops.pyquant.conv2d_stride1(grad_y, w2t, [0, 0], [1, 1]), None


def _backward_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 convolutions and matrix products are 20-40x slower than float32 ones in torch on CPUs
    # without native float16 arithmetic: widen. bfloat16 ones run on oneDNN's bfloat16 kernels (float32
    # accumulation), faster than float32: keep (the unfused pair's autograd does the same).
    return torch.float32 if dtype == torch.float16 else dtype


def _backward_math(ctx, x, w1, w2, t, grad_y, grad_t):
    """Gradients of y = w2 . t + bias, t = conv(x, w1), from the saved (or recomputed) intermediate: the unfused
    pair's math, each product on pyquant's CPU kernels where they beat oneDNN's (docs/compress.md, "Backward"),
    else `aten.convolution_backward` (oneDNN on CPU)."""
    cd = _backward_dtype(x.dtype)
    need_x, need_w1, need_w2, need_b = ctx.needs_input_grad[:4]
    need_b = bool(need_b and ctx.has_bias)
    if grad_y is None:
        grad_y = torch.zeros(_out_shape(x, w1, w2, ctx.stride, ctx.padding, ctx.dilation), dtype=cd, device=x.device)
    need_gt = bool(need_x or need_w1)
    grad_x = grad_w1 = grad_w2 = grad_b = None
    if need_gt or need_w2 or need_b:
        if t is None:
            t = F.conv2d(x.to(_compute_dtype(x.dtype)), w1.to(_compute_dtype(x.dtype)), None, ctx.stride,
                         ctx.padding, ctx.dilation)
        o, r = w2.shape
        grad_y, t = grad_y.to(cd), t.to(cd)
        gw2 = _weight_grad_cpu(t, grad_y, (o, r, 1, 1), [1, 1], [0, 0], [1, 1], ctx.direct) if need_w2 else None
        w2_torch = bool(need_w2) and gw2 is None
        ours = None
        if need_gt:  # g_x comes along only when nothing is added to g_t
            want_x = bool(need_x) and grad_t is None
            ours = _rank_grad_cpu(grad_y, w1.to(cd), w2.to(cd), ctx.stride, ctx.padding, want_x, ctx.direct)
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
            gx = _input_grad_cpu(gt, xc, w1c, ctx.stride, ctx.padding, ctx.dilation, ctx.direct)
        gw1 = _weight_grad_cpu(xc, gt, w1.shape, ctx.stride, ctx.padding, ctx.dilation, ctx.direct) if need_w1 else None
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


def _setup_context(ctx, inputs, output):
    _setup(ctx, inputs, None)


def _setup_context_train(ctx, inputs, output):
    _setup(ctx, inputs, output[1])


def _backward(ctx, grad_y):
    x, w1, w2, t = ctx.saved_tensors
    return (*_backward_math(ctx, x, w1, w2, t, grad_y, None), None, None, None)


def _backward_train(ctx, grad_y, grad_t):
    x, w1, w2, t = ctx.saved_tensors
    return (*_backward_math(ctx, x, w1, w2, t, grad_y, grad_t), None, None, None)


torch.library.register_autograd("pyquant::lowrank_conv2d", _backward, setup_context=_setup_context)
torch.library.register_autograd("pyquant::lowrank_conv2d_train", _backward_train, setup_context=_setup_context_train)


class _EagerTraining(torch.autograd.Function):
    """`pyquant::lowrank_conv2d_train` for plain eager CPU tensors, without the custom ops' dispatch: the same
    forward implementation and backward math, and the backward's kernels called directly. The ops' autograd
    and dispatch layers cost about 75 us a training step (a 14x14 DenseNet-121 layer computes in 500-700 us).
    torch.compile, modes, subclasses and the profiler still get the ops. Old-style (ctx in forward): a Function
    with setup_context has its arguments bound with inspect.signature on every call, 35 us."""

    @staticmethod
    def forward(ctx, x, w1, w2, bias, stride, padding, dilation):
        y, t = _forward(x, w1, w2, bias, stride, padding, dilation, True)
        _setup(ctx, (x, w1, w2, bias, stride, padding, dilation), t, direct=True)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, w2, t = ctx.saved_tensors
        return (*_backward_math(ctx, x, w1, w2, t, grad_y, None), None, None, None)


class _FunctorchTraining(torch.autograd.Function):
    """_EagerTraining for torch.func transforms (grad, jacrev, ...), which need setup_context (the ops'
    autograd does not support them; vmap raises). Its backward runs torch's convolutions: functorch's wrapped
    tensors have no data for the kernels (`_kernel_runs`)."""

    @staticmethod
    def forward(x, w1, w2, bias, stride, padding, dilation):
        return _forward(x, w1, w2, bias, stride, padding, dilation, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _setup(ctx, inputs, output[1], direct=True)

    @staticmethod
    def backward(ctx, grad_y, grad_t):
        x, w1, w2, t = ctx.saved_tensors
        return (*_backward_math(ctx, x, w1, w2, t, grad_y, None), None, None, None)


# ---- public API ----
def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def resolve_padding(padding, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]):
    """An int, a pair, "valid" or "same" (stride 1, symmetric padding only) -> a pair of ints."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as torch.nn.Conv2d)")
            total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            if any(t % 2 for t in total):
                raise ValueError(
                    f"padding='same' with kernel {kernel_size} and dilation {dilation} needs asymmetric padding, "
                    "which lowrank_conv2d does not support; pad the input with F.pad first"
                )
            return total[0] // 2, total[1] // 2
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    return _pair(padding, "padding", 0)


def _check(x, w1, w2, bias):
    for name, t in (("x", x), ("weight_first", w1), ("weight_second", w2), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor")
        if t.dtype not in KERNEL_DTYPES + (torch.float64,):
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}: all operands must have the same dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if w1.dim() != 4:
        raise ValueError(f"weight_first must be [rank, in_channels, kh, kw], got shape {tuple(w1.shape)}")
    if w2.dim() == 4:
        if w2.shape[2:] != (1, 1):
            raise ValueError(f"weight_second must be [out, rank] or [out, rank, 1, 1], got shape {tuple(w2.shape)}")
        w2 = w2.reshape(w2.shape[0], w2.shape[1])
    if w2.dim() != 2:
        raise ValueError(f"weight_second must be [out, rank] or [out, rank, 1, 1], got shape {tuple(w2.shape)}")
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"weight_second has {w2.shape[1]} input channels but weight_first has rank {w1.shape[0]}")
    if min(w1.shape) < 1 or w2.shape[0] < 1:
        raise ValueError(f"empty weights: weight_first {tuple(w1.shape)}, weight_second {tuple(w2.shape)}")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != w1.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight_first expects {w1.shape[1]}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != w2.shape[0]):
        raise ValueError(f"bias must be [{w2.shape[0]}], got shape {tuple(bias.shape)}")
    return w2


def _plain_eager_cpu(*tensors) -> bool:
    """Whether inference on (x, weight_first, weight_second, bias) may call the implementation directly instead of through the custom op: eager
    mode, plain CPU tensors, no dispatch or torch-function mode, no profiler. The op's dispatch costs about
    7 us a call, as much as the whole kernel of a small layer (a 14x14 DenseNet conv at rank 4 takes 60 us);
    torch.compile, meta and fake tensors, subclasses and modes (FlopCounterMode, ...) and the profiler
    (which should show the op by name) still get the op."""
    return (
        tensors[0].is_cpu  # _check has put every operand on x's device
        and all(type(t) in _PLAIN_TYPES for t in tensors)
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and not torch._C._are_functorch_transforms_active()  # torch.func.grad, vmap: the ops
        and not torch.autograd._profiler_enabled()
    )


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, type(None))


def lowrank_conv2d(
    x: torch.Tensor,
    weight_first: torch.Tensor,
    weight_second: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
) -> torch.Tensor:
    """`conv2d(conv2d(x, weight_first, None, stride, padding, dilation), weight_second, bias)`, fused.

    Shapes: x [N, C, H, W] or [C, H, W]; weight_first [R, C, kh, kw]; weight_second [O, R] or
    [O, R, 1, 1]; bias [O] or None. Same dtype (float32, float16, bfloat16, or float64 for the reference
    math) and device for all. float32 accumulation, one rounding to x's dtype. Differentiable in every tensor.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    w2 = _check(x, weight_first, weight_second, bias)
    kernel = (weight_first.shape[2], weight_first.shape[3])
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    padding = resolve_padding(padding, kernel, stride, dilation)
    n, o, ho, wo = _out_shape(x, weight_first, w2, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"the input {tuple(x.shape[2:])} (padded by {padding}) is smaller than the dilated kernel "
            f"{tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))}"
        )
    args = (x, weight_first, w2, bias, list(stride), list(padding), list(dilation))
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight_first, w2, bias)
    )
    plain = _plain_eager_cpu(x, weight_first, w2, bias)
    if wants_grad and plain:
        y = _EagerTraining.apply(*args)
    elif wants_grad and x.is_cpu and torch._C._are_functorch_transforms_active():
        y = _FunctorchTraining.apply(*args)[0]
    elif wants_grad:
        y = torch.ops.pyquant.lowrank_conv2d_train(*args)[0]
    elif plain:
        y = _forward(*args, False)[0]
    else:
        y = torch.ops.pyquant.lowrank_conv2d(*args)
    return y.squeeze(0) if unbatched else y


# ---- eager CPU inference of a layer, checked once ----
class EagerPlan:
    """One layer's eager CPU inference call of the kernel, checked once: `LowRankConv2d.forward` keeps one.

    `lowrank_conv2d` checks every operand, resolves the arguments and picks the implementation on every call,
    10-15 us of Python, as much as a small layer's whole kernel (a 14x14 DenseNet conv at rank 4 computes in
    40 us with two threads). The plan records what those checks saw (the input's shape and dtype; the weights'
    shapes, dtypes, contiguity and addresses) and the kernel's arguments; while they still hold, `eager_inference`
    calls the kernel directly. It also owns the buffer of the weights in the kernel's packed float32 layout; with
    the layer's opt-in `cache_packed_weights` they are repacked only when a weight's version counter has moved
    (an in-place change: an optimizer step, `load_state_dict`, `copy_`), which misses writes that bypass the
    counter (through `.data`, numpy or DLPack views): hence opt-in. It keeps the weights' storage alive
    (detached views), so that their addresses cannot be reused by other tensors while it compares them.
    """

    __slots__ = ("code", "dims", "held", "key", "out_shape", "packed", "ptrs", "versions")

    def __init__(self, key, x, w1, w2, bias, stride, padding, dilation):
        self.key = key
        self.out_shape = _out_shape(x, w1, w2, stride, padding, dilation)
        r, c, kh, kw = w1.shape
        self.dims = (ctypes.c_int64 * 16)(
            x.shape[0], c, x.shape[2], x.shape[3], r, w2.shape[0], kh, kw, *stride, *padding, *dilation,
            *self.out_shape[2:],
        )
        self.code = _DTYPE_CODES[x.dtype]
        self.held = tuple(None if t is None else t.detach() for t in (w1, w2, bias))
        self.ptrs = tuple(None if t is None else t.data_ptr() for t in self.held)
        size = _native.cpu_library().pq_lowrank_packed_floats(self.code, self.dims)
        if size < 0:
            raise RuntimeError(f"pyquant lowrank_conv2d: the CPU kernel rejected the dims {tuple(self.dims)}")
        self.packed = torch.empty(size, dtype=torch.float32)
        self.versions = None  # nothing packed yet


def _weight_key(t):
    # what the kernel's arguments depend on; the address last (the checks before it make it meaningful)
    return None if t is None else (type(t), t.shape, t.dtype, t.is_cpu, t.is_contiguous(), t.data_ptr())


def eager_inference(plan, x, w1, w2, bias, stride, padding, dilation, reuse_packed: bool = False):
    """`lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation)` for eager CPU inference through `plan`
    (an EagerPlan or None): returns (y, plan), the plan rebuilt when the input's shape, the weights' tensors or
    the geometry changed. The weights are packed on every call unless ``reuse_packed`` (the layer's opt-in
    `cache_packed_weights`): then only when a weight's version counter moved; (None, plan) when the general path must run (gradients wanted, modes, the profiler,
    torch.compile, another backend, a dtype, device or layout the kernel does not take)."""
    if (
        torch.compiler.is_compiling()
        or type(x) is not torch.Tensor
        or (
            torch.is_grad_enabled()
            and (x.requires_grad or w1.requires_grad or w2.requires_grad or (bias is not None and bias.requires_grad))
        )
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or _torch_profiler._is_profiler_enabled
    ):
        return None, plan
    # every input of the plan's checks and arguments, the geometry too: a layer's stride, padding and dilation
    # are plain attributes that may change between calls (nn.Conv2d honours that)
    key = (x.shape, x.dtype, x.is_cpu, x.is_contiguous(), _weight_key(w1), _weight_key(w2), _weight_key(bias),
           stride, padding, dilation)
    if plan is None or plan.key != key:
        plan = None
        if (
            x.dim() != 4
            or not all(t is None or type(t) in _PLAIN_TYPES for t in (w1, w2, bias))
            or not (key[2] and key[3] and key[4][4] and key[5][4] and (bias is None or key[6][4]))
            or x.dtype not in _DTYPE_CODES
            or backends.select("cpu") != "cpu"
            or _cpu_fn() is None
        ):
            return None, None
        w2_2d = _check(x, w1, w2, bias)  # a bad operand raises here, as on the general path
        stride, dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
        padding = resolve_padding(padding, (w1.shape[2], w1.shape[3]), stride, dilation)
        _, _, ho, wo = _out_shape(x, w1, w2_2d, stride, padding, dilation)
        if ho < 1 or wo < 1 or x.shape[0] == 0:
            return None, None  # the general path raises (or returns the empty result)
        plan = EagerPlan(key, x, w1, w2_2d, bias, stride, padding, dilation)
    elif backends.forced_backend() not in (None, "cpu"):
        return None, plan
    versions = (w1._version, w2._version, None if bias is None else bias._version)
    y = torch.empty(plan.out_shape, dtype=x.dtype)
    with kernel_range(OP):
        rc = _cpu_fn()(
            x.data_ptr(), *plan.ptrs, y.data_ptr(), None, plan.code, plan.dims, torch.get_num_threads(),
            plan.packed.data_ptr(), reuse_packed and versions == plan.versions,
        )
    if rc == 1:
        raise MemoryError("pyquant lowrank_conv2d: the CPU kernel could not allocate its buffers")
    if rc != 0:
        raise RuntimeError(f"pyquant lowrank_conv2d: the CPU kernel rejected its arguments (code {rc})")
    plan.versions = versions
    return y, plan
