"""Half-precision matrix multiply: float16 / bfloat16 operands, float32 accumulation, one rounding.

`pyquant.ops.matmul(a, b, out_dtype=None)` is `torch.matmul` for float16 and bfloat16 tensors (same
broadcasting of batch dimensions, 1-D operands, any strides) that accumulates in float32 and rounds once
to the output dtype (the inputs' dtype by default, float32 on request). On a CPU without native FP16
arithmetic torch's float16 matmul is orders of magnitude slower than its float32 one, and pyquant's is faster
than torch's float32 (docs/low_precision.md has the error bound; docs/bench and bench/test_matmul.py the numbers).

This module checks the arguments and calls the custom op `pyquant::matmul(a, b, bias, bias_dim, out_dtype)`
(pyquant._ops: a fake kernel for meta tensors and torch.compile; autograd through the same op; `bias`, optional,
is added to the float32 accumulators: one value per column for bias_dim -1, per row for -2). Its kernels, picked
by `pyquant.backends`:

- ``reference`` (pyquant/backends/reference/gemm.py): torch's float32 matmul of the widened operands, then one
  rounding (any device);
- ``cpu`` (pyquant/backends/cpu/gemm.py, csrc/cpu/gemm.cpp: packing with F16C conversion, AVX-512 / AVX2
  micro-kernels, OpenMP): every element is the sequential sum c = fma(a_ik, b_kj, c), k = 0..K-1, from
  c = bias (or 0), rounded once: the same bits for any thread count, blocking or instruction set
  (`pyquant.backends.cpu.set_bf16_dot` allows or forbids the bfloat16 pair instruction);
- ``triton`` / ``cuda``: kernels/matmul.py (tl.dot with float32 accumulation).

`linear(x, weight, bias=None)` is `x @ weight.T + bias` with the bias added to the float32 accumulator
(one rounding in all), for `pyquant.nn.Linear16`.
"""

from __future__ import annotations

from typing import Optional

import torch

from pyquant import _ops
from pyquant._shapes import broadcast

__all__ = ["matmul", "linear", "INPUT_DTYPES", "OUT_DTYPES"]

INPUT_DTYPES = (torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        broadcast(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(
            f"batch dimensions {tuple(a.shape[:-2])} and {tuple(b.shape[:-2])} do not broadcast"
        ) from None
    out = _ops.matmul(a, b, None, -1, out_dtype)
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
    out = _ops.matmul(x, weight.t(), bias, -1, out_dtype)
    return out.squeeze(0) if squeeze else out

