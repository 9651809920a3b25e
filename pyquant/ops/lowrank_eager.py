"""Eager CPU inference of a low-rank convolution layer, checked once (`pyquant.nn.LowRankConv2d.forward`).

`lowrank_conv2d` checks every operand, resolves the arguments and picks the implementation on every call, tens
of microseconds of Python, as much as a small layer's whole kernel (docs/compress.md). An `EagerPlan` records
what those checks saw and the kernel's arguments; while they still hold, `eager_inference` calls the cpu
backend's kernel directly (pyquant.backends.cpu.conv), with the weights in the kernel's packed layout.
"""

from __future__ import annotations

import torch
import torch.autograd.profiler as torch_profiler

from pyquant import backends
from pyquant._contract import DTYPE_CODES, FLOAT_DTYPES
from pyquant._nvtx import kernel_range
from pyquant._shapes import lowrank_shape
from pyquant.backends.capi import cpu_library
from pyquant.backends.cpu import conv as cpu_conv
from pyquant.ops.lowrank_conv import PLAIN_TYPES, check_operands, int_pair, resolve_padding

__all__ = ["EagerPlan", "eager_inference"]

OP = "lowrank_conv2d"


class EagerPlan:
    """One layer's eager CPU inference call of the kernel, checked once: `LowRankConv2d.forward` keeps one.

    The plan records what those checks saw (the input's shape and dtype; the weights'
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
        self.out_shape = lowrank_shape(x, w1, w2, stride, padding, dilation)
        r, c, kh, kw = w1.shape
        self.dims = cpu_conv.dims_array(x.shape[0], c, x.shape[2], x.shape[3], r, w2.shape[0], (kh, kw), stride,
                                        padding, dilation, *self.out_shape[2:])
        self.code = DTYPE_CODES[x.dtype]
        self.held = tuple(None if t is None else t.detach() for t in (w1, w2, bias))
        self.ptrs = tuple(None if t is None else t.data_ptr() for t in self.held)
        self.packed = torch.empty(cpu_conv.packed_floats(x.dtype, self.dims), dtype=torch.float32)
        self.versions = None  # nothing packed yet


def _weight_key(t):
    # what the kernel's arguments depend on; the address last (the checks before it make it meaningful)
    return None if t is None else (type(t), t.shape, t.dtype, t.is_cpu, t.is_contiguous(), t.data_ptr())


def eager_inference(plan, x, w1, w2, bias, stride, padding, dilation, reuse_packed: bool = False):
    """`lowrank_conv2d(x, w1, w2, bias, stride, padding, dilation)` for eager CPU inference through `plan`
    (an EagerPlan or None): returns (y, plan), the plan rebuilt when the input's shape, the weights' tensors or
    the geometry changed. The weights are packed on every call unless ``reuse_packed`` (the layer's opt-in
    `cache_packed_weights`): then only when a weight's version counter moved; (None, plan) when the general path
    must run (gradients wanted, modes, the profiler, torch.compile, another backend, a dtype, device or layout
    the kernel does not take)."""
    if (
        torch.compiler.is_compiling()
        or type(x) is not torch.Tensor
        or (
            torch.is_grad_enabled()
            and (x.requires_grad or w1.requires_grad or w2.requires_grad or (bias is not None and bias.requires_grad))
        )
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch_profiler._is_profiler_enabled
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
            or not all(t is None or type(t) in PLAIN_TYPES for t in (w1, w2, bias))
            or not (key[2] and key[3] and key[4][4] and key[5][4] and (bias is None or key[6][4]))
            or x.dtype not in FLOAT_DTYPES
            or backends.select("cpu") != "cpu"
            or cpu_library() is None
        ):
            return None, None
        w2_2d = check_operands(x, w1, w2, bias)  # a bad operand raises here, as on the general path
        stride, dilation = int_pair(stride, "stride", 1), int_pair(dilation, "dilation", 1)
        padding = resolve_padding(padding, (w1.shape[2], w1.shape[3]), stride, dilation)
        _, _, ho, wo = lowrank_shape(x, w1, w2_2d, stride, padding, dilation)
        if ho < 1 or wo < 1 or x.shape[0] == 0:
            return None, None  # the general path raises (or returns the empty result)
        plan = EagerPlan(key, x, w1, w2_2d, bias, stride, padding, dilation)
    elif backends.forced_backend() not in (None, "cpu"):
        return None, plan
    versions = (w1._version, w2._version, None if bias is None else bias._version)
    y = torch.empty(plan.out_shape, dtype=x.dtype)
    with kernel_range(OP):
        cpu_conv.lowrank_conv2d_packed(x, plan.ptrs, y, plan.code, plan.dims, plan.packed,
                                       reuse_packed and versions == plan.versions)
    plan.versions = versions
    return y, plan
