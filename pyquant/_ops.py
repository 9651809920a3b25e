"""Every op of pyquant, declared once: its `torch.library` schema (namespace `pyquant`), its fake kernel (so that
torch.compile, meta and fake tensors work) and, where it has one, its autograd formula.

An op's body only picks the kernel: `pyquant.backends.implementation(name, device type)` returns the function that
the selected backend registered with `@kernel(name, backend)`, and the call sits in an NVTX range named
`pyquant::<name>`. Front-ends (pyquant.functional, pyquant.amp, pyquant.ops, pyquant.optim) check the user's
arguments and call these ops, or `call_eagerly` for the eager fast path. docs/architecture.md shows how to add one.
Backward formulas longer than a few lines are in pyquant._autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pyquant import _autograd, backends
from pyquant._nvtx import kernel_range
from pyquant._shapes import conv_output_size, im2col_shape, lowrank_shape, matmul_shape

Tensor, Tensors, Ints = torch.Tensor, list[torch.Tensor], Sequence[int]  # short names for the signatures below


def run_kernel(name: str, device_type: str, *args):
    """The selected backend's kernel for op `name`, inside the op's NVTX range."""
    with kernel_range(name):
        return backends.implementation(name, device_type)(*args)


def call_eagerly(op, name: str, first: torch.Tensor, args: tuple, written: list[torch.Tensor] = ()):
    """`op(*args)`, or, for a plain tensor outside torch.compile and dispatch modes (backends.runs_eagerly says
    why), the kernel directly followed by the version bumps that the op's `mutates_args` would give `written`."""
    if not backends.runs_eagerly(first):
        return op(*args)
    out = run_kernel(name, first.device.type, *args)
    if written:
        torch.autograd.graph.increment_version(list(written))
    return out


# ---- block-wise quantisation (docs/numerics.md section 2) ----
@torch.library.custom_op("pyquant::quantize_blockwise", mutates_args=())
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return run_kernel("quantize_blockwise", x.device.type, x, code, blocksize)


