"""Half-precision matrix multiply: float16 / bfloat16 operands, float32 accumulation, one rounding.

`pyquant.ops.matmul(a, b, out_dtype=None)` is `torch.matmul` for float16 and bfloat16 tensors (same
broadcasting of batch dimensions, 1-D operands, any strides) that accumulates in float32 and rounds once
to the output dtype (the inputs' dtype by default, float32 on request). On a CPU without native FP16
arithmetic torch's float16 matmul is two orders of magnitude slower than its float32 one; this one is
faster than torch's float32 (docs/low_precision.md has the numbers and the error bound).

It is the custom op `pyquant::matmul(a, b, bias, bias_dim, out_dtype)` (a fake kernel for meta tensors and
torch.compile; autograd through the same op; `bias`, optional, is added to the float32 accumulators: one
value per column for bias_dim -1, per row for -2) with three implementations picked by `pyquant.backends`:

- ``reference``: torch's float32 matmul of the widened operands, then one rounding (any device);
- ``cpu``: csrc/cpu/gemm.cpp (packing with F16C conversion, AVX-512 / AVX2 micro-kernels, OpenMP); every
  element is the sequential sum c = fma(a_ik, b_kj, c), k = 0..K-1, from c = bias (or 0), rounded once:
  the same bits for any thread count, blocking or instruction set;
- ``triton``: kernels/matmul.py (tl.dot with float32 accumulation).

`linear(x, weight, bias=None)` is `x @ weight.T + bias` with the bias added to the float32 accumulator
(one rounding in all), for `pyquant.nn.Linear16`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
from typing import Optional

import torch

from pyquant import _native, backends
from pyquant._nvtx import kernel_range

__all__ = ["matmul", "linear", "set_bf16_dot", "INPUT_DTYPES", "OUT_DTYPES"]

INPUT_DTYPES = (torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_bf16_dot = True


def set_bf16_dot(enabled: bool) -> bool:
    """Let (True, the default) or forbid the cpu backend to use the AVX512-BF16 dot product for bfloat16 x
    bfloat16 products on CPUs that have it; returns the previous setting. Forbidden, every element is the
    sequential float32 fma chain (the same bits as on a CPU without it); allowed, pairs of k are summed per
    instruction (docs/low_precision.md), about twice as fast."""
    global _bf16_dot
    previous, _bf16_dot = _bf16_dot, bool(enabled)
    return previous


def _bf16_dot_flags() -> int:
    """The flags argument of pq_matmul / pq_matmul_im2col for the current set_bf16_dot setting."""
    return int(_bf16_dot)


# ---- shapes ----
def _broadcast(x: tuple, y: tuple) -> tuple:
    """torch.broadcast_shapes for two concrete shapes, without its overhead (ValueError if they do not)."""
    if x == y:
        return tuple(x)
    n = max(len(x), len(y))
    x, y = (1,) * (n - len(x)) + tuple(x), (1,) * (n - len(y)) + tuple(y)
    out = []
    for p, q in zip(x, y):
        if p != q and p != 1 and q != 1:
            raise ValueError(f"batch dimensions {x} and {y} do not broadcast")
        out.append(q if p == 1 else p)
    return tuple(out)


def _out_shape(a: torch.Tensor, b: torch.Tensor, fast: bool = True) -> tuple[tuple[int, ...], int, int, int]:
    if fast:
        batch = _broadcast(a.shape[:-2], b.shape[:-2])
    else:  # symbolic shapes (the fake kernel under torch.compile)
        batch = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return batch, a.shape[-2], b.shape[-1], a.shape[-1]


def _collapse(sizes: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 batch dimensions and merge neighbours that are one dimension for every tensor."""
    dims = [(n, [s[i] for s in strides]) for i, n in enumerate(sizes) if n != 1]
    merged: list[tuple[int, list[int]]] = []
    for n, st in dims:
        if merged:
            n0, st0 = merged[-1]
            if all(outer == inner * n for outer, inner in zip(st0, st)):
                merged[-1] = (n0 * n, st)
                continue
        merged.append((n, st))
    return [n for n, _ in merged], [[st[t] for _, st in merged] for t in range(len(strides))]


def _bias_view(bias: torch.Tensor, bias_dim: int) -> torch.Tensor:
    return bias if bias_dim == -1 else bias.unsqueeze(-1)


