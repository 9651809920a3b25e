"""Reference kernels of the fused optimizer steps (docs/numerics.md sections 3-5): dequantise, update, requantise,
one tensor at a time in plain torch: Adam, the one-state rules (momentum, Lion, RMSprop, Adagrad) and AdEMAMix; and
the norm passes of LAMB's and LARS' trust ratios. `fma32` is the only place where a product is not rounded before
the addition."""

from __future__ import annotations

import torch

from pyquant._contract import ADEMAMIX_FIELDS, CONSTANT_FIELDS, ONE_STATE_FIELDS, ONE_STATE_RULES, OPTIMIZER_BLOCK, SKIP_ELEMENT
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
    m, v = _load_state(s1, a1, code1), _load_state(s2, a2, code2)
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
    _store_state(s1, a1, code1, new_m)
    _store_state(s2, a2, code2, new_v)
    return int(bad.sum()) if nonfinite == SKIP_ELEMENT else 0


def _load_state(state, absmax, code) -> torch.Tensor:
    """A state as float32 values: dequantised 8-bit codes, or the float32 state itself."""
    if state.dtype == torch.uint8:
        return dequantize_blockwise(state.reshape(-1), absmax, code, OPTIMIZER_BLOCK, torch.float32)
    return state.reshape(-1)


def _store_state(state, absmax, code, values) -> None:
    """Write float32 `values` into a state: block absmax and 8-bit codes, or the float32 values."""
    if state.dtype != torch.uint8:
        state.copy_(values.reshape(state.shape))
        return
    blocks = as_blocks(values, OPTIMIZER_BLOCK)
    absmax.copy_(nan_ignoring_absmax(blocks))
    state.copy_(quantize_with_absmax(blocks, absmax, code_table(code)).reshape(-1)[: values.numel()].reshape(state.shape))


@kernel("adam_step", "reference")
def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    total = 0
    for i, (p, g, s1, s2, a1, a2) in enumerate(zip(params, grads, state1, state2, absmax1, absmax2)):
        k = {name: f32(float(constants[i, j]), p.device) for j, name in enumerate(CONSTANT_FIELDS)}
        total += _adam_one_tensor(p, g, s1, s2, a1, a2, k, code1, code2, nonfinite)
    return torch.tensor(total, dtype=torch.int64)


# ---- the one-state rules: bitsandbytes 0.50.2's _optimizer_update_8bit_blockwise_cpu (8-bit states) and
# _optimizer_update_32bit_cpu (float32 states), op for op. torch's `x.add_(y, alpha=a)` is fma(a, y, x),
# `x.addcmul_(y, z, value=a)` is fma(a * y, z, x), `x.addcdiv_(y, z, value=a)` is x + (a * y) / z.
def _one_state_update(rule: int, p, g, s, k: dict, eight_bit: bool):
    """(new parameter, new state) in float32 for float32 p, g (unscaled) and s."""
    if rule != ONE_STATE_RULES["lion"] and float(k["grad_decay"]):
        g = fma32(k["weight_decay"], p, g)
    if rule == ONE_STATE_RULES["momentum"]:
        g = g * k["trust_ratio"]  # LARS' ratio; SGD's is 1, an exact no-op
        s = g if float(k["first_step"]) else s * k["beta1"] + g
        return fma32(k["neg_lr"], s, p), s
    if rule == ONE_STATE_RULES["lion"]:
        p = p * k["decay"]
        u = s * k["beta1"] + g * k["one_minus_beta1"] if eight_bit else fma32(k["one_minus_beta1"], g, s * k["beta1"])
        p = fma32(k["neg_lr"], torch.sign(u), p)  # torch.sign: +0 for +-0 and NaN
        return p, fma32(k["one_minus_beta2"], g, s * k["beta2"])
    if rule == ONE_STATE_RULES["rmsprop"]:
        s = fma32(k["one_minus_beta1"] * g, g, s * k["beta1"])
    else:  # adagrad
        s = fma32(g, g, s)
    denom = torch.sqrt(s) + k["eps"]
    p = p + (k["neg_lr"] * g) / denom if eight_bit else fma32(k["neg_lr"], g / denom, p)
    return p, s


@kernel("one_state_step", "reference")
def one_state_step(params, grads, state1, absmax1, constants, code1, rule, nonfinite):
    total = 0
    for i, (p, g, s1, a1) in enumerate(zip(params, grads, state1, absmax1)):
        k = {name: f32(float(constants[i, j]), p.device) for j, name in enumerate(ONE_STATE_FIELDS)}
        gf = unscaled_grad(g.reshape(-1), k["inv_grad_scale"])
        pf = p.reshape(-1).float()
        s = _load_state(s1, a1, code1)
        new_p, new_s = _one_state_update(rule, pf, gf, s, k, s1.dtype == torch.uint8)
        bad = ~torch.isfinite(gf)
        if nonfinite == SKIP_ELEMENT:
            new_p, new_s = torch.where(bad, pf, new_p), torch.where(bad, s, new_s)
            total += int(bad.sum())
        p.copy_(new_p.reshape(p.shape))
        _store_state(s1, a1, code1, new_s)
    return torch.tensor(total, dtype=torch.int64)