@quantize_blockwise.register_fake
def _(x, code, blocksize):
    blocks = -(-x.numel() // blocksize)
    return torch.empty_like(x, dtype=torch.uint8), x.new_empty((blocks,), dtype=torch.float32)


@torch.library.custom_op("pyquant::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    return run_kernel("dequantize_blockwise", q.device.type, q, absmax, code, blocksize, dtype)


@dequantize_blockwise.register_fake
def _(q, absmax, code, blocksize, dtype):
    return torch.empty_like(q, dtype=dtype)


# ---- the fused multi-tensor optimizer step (docs/numerics.md section 4) ----
@torch.library.custom_op("pyquant::adam_step_", mutates_args=("params", "state1", "state2", "absmax1", "absmax2"))
def adam_step_(
    params: Tensors, grads: Tensors, state1: Tensors, state2: Tensors, absmax1: Tensors, absmax2: Tensors,
    constants: Tensor, code1: Tensor, code2: Tensor, nonfinite: int,
) -> Tensor:
    """Returns the number of non-finite gradient elements skipped (0-dim int64)."""
    return run_kernel("adam_step", params[0].device.type,
                      params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)


@adam_step_.register_fake
def _(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    return params[0].new_empty((), dtype=torch.int64)


@torch.library.custom_op("pyquant::one_state_step_", mutates_args=("params", "state1", "absmax1"))
def one_state_step_(
    params: Tensors, grads: Tensors, state1: Tensors, absmax1: Tensors, constants: Tensor, code1: Tensor, rule: int,
    nonfinite: int,
) -> Tensor:
    """The fused step of the optimizers with one state (docs/numerics.md section 5): `rule` is a code of
    _contract.ONE_STATE_RULES (momentum, Lion, RMSprop, Adagrad), `constants` one row of ONE_STATE_FIELDS per
    tensor. One op with a rule code rather than one op per rule: the four share their operands, state layout,
    checks, C entry point and block driver, and differ only in a few lines of per-element math.
    Returns the number of non-finite gradient elements skipped (0-dim int64)."""
    return run_kernel("one_state_step", params[0].device.type,
                      params, grads, state1, absmax1, constants, code1, rule, nonfinite)


@one_state_step_.register_fake
def _(params, grads, state1, absmax1, constants, code1, rule, nonfinite):
    return params[0].new_empty((), dtype=torch.int64)


@torch.library.custom_op(
    "pyquant::ademamix_step_", mutates_args=("params", "state1", "state2", "absmax1", "absmax2")
)
def ademamix_step_(
    params: Tensors, grads: Tensors, state1: Tensors, state2: Tensors, absmax1: Tensors, absmax2: Tensors,
    constants: Tensor, code1: Tensor, code2: Tensor, nonfinite: int,
) -> Tensor:
    """The fused AdEMAMix step (docs/numerics.md, "AdEMAMix"): `state1` holds the fast and slow EMAs stacked
    (shape (2, *param.shape)), `absmax1` their block scales (2, blocks) for 8-bit states, `state2` the second
    moment; `constants` one row of ADEMAMIX_FIELDS per tensor. Returns the number of non-finite gradient
    elements skipped (0-dim int64)."""
    return run_kernel("ademamix_step", params[0].device.type,
                      params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)


@ademamix_step_.register_fake
def _(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    return params[0].new_empty((), dtype=torch.int64)


@torch.library.custom_op(
    "pyquant::adam4bit_step_", mutates_args=("params", "state1", "state2", "absmax1", "absmax2")
)
def adam4bit_step_(
    params: Tensors, grads: Tensors, state1: Tensors, state2: Tensors, absmax1: Tensors, absmax2: Tensors,
    constants: Tensor, code1: Tensor, code2: Tensor, rank1: list[bool], nonfinite: int,
) -> Tensor:
    """The fused Adam step with 4-bit states (docs/numerics.md, "4-bit states"): state1/state2 hold two codes a
    byte (ceil(n / 2) uint8) or float32 moments (tensors below min_4bit_size); absmax1 the first moment's scales
    per block of 128, absmax2 the second moment's (rank1[i]: the per-dimension maxima, sum(shape) floats; else
    per block of 128). `constants` one row of CONSTANT_FIELDS per tensor (Adam's). Returns the number of
    non-finite gradient elements skipped (0-dim int64)."""
    return run_kernel("adam4bit_step", params[0].device.type,
                      params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite)


@adam4bit_step_.register_fake
def _(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite):
    return params[0].new_empty((), dtype=torch.int64)


# ---- the trust ratios of LAMB and LARS (docs/numerics.md, "LAMB and LARS"): their norm passes ----
@torch.library.custom_op("pyquant::lamb_norms", mutates_args=())
def lamb_norms(
    params: Tensors, grads: Tensors, state1: Tensors, state2: Tensors, absmax1: Tensors, absmax2: Tensors,
    constants: Tensor, code1: Tensor, code2: Tensor, nonfinite: int,
) -> Tensor:
    """LAMB's norm pass over adam_step_'s operands (nothing is written): float64 (len(params), 2), per tensor the
    sum of p^2 and the sum of r^2, r = m/c1 / (sqrt(v)/c2 + eps) + wd*p from the moments the step will compute.
    Summed pairwise per block of 256, then pairwise over the blocks: the same bits for any thread count."""
    return run_kernel("lamb_norms", params[0].device.type,
                      params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)


@lamb_norms.register_fake
def _(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    return params[0].new_empty((len(params), 2), dtype=torch.float64)


@torch.library.custom_op("pyquant::lars_norms", mutates_args=())
def lars_norms(params: Tensors, grads: Tensors, constants: Tensor, nonfinite: int) -> Tensor:
    """LARS' norm pass, as lamb_norms: per tensor the sum of p^2 and of d^2, d = g + wd*p as the momentum rule of
    one_state_step_ forms it (`constants`: its rows)."""
    return run_kernel("lars_norms", params[0].device.type, params, grads, constants, nonfinite)


@lars_norms.register_fake
def _(params, grads, constants, nonfinite):
    return params[0].new_empty((len(params), 2), dtype=torch.float64)


# ---- GradScaler's unscale-and-check (reference/techniques.md C2) ----
@torch.library.custom_op("pyquant::unscale_", mutates_args=("grads", "found_inf"))
def unscale_(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    run_kernel("unscale_", found_inf.device.type, grads, found_inf, inv_scale)


@unscale_.register_fake
def _(grads, found_inf, inv_scale):
    return None


# ---- half-precision products (docs/low_precision.md) ----
@torch.library.custom_op("pyquant::matmul", mutates_args=())
def matmul(
    a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], bias_dim: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """a @ b (torch.matmul's batch broadcasting, operands of at least 2 dimensions) accumulated in float32 from
    `bias` (one value per column for bias_dim -1, per row for -2; None: 0), rounded once to out_dtype."""
    return run_kernel("matmul", a.device.type, a, b, bias, bias_dim, out_dtype)


@matmul.register_fake
def _(a, b, bias, bias_dim, out_dtype):
    batch, m, n, _ = matmul_shape(a, b, fast=False)
    return a.new_empty(batch + (m, n), dtype=out_dtype)


torch.library.register_autograd(
    "pyquant::matmul", _autograd.matmul_backward, setup_context=_autograd.matmul_setup_context
)


@torch.library.custom_op("pyquant::im2col_matmul", mutates_args=())
def im2col_matmul(
    x: torch.Tensor,
    other: torch.Tensor,
    bias: Optional[torch.Tensor],
    bias_dim: int,
    geometry: list[int],
    columns_first: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """columns(x) @ other (columns_first) or other @ columns(x) for the channels-last im2col of x (N, H, W, C)
    with geometry (kh, kw, sh, sw, ph, pw, dh, dw), matmul's numerics. Not differentiable itself: Conv2d16
    states its backward as products (pyquant.nn.half_precision)."""
    return run_kernel("im2col_matmul", x.device.type, x, other, bias, bias_dim, tuple(geometry), columns_first,
                      out_dtype)


@im2col_matmul.register_fake
def _(x, other, bias, bias_dim, geometry, columns_first, out_dtype):
    return x.new_empty(im2col_shape(x, other, geometry, columns_first), dtype=out_dtype)


# ---- the fused low-rank convolution (docs/compress.md) ----
@torch.library.custom_op("pyquant::lowrank_conv2d", mutates_args=())
def lowrank_conv2d(
    x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], stride: Ints, padding: Ints, dilation: Ints
) -> Tensor:
    """conv2d(conv2d(x, w1, None, stride, padding, dilation), w2 [O, R] as 1 x 1, bias), float32 accumulation,
    one rounding. Inference: its backward recomputes the intermediate."""
    return _autograd.lowrank_forward(x, w1, w2, bias, stride, padding, dilation, False)[0]


@lowrank_conv2d.register_fake
def _(x, w1, w2, bias, stride, padding, dilation):
    return x.new_empty(lowrank_shape(x, w1, w2, stride, padding, dilation))


@torch.library.custom_op("pyquant::lowrank_conv2d_train", mutates_args=())
def lowrank_conv2d_train(
    x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], stride: Ints, padding: Ints, dilation: Ints
) -> tuple[Tensor, Tensor]:
    """(y, t): lowrank_conv2d that also writes the intermediate t [N, R, Ho, Wo] for the backward."""
    return _autograd.lowrank_forward(x, w1, w2, bias, stride, padding, dilation, True)


@lowrank_conv2d_train.register_fake
def _(x, w1, w2, bias, stride, padding, dilation):
    n, o, ho, wo = lowrank_shape(x, w1, w2, stride, padding, dilation)
    return x.new_empty((n, o, ho, wo)), x.new_empty((n, w1.shape[0], ho, wo))


torch.library.register_autograd(
    "pyquant::lowrank_conv2d", _autograd.lowrank_backward, setup_context=_autograd.lowrank_setup_context
)
torch.library.register_autograd(
    "pyquant::lowrank_conv2d_train", _autograd.lowrank_train_backward,
    setup_context=_autograd.lowrank_train_setup_context,
)


# The low-rank backward's kernels are ops too: torch.compile traces the backward with fake tensors, which have
# no data to hand a kernel.
@torch.library.custom_op("pyquant::conv2d_weight_grad", mutates_args=())
def conv2d_weight_grad(
    x: torch.Tensor,
    grad: torch.Tensor,
    weight_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """The float32 weight gradient (shape weight_size) of conv2d(x, W, None, stride, padding, dilation) for y's
    gradient `grad`."""
    return run_kernel("conv2d_weight_grad", x.device.type, x, grad, weight_size, stride, padding, dilation)


@conv2d_weight_grad.register_fake
def _(x, grad, weight_size, stride, padding, dilation):
    return x.new_empty(tuple(weight_size), dtype=torch.float32)


@torch.library.custom_op("pyquant::conv2d_stride1", mutates_args=())
def conv2d_stride1(x: torch.Tensor, w: torch.Tensor, padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """conv2d(x, w, None, 1, padding, dilation) in float32, rounded once to x's dtype."""
    return run_kernel("conv2d_stride1", x.device.type, x, w, padding, dilation)


@conv2d_stride1.register_fake
def _(x, w, padding, dilation):
    n, _, h, wd = x.shape
    r, _, kh, kw = w.shape
    return x.new_empty((n, r, conv_output_size(h, kh, 1, padding[0], dilation[0]),
                        conv_output_size(wd, kw, 1, padding[1], dilation[1])))
