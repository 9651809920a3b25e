"""The C++ CPU library's convolution kernels (csrc/cpu/lowrank_conv_forward.cpp and lowrank_conv_weight_grad.cpp)
and the rules for when they beat torch's.

- pyquant::lowrank_conv2d: per output tile, the rank channels and their 1 x 1 projection from registers and an
  L1/L2-resident tile buffer (AVX-512 micro-kernel, OpenMP over (image, tile), the same bits for any thread
  count); float64 runs the reference;
- pyquant::conv2d_stride1: the same kernel's first stage alone (a stride-1 convolution without bias);
- pyquant::conv2d_weight_grad: the weight gradient of a convolution in float32, one fixed order of sums per
  element whatever the thread count.

The backward of the low-rank convolution (pyquant._autograd) uses the last two, and the forward kernel, where
the rules below say they beat oneDNN's (few channels on one side, where oneDNN's blocks of 16 channels idle);
docs/compress.md ("Backward") has the measurements behind them.
"""

from __future__ import annotations

import ctypes

import torch

from pyquant._contract import DTYPE_CODES, FLOAT_DTYPES
from pyquant._shapes import conv_output_size, lowrank_shape
from pyquant.backends import forced_backend, kernel
from pyquant.backends.capi import check_status, cpu_library
from pyquant.backends.reference import conv as reference

OP = "lowrank_conv2d"


def dims_array(n, c, h, w, r, o, kernel_size, stride, padding, dilation, ho, wo) -> ctypes.Array:
    """The kernels' `dims`: N, C, H, W, R, O, kh, kw, stride, padding, dilation (h, w each), Ho, Wo."""
    return (ctypes.c_int64 * 16)(n, c, h, w, r, o, *kernel_size, *stride, *padding, *dilation, ho, wo)


@kernel(OP, "cpu")
def lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation, keep: bool):
    """(y, t or an empty tensor) for NCHW x, w1 [R, C, kh, kw], w2 [O, R], bias [O] or None; t only when
    `keep`. float32 / float16 / bfloat16 (other dtypes: the reference)."""
    if x.dtype not in FLOAT_DTYPES:
        return reference.lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation, keep)
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    bias = None if bias is None else bias.contiguous()
    n, o, ho, wo = lowrank_shape(x, w1, w2, stride, padding, dilation)
    r, c, kh, kw = w1.shape
    y = torch.empty((n, o, ho, wo), dtype=x.dtype)
    t = torch.empty((n, r, ho, wo), dtype=x.dtype) if keep else x.new_empty(0)
    if y.numel() == 0:
        return y, t
    dims = dims_array(n, c, x.shape[2], x.shape[3], r, o, (kh, kw), stride, padding, dilation, ho, wo)
    status = cpu_library().pq_lowrank_conv2d(
        x.data_ptr(), w1.data_ptr(), w2.data_ptr(), None if bias is None else bias.data_ptr(),
        y.data_ptr(), t.data_ptr() if keep else None, DTYPE_CODES[x.dtype], dims, torch.get_num_threads(), None, 0,
    )
    check_status(status, OP)
    return y, t


# ---- eager inference with the weights packed by an earlier call (pyquant.ops.lowrank_eager) ----
def packed_floats(dtype: torch.dtype, dims: ctypes.Array) -> int:
    """Floats of the kernel's packed-weights buffer for these dims (ValueError for dims it refuses)."""
    size = cpu_library().pq_lowrank_packed_floats(DTYPE_CODES[dtype], dims)
    if size < 0:
        raise ValueError(f"pyquant {OP}: the CPU kernel rejected the dims {tuple(dims)}")
    return size


def lowrank_conv2d_packed(x, pointers, y, dtype_code: int, dims, packed: torch.Tensor, packed_valid: bool) -> None:
    """The forward kernel into `y` for operands already checked (pointers: w1, w2, bias or None), with the
    weights in `packed` (packed_valid: it holds these weights already)."""
    status = cpu_library().pq_lowrank_conv2d(
        x.data_ptr(), *pointers, y.data_ptr(), None, dtype_code, dims, torch.get_num_threads(),
        packed.data_ptr(), packed_valid,
    )
    check_status(status, OP)


