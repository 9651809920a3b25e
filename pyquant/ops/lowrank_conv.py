"""Fused low-rank convolution: a k x k convolution into `rank` channels followed by a 1 x 1 convolution.

`pyquant.ops.lowrank_conv2d(x, weight_first, weight_second, bias=None, stride=1, padding=0, dilation=1)` is

    F.conv2d(F.conv2d(x, weight_first, None, stride, padding, dilation), weight_second, bias)

for NCHW `x` [N, C, H, W] (or unbatched [C, H, W]), `weight_first` [R, C, kh, kw], `weight_second` [O, R] or
[O, R, 1, 1] and `bias` [O], all float32, float16 or bfloat16 (float64 runs the reference math). Products
are accumulated in float32 and rounded once to the output dtype: the intermediate [N, R, Ho, Wo] is never
rounded (nor, on the cpu and triton backends, written to memory at inference).

This module checks and resolves the arguments and picks the path; the pieces live elsewhere:

- the ops (pyquant._ops): ``pyquant::lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation) -> y``
  (inference, and what `torch.ops.pyquant.lowrank_conv2d` users get; its backward recomputes the
  intermediate) and ``pyquant::lowrank_conv2d_train(...) -> (y, t)`` (the same kernel also writes the
  intermediate `t`, what the unfused pair keeps for backward anyway; used when a gradient is needed), with fake
  kernels and autograd; the backward's CPU kernels are ops too (``pyquant::conv2d_weight_grad``,
  ``pyquant::conv2d_stride1``) for torch.compile;
- the kernels: pyquant/backends/{reference,cpu,triton,cuda}/conv.py (the cuda backend runs the Triton kernel);
- the backward (pyquant._autograd): the unfused pair's math from the intermediate, each product on pyquant's
  CPU kernels where the rules of pyquant.backends.cpu.conv say they beat oneDNN's, else torch's convolution
  backward; float16 is widened to float32 for backward (torch's float16 kernels are slow on CPUs), bfloat16 and
  float32 run as they are. docs/compress.md ("Backward") has the rules, their measurements and the tolerances;
- eager CPU inference of a layer checked once: pyquant.ops.lowrank_eager.

Eager paths skip the custom ops' dispatch for plain eager tensors: inference calls the kernel directly, training
goes through `pyquant._autograd.EagerTraining`, which calls the backward's kernels directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from pyquant import _ops
from pyquant._autograd import EagerTraining, FunctorchTraining, lowrank_forward
from pyquant._shapes import conv_output_size, lowrank_shape

__all__ = ["lowrank_conv2d", "conv_output_size", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def int_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each at least `minimum`, as a pair of ints (stride, padding, dilation, kernel)."""
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
    return int_pair(padding, "padding", 0)


def check_operands(x, w1, w2, bias):
    """Raise unless the operands fit (types, dtypes, devices, shapes); returns weight_second as [O, R]."""
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


def plain_eager_cpu(*tensors) -> bool:
    """Whether inference on (x, weight_first, weight_second, bias) may call the implementation directly instead
    of through the custom op: eager mode, plain CPU tensors, no dispatch or torch-function mode, no profiler. The
    op's dispatch costs microseconds a call, a sizeable part of a small layer's kernel (docs/compress.md);
    torch.compile, meta and fake tensors, subclasses and modes (FlopCounterMode, ...) and the profiler
    (which should show the op by name) still get the op."""
    return (
        tensors[0].is_cpu  # check_operands has put every operand on x's device
        and all(type(t) in PLAIN_TYPES for t in tensors)
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and not torch._C._are_functorch_transforms_active()  # torch.func.grad, vmap: the ops
        and not torch.autograd._profiler_enabled()
    )


PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, type(None))


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
    w2 = check_operands(x, weight_first, weight_second, bias)
    kernel = (weight_first.shape[2], weight_first.shape[3])
    stride = int_pair(stride, "stride", 1)
    dilation = int_pair(dilation, "dilation", 1)
    padding = resolve_padding(padding, kernel, stride, dilation)
    n, o, ho, wo = lowrank_shape(x, weight_first, w2, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"the input {tuple(x.shape[2:])} (padded by {padding}) is smaller than the dilated kernel "
            f"{tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))}"
        )
    args = (x, weight_first, w2, bias, list(stride), list(padding), list(dilation))
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight_first, w2, bias)
    )
    plain = plain_eager_cpu(x, weight_first, w2, bias)
    if wants_grad and plain:
        y = EagerTraining.apply(*args)
    elif wants_grad and x.is_cpu and torch._C._are_functorch_transforms_active():
        y = FunctorchTraining.apply(*args)[0]
    elif wants_grad:
        y = _ops.lowrank_conv2d_train(*args)[0]
    elif plain:
        y = lowrank_forward(*args, False)[0]
    else:
        y = _ops.lowrank_conv2d(*args)
    return y.squeeze(0) if unbatched else y