# ---- implementations: (a, b, bias, bias_dim, out_dtype) -> out ----
def matmul_reference(a, b, bias: Optional[torch.Tensor], bias_dim: int, out_dtype: torch.dtype):
    """torch's float32 matmul of the widened operands (+ bias), rounded once to out_dtype."""
    out = torch.matmul(a.float(), b.float())
    if bias is not None:
        out = out + _bias_view(bias.float(), bias_dim)
    return out.to(out_dtype)


@functools.cache
def _cpu_fn():
    lib = _native.cpu_library()
    try:
        fn = lib.pq_matmul
    except AttributeError:
        raise RuntimeError(
            "pyquant's compiled CPU library predates pyquant.ops.matmul (no pq_matmul): rebuild it with "
            "`pip install -e .`, or use pyquant.use_backend('reference')"
        ) from None
    P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    fn.argtypes = [I32, P, P, I32, P, P, I32, P, P, I32, I64, I32, P, I32, P, I64, I64, I64, I32, I32]
    fn.restype = None
    return fn


def _int64_array(values) -> ctypes.Array:
    return (ctypes.c_int64 * max(len(values), 1))(*values)


def check_cpu_operands(tensors: dict, bias: Optional[torch.Tensor], bias_len: int) -> None:
    """What the C kernels read through raw pointers and their own strides: CPU tensors of a dtype they know,
    and a bias of the `bias_len` values the product adds (its length is not passed to them)."""
    for name, t in {**tensors, "bias": bias}.items():
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype not in _DTYPE_CODES:
            raise ValueError(f"the cpu kernel needs float32/float16/bfloat16 CPU tensors; {name} is {t.dtype} on {t.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != bias_len):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, the product adds {bias_len} values")


def matmul_cpu(a, b, bias: Optional[torch.Tensor], bias_dim: int, out_dtype: torch.dtype):
    """The C++ kernel (csrc/cpu/gemm.cpp): any strides, batch broadcasting by zero strides."""
    batch, m, n, k = _out_shape(a, b)
    if b.shape[-2] != k:
        raise ValueError(f"inner dimensions do not match: a is {tuple(a.shape)} and b is {tuple(b.shape)}")
    check_cpu_operands(dict(a=a, b=b), bias, m if bias_dim == -2 else n)
    out = torch.empty(batch + (m, n), dtype=out_dtype)
    if out.numel() == 0:
        return out
    a = a.expand(batch + (m, k))
    b = b.expand(batch + (k, n))
    nb = len(batch)
    batch_strides = [list(t.stride()[:nb]) for t in (a, b, out)]
    sizes, (sa, sb, sc) = _collapse(list(batch), batch_strides)
    ars, acs = a.stride()[-2:]
    brs, bcs = b.stride()[-2:]
    crs, ccs = out.stride()[-2:]
    # A batch dimension that B broadcasts over and that continues the rows of A and C is more rows
    # (not with a bias per row: it has m values).
    row_bias = bias is not None and bias_dim == -2
    while sizes and sb[-1] == 0 and sa[-1] == m * ars and sc[-1] == m * crs and not row_bias:
        m *= sizes.pop()
        sa.pop(), sb.pop(), sc.pop()
    _cpu_fn()(
        len(sizes), _int64_array(sizes),
        a.data_ptr(), _DTYPE_CODES[a.dtype], _int64_array(sa + [ars, acs]),
        b.data_ptr(), _DTYPE_CODES[b.dtype], _int64_array(sb + [brs, bcs]),
        None if bias is None else bias.data_ptr(), _DTYPE_CODES[bias.dtype] if bias is not None else 0,
        0 if bias is None else bias.stride(0), int(bias_dim == -2),
        out.data_ptr(), _DTYPE_CODES[out_dtype], _int64_array(sc + [crs, ccs]),
        m, n, k, torch.get_num_threads(), _bf16_dot_flags(),
    )
    return out


def matmul_triton(a, b, bias: Optional[torch.Tensor], bias_dim: int, out_dtype: torch.dtype):
    return importlib.import_module("pyquant.kernels.matmul").matmul(a, b, bias, bias_dim, out_dtype)


backends.register("matmul", "reference", matmul_reference)
backends.register("matmul", "cpu", matmul_cpu)
backends.register("matmul", "triton", matmul_triton)
# The CUDA library has no matmul: CUDA tensors use the Triton kernel.
backends.register("matmul", "cuda", matmul_triton)


