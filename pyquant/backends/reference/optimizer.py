"""Reference kernel of the fused optimizer step (docs/numerics.md sections 3-4): dequantise, update, requantise,
one tensor at a time in plain torch. `fma32` is the only place where a product is not rounded before the addition."""

from __future__ import annotations

import torch

from pyquant._contract import CONSTANT_FIELDS, OPTIMIZER_BLOCK, SKIP_ELEMENT
from pyquant.backends import kernel
from pyquant.backends.reference.blockwise import (
    as_blocks,
    code_table,
    dequantize_blockwise,
    f32,
    nan_ignoring_absmax,
    quantize_with_absmax,
)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a*b + c with a single rounding.

    The product of two float32 values is exact in float64; the sum is done in float64 rounded to odd
    (round to nearest, then if inexact force the last bit to 1 toward the true value), which makes the
    final rounding to float32 correct: 53 bits >= 24 + 2.
    """
    a, b, c = torch.broadcast_tensors(a.double(), b.double(), c.double())
    prod = a * b
    s = prod + c
    # TwoSum: the exact rounding error of s = prod + c.
    bv = s - prod
    err = (prod - (s - bv)) + (c - bv)
    inexact = torch.isfinite(s) & (err != 0)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where(inexact & even, torch.nextafter(s, toward), s)
    return s.float()


def unscaled_grad(g: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """GradScaler's unscale fused into the step: g * inv_scale rounded to g's dtype, as unscale_ leaves it."""
    if float(inv_scale) == 1.0:
        return g.float()
    return (g.float() * inv_scale).to(g.dtype).float()


def _adam_one_tensor(p, g, s1, s2, a1, a2, k: dict, code1, code2, nonfinite: int) -> int:
    gf = unscaled_grad(g.reshape(-1), k["inv_grad_scale"])
    pf = p.reshape(-1).float()
    eight_bit = s1.dtype == torch.uint8
    if eight_bit:
        m = dequantize_blockwise(s1.reshape(-1), a1, code1, OPTIMIZER_BLOCK, torch.float32)
        v = dequantize_blockwise(s2.reshape(-1), a2, code2, OPTIMIZER_BLOCK, torch.float32)
    else:
        m, v = s1.reshape(-1), s2.reshape(-1)
    new_m = fma32(k["one_minus_beta1"], gf, m * k["beta1"])
    new_v = fma32(k["one_minus_beta2"] * gf, gf, v * k["beta2"])
    decayed = pf * k["decay"]
    if eight_bit:
        denom = torch.sqrt(new_v) / k["c2"] + k["eps"]
        new_p = decayed + (k["step_size"] * new_m) / denom
    else:
        new_p = fma32(k["step_size"], new_m / (torch.sqrt(new_v) + k["eps_c2"]), decayed)
    bad = ~torch.isfinite(gf)
    if nonfinite == SKIP_ELEMENT:
        new_m, new_v, new_p = torch.where(bad, m, new_m), torch.where(bad, v, new_v), torch.where(bad, pf, new_p)
    p.copy_(new_p.reshape(p.shape))
    if eight_bit:
        for state, absmax, table, values in ((s1, a1, code_table(code1), new_m), (s2, a2, code_table(code2), new_v)):
            blocks = as_blocks(values, OPTIMIZER_BLOCK)
            absmax.copy_(nan_ignoring_absmax(blocks))
            state.copy_(quantize_with_absmax(blocks, absmax, table).reshape(-1)[: values.numel()].reshape(state.shape))
    else:
        s1.copy_(new_m.reshape(s1.shape))
        s2.copy_(new_v.reshape(s2.shape))
    return int(bad.sum()) if nonfinite == SKIP_ELEMENT else 0


@kernel("adam_step", "reference")
def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    total = 0
    for i, (p, g, s1, s2, a1, a2) in enumerate(zip(params, grads, state1, state2, absmax1, absmax2)):
        k = {name: f32(float(constants[i, j]), p.device) for j, name in enumerate(CONSTANT_FIELDS)}
        total += _adam_one_tensor(p, g, s1, s2, a1, a2, k, code1, code2, nonfinite)
    return torch.tensor(total, dtype=torch.int64)