# ---- the backward's kernels ----
def stride1_conv(x, w, padding, dilation):
    """A stride-1 convolution (no bias) on the forward kernel's first stage alone, or None when it cannot run
    (dtype, device)."""
    if x.dtype not in FLOAT_DTYPES or x.device.type != "cpu":
        return None
    x, w = x.contiguous(), w.contiguous()
    n, c, h, wd = x.shape
    r, _, kh, kw = w.shape
    ho = conv_output_size(h, kh, 1, padding[0], dilation[0])
    wo = conv_output_size(wd, kw, 1, padding[1], dilation[1])
    y = torch.empty((n, r, ho, wo), dtype=x.dtype)
    if y.numel() == 0:
        return y
    dims = dims_array(n, c, h, wd, r, r, (kh, kw), (1, 1), padding, dilation, ho, wo)
    status = cpu_library().pq_lowrank_conv2d(
        x.data_ptr(), w.data_ptr(), None, None, y.data_ptr(), None, DTYPE_CODES[x.dtype], dims,
        torch.get_num_threads(), None, 0,
    )
    check_status(status, "conv2d_stride1")
    return y


def weight_grad(x, grad, kernel_size, stride, padding, dilation):
    """The weight gradient [R, C, kh, kw] (float32) of y = conv2d(x, W, None, stride, padding, dilation) for y's
    gradient `grad` [N, R, Ho, Wo]: float32 accumulation, one fixed order of sums per element whatever the thread
    count. None when it cannot run (dtype, device)."""
    if x.dtype not in FLOAT_DTYPES or grad.dtype != x.dtype or x.device.type != "cpu":
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
    dims = dims_array(n, c, h, w, r, r, (kh, kw), stride, padding, dilation, ho, wo)
    status = cpu_library().pq_lowrank_conv2d_wgrad(
        x.data_ptr(), grad.data_ptr(), gw.data_ptr(), DTYPE_CODES[x.dtype], dims, torch.get_num_threads()
    )
    check_status(status, "conv2d_weight_grad")
    return gw


@kernel("conv2d_weight_grad", "cpu")
def conv2d_weight_grad(x, grad, weight_size, stride, padding, dilation):
    if len(weight_size) != 4 or tuple(weight_size[:2]) != (grad.shape[1], x.shape[1]):
        raise ValueError(
            f"weight_size {tuple(weight_size)} does not match grad {tuple(grad.shape)} and x {tuple(x.shape)}"
        )
    gw = weight_grad(x, grad, tuple(weight_size[2:]), list(stride), list(padding), list(dilation))
    if gw is None:
        raise RuntimeError("pyquant::conv2d_weight_grad: the CPU kernel cannot run here (device, dtype)")
    return gw


@kernel("conv2d_stride1", "cpu")
def conv2d_stride1(x, w, padding, dilation):
    y = stride1_conv(x, w, list(padding), list(dilation))
    if y is None:
        raise RuntimeError("pyquant::conv2d_stride1: the CPU kernel cannot run here (device, dtype)")
    return y


# ---- when the backward uses these kernels rather than torch's (oneDNN) ----
def kernel_runs(x) -> bool:
    """Whether the backward may use the CPU kernels for x (a CPU tensor, fake ones included, of a kernel dtype,
    the cpu backend selected, the library loaded)."""
    forced = forced_backend()  # backends.select("cpu") without its cost (6 us), which counts here
    return (
        x.device.type == "cpu"
        and x.dtype in FLOAT_DTYPES
        and forced in (None, "cpu")
        and cpu_library() is not None
        and not torch._C._are_functorch_transforms_active()  # torch.func.grad's wrapped tensors have no data
    )


def weight_grad_pays(out_channels: int, in_channels: int, taps: int) -> bool:
    """Whether the weight-gradient kernel beats oneDNN's for a convolution with these channels and kernel taps.
    oneDNN vectorises over channels in blocks of 16 and wastes lanes at few channels; pyquant's kernel
    vectorises over pixels. The rule (measurements: docs/compress.md, "Backward"; bench/compare_lowrank.py):
    always at most 8 output channels; for a 1 x 1 convolution, when one channel count is at most 16, or at most
    56 with the other at most 672; otherwise oneDNN."""
    if out_channels <= 8:
        return True
    fewest, most = min(out_channels, in_channels), max(out_channels, in_channels)
    return taps == 1 and (fewest <= 16 or (fewest <= 56 and most <= 672))


def input_grad_pays(rank: int) -> bool:
    """Whether the stride-1 kernel beats oneDNN for the input gradient of a k x k factor into `rank` channels:
    oneDNN pads fewer than 16 input channels to 16 and is slow there (several times slower at ranks 4-8); from
    16 on its blocking fits (docs/compress.md). Its combined input and weight gradient call costs the sum of the
    two, so nothing is lost by splitting them."""
    return rank <= 16


def rank_grad_pays(rank: int) -> bool:
    """Whether the forward kernel beats oneDNN for g_t = W2^T g_y (a 1 x 1 convolution into the rank channels):
    oneDNN's data gradient into few channels is slow (it pads them to multiples of 16), up to 64 rank channels
    (docs/compress.md)."""
    return rank <= 64