# ---- the custom op ----
@torch.library.custom_op("pyquant::matmul", mutates_args=())
def _matmul_op(
    a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], bias_dim: int, out_dtype: torch.dtype
) -> torch.Tensor:
    with kernel_range("matmul"):
        return backends.implementation("matmul", a.device.type)(a, b, bias, bias_dim, out_dtype)


@_matmul_op.register_fake
def _(a, b, bias, bias_dim, out_dtype):
    batch, m, n, _ = _out_shape(a, b, fast=False)
    return a.new_empty(batch + (m, n), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    a, b, bias, bias_dim, out_dtype = inputs
    ctx.save_for_backward(a, b)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.bias_dim = bias_dim


def _reduce_to(grad32: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if grad32.shape != shape:
        grad32 = grad32.sum_to_size(shape)
    return grad32.to(dtype)


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = grad_b = grad_bias = None
    batch, m, n, k = _out_shape(a, b)
    if ctx.needs_input_grad[0]:
        # grad_a = grad @ b^T, summed over the batch dimensions a was broadcast along (in float32, one rounding)
        if grad.shape[:-2] == a.shape[:-2]:
            grad_a = _matmul_op(grad, b.mT, None, -1, a.dtype)
        else:
            grad_a = _reduce_to(_matmul_op(grad, b.mT, None, -1, torch.float32), a.shape, a.dtype)
    if ctx.needs_input_grad[1]:
        # grad_b = a^T @ grad; a 2-D b shared by the whole batch: one product over the stacked rows
        if b.dim() == 2 and len(batch) > 0:
            a_rows = a.expand(batch + (m, k)).reshape(-1, k)
            grad_b = _matmul_op(a_rows.mT, grad.reshape(-1, n), None, -1, b.dtype)
        elif grad.shape[:-2] == b.shape[:-2]:
            grad_b = _matmul_op(a.mT, grad, None, -1, b.dtype)
        else:
            grad_b = _reduce_to(_matmul_op(a.mT, grad, None, -1, torch.float32), b.shape, b.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        keep = grad.dim() + ctx.bias_dim
        grad_bias = grad.float().sum(dim=tuple(d for d in range(grad.dim()) if d != keep)).to(ctx.bias_dtype)
    return grad_a, grad_b, grad_bias, None, None


torch.library.register_autograd("pyquant::matmul", _backward, setup_context=_setup_context)


# ---- public API ----
def _check_operand(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{name} must be float16 or bfloat16, got {x.dtype} (use torch.matmul for other dtypes, or cast)"
        )
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")
    if x.is_complex() or x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor")


def _check_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {out_dtype!r}")
    return out_dtype


def matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`torch.matmul(a, b)` for float16 / bfloat16 `a` and `b` (same dtype, same device): products
    accumulated in float32, rounded once to `out_dtype` (default: the inputs' dtype; float32 skips the
    rounding). Batch dimensions broadcast; 1-D operands are treated as torch.matmul treats them.
    Differentiable in `a` and `b`.
    """
    _check_operand(a, "a")
    _check_operand(b, "b")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}; move them to the same device")
    out_dtype = _check_out_dtype(out_dtype, a.dtype)
    squeeze = []
    if a.dim() == 1:
        a = a.unsqueeze(0)
        squeeze.append(-2)
    if b.dim() == 1:
        b = b.unsqueeze(-1)
        squeeze.append(-1)
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"inner dimensions do not match: a is {tuple(a.shape)} (K={a.shape[-1]}) and b is {tuple(b.shape)} "
            f"(K={b.shape[-2]})"
        )
    try:
        _broadcast(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(
            f"batch dimensions {tuple(a.shape[:-2])} and {tuple(b.shape[:-2])} do not broadcast"
        ) from None
    out = _matmul_op(a, b, None, -1, out_dtype)
    for dim in sorted(squeeze):  # -2 before -1
        out = out.squeeze(dim)
    return out


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """`x @ weight.T + bias` (weight: out x in, as nn.Linear's) with the bias added to the float32
    accumulator: one rounding to `out_dtype` (default: x's dtype)."""
    _check_operand(x, "x")
    _check_operand(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features x in_features), got shape {tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must have the same dtype, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}; move them to the same device")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features but weight expects {weight.shape[1]} (shape {tuple(weight.shape)})"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in OUT_DTYPES or bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias must be a float tensor of shape ({weight.shape[0]},), got "
                f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}"
            )
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    out_dtype = _check_out_dtype(out_dtype, x.dtype)
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    out = _matmul_op(x, weight.t(), bias, -1, out_dtype)
    return out.squeeze(0) if squeeze else out