# ---- AdEMAMix: bitsandbytes 0.50.2's CPU code (8-bit and 32-bit paths alike), op for op ----
@kernel("ademamix_step", "reference")
def ademamix_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    total = 0
    for i, (p, g, s1, s2, a1, a2) in enumerate(zip(params, grads, state1, state2, absmax1, absmax2)):
        k = {name: f32(float(constants[i, j]), p.device) for j, name in enumerate(ADEMAMIX_FIELDS)}
        gf = unscaled_grad(g.reshape(-1), k["inv_grad_scale"])
        pf = p.reshape(-1).float()
        fast, slow = s1.reshape(2, -1)  # views of the stacked EMAs
        a_fast, a_slow = a1.reshape(2, -1) if s1.dtype == torch.uint8 else (a1, a1)
        m1, m2 = _load_state(fast, a_fast, code1), _load_state(slow, a_slow, code1)
        nu = _load_state(s2, a2, code2)
        new_m1 = fma32(k["one_minus_beta1"], gf, m1 * k["beta1"])
        new_m2 = fma32(k["one_minus_beta3"], gf, m2 * k["beta3"])
        new_nu = fma32(k["one_minus_beta2"] * gf, gf, nu * k["beta2"])
        update = (new_m1 / k["c1"] + k["alpha"] * new_m2) / (torch.sqrt(new_nu) / k["c2"] + k["eps"])
        new_p = fma32(k["neg_lr"], update, pf * k["decay"])
        bad = ~torch.isfinite(gf)
        if nonfinite == SKIP_ELEMENT:
            new_p = torch.where(bad, pf, new_p)
            new_m1, new_m2, new_nu = (torch.where(bad, old, new) for old, new in ((m1, new_m1), (m2, new_m2), (nu, new_nu)))
            total += int(bad.sum())
        p.copy_(new_p.reshape(p.shape))
        _store_state(fast, a_fast, code1, new_m1)
        _store_state(slow, a_slow, code1, new_m2)
        _store_state(s2, a2, code2, new_nu)
    return torch.tensor(total, dtype=torch.int64)


# ---- the trust ratios' norm passes (docs/numerics.md, "LAMB and LARS"), summed in the C++ library's order ----
def _halving_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension (a power of two) by halving: x[..., i] + x[..., i + h] for h = n/2, ..., 1."""
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x[..., 0]


def sum_of_block_sums(block_sums: torch.Tensor) -> torch.Tensor:
    """The sum over the first dimension of float64 `block_sums` (blocks, ...), zero-padded to a power of two, by
    halving: the second stage of every backend's norm pass (the C++ library's sum_of_blocks)."""
    blocks = block_sums.shape[0]
    padded = block_sums.new_zeros((1 << max(blocks - 1, 0).bit_length(), *block_sums.shape[1:]))
    padded[:blocks] = block_sums
    return _halving_sum(padded.movedim(0, -1))


def pairwise_square_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of the squares of float32 `values` in double (each square exact): per block of OPTIMIZER_BLOCK slots
    (zero past the end) by halving, then over the blocks' sums (sum_of_block_sums)."""
    n = values.numel()
    blocks = -(-n // OPTIMIZER_BLOCK)
    squares = torch.zeros(blocks * OPTIMIZER_BLOCK, dtype=torch.float64, device=values.device)
    x = values.reshape(-1).double()
    squares[:n] = x * x
    return sum_of_block_sums(_halving_sum(squares.view(blocks, OPTIMIZER_BLOCK)))


@kernel("lamb_norms", "reference")
def lamb_norms(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    sums = []
    for i, (p, g, s1, s2, a1, a2) in enumerate(zip(params, grads, state1, state2, absmax1, absmax2)):
        k = {name: f32(float(constants[i, j]), p.device) for j, name in enumerate(CONSTANT_FIELDS)}
        gf = unscaled_grad(g.reshape(-1), k["inv_grad_scale"])
        pf = p.reshape(-1).float()
        m, v = _load_state(s1, a1, code1), _load_state(s2, a2, code2)
        m = fma32(k["one_minus_beta1"], gf, m * k["beta1"])  # blockwise.h adam_moments
        v = fma32(k["one_minus_beta2"] * gf, gf, v * k["beta2"])
        r = (m * k["inv_c1"]) / (torch.sqrt(v) / k["c2"] + k["eps"])  # blockwise.h lamb_direction
        if float(k["weight_decay"]) > 0.0:
            r = fma32(k["weight_decay"], pf, r)
        if nonfinite == SKIP_ELEMENT:  # a skipped element does not move: no part of the direction
            r = torch.where(torch.isfinite(gf), r, torch.zeros_like(r))
        sums.append(torch.stack([pairwise_square_sum(pf), pairwise_square_sum(r)]))
    return torch.stack(sums)


@kernel("lars_norms", "reference")
def lars_norms(params, grads, constants, nonfinite):
    sums = []
    for i, (p, g) in enumerate(zip(params, grads)):
        k = {name: f32(float(constants[i, j]), p.device) for j, name in enumerate(ONE_STATE_FIELDS)}
        gf = unscaled_grad(g.reshape(-1), k["inv_grad_scale"])
        pf = p.reshape(-1).float()
        d = fma32(k["weight_decay"], pf, gf) if float(k["grad_decay"]) else gf  # blockwise.h decayed_grad
        if nonfinite == SKIP_ELEMENT:
            d = torch.where(torch.isfinite(gf), d, torch.zeros_like(d))
        sums.append(torch.stack([pairwise_square_sum(pf), pairwise_square_sum(d)]))
    return torch.stack(sums)
