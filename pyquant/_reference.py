"""The reference backend: pyquant's numerics written in plain torch, short and obviously right.

It is the executable specification (docs/numerics.md) that every other backend is tested against, and
the fallback when the compiled library is missing. It runs on any device. Constants are float32 0-dim
tensors so that each operation rounds to float32 exactly as the contract says; `fma32` is the only place
where a product is not rounded before the addition.
"""

from __future__ import annotations

import math

import torch

GRID_POINTS = 65536
OPTIMIZER_BLOCK = 256
SKIP_ELEMENT, PROPAGATE = 0, 1
# Field order of pq::AdamConstants; the optimizer builds one row per tensor.
CONSTANT_FIELDS = (
    "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "eps_c2", "c2", "step_size", "decay", "inv_grad_scale"
)


def adam_constants(group: dict, step: int, eight_bit: bool, inv_grad_scale: float = 1.0) -> list[float]:
    """One row of pq::AdamConstants for a parameter group (lr, betas, eps, weight_decay) at `step`, in
    double precision (docs/numerics.md section 4); a float32 tensor of rows rounds each entry once."""
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    c1 = 1.0 - beta1**step
    c2 = math.sqrt(1.0 - beta2**step)
    values = dict(
        beta1=beta1,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        eps=eps,
        eps_c2=eps * c2,
        c2=c2,
        step_size=-lr / c1 if eight_bit else -lr * c2 / c1,
        decay=1.0 - lr * wd if wd > 0.0 else 1.0,
        inv_grad_scale=inv_grad_scale,
    )
    return [values[name] for name in CONSTANT_FIELDS]


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


def _f32(value: float, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) * _f32(0.5, code.device)


def grid_bins(x: torch.Tensor, inv_absmax: torch.Tensor) -> torch.Tensor:
    """Steps 3-4: y = clamp(x * inv, -1, 1); bin = trunc(((y + 1) * 0.5) * 65535 + 0.5); NaN -> bin 0."""
    dev = x.device
    y = torch.clamp(x * inv_absmax, -1.0, 1.0)
    t = (y + _f32(1.0, dev)) * _f32(0.5, dev)
    s = t * _f32(65535.0, dev) + _f32(0.5, dev)
    s = torch.where(torch.isnan(s), torch.zeros_like(s), s)
    return s.to(torch.int64) & 0xFFFF


def code_table(code: torch.Tensor) -> torch.Tensor:
    """Step 5 for all bins: table[bin] = number of midpoints strictly below the bin's centre."""
    bins = torch.arange(GRID_POINTS, device=code.device)
    centres = (bins * 2).float() / _f32(65535.0, code.device) - _f32(1.0, code.device)
    return torch.searchsorted(code_midpoints(code), centres, side="left").to(torch.uint8)


def nan_ignoring_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Per-row max |x| with NaN ignored and inf counted (0 for an empty or all-NaN row)."""
    a = blocks.abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(dim=1)


def _as_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Zero-pad to whole blocks: padding zeros never change an absmax and are dropped afterwards."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=flat.dtype, device=flat.device)
    padded[:n] = flat
    return padded.view(blocks, blocksize)


def _quantize_with_absmax(blocks: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    inv = (_f32(1.0, blocks.device) / absmax).unsqueeze(1)
    q = table[grid_bins(blocks, inv)]
    return torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    flat = x.reshape(-1).float()
    blocks = _as_blocks(flat, blocksize)
    absmax = nan_ignoring_absmax(blocks)
    q = _quantize_with_absmax(blocks, absmax, code_table(code))
    return q.reshape(-1)[: flat.numel()].reshape(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype):
    flat = q.reshape(-1).long()
    scale = absmax.repeat_interleave(blocksize)[: flat.numel()]
    return (code[flat] * scale).to(dtype).reshape(q.shape)


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
            blocks = _as_blocks(values, OPTIMIZER_BLOCK)
            absmax.copy_(nan_ignoring_absmax(blocks))
            state.copy_(_quantize_with_absmax(blocks, absmax, table).reshape(-1)[: values.numel()].reshape(state.shape))
    else:
        s1.copy_(new_m.reshape(s1.shape))
        s2.copy_(new_v.reshape(s2.shape))
    return int(bad.sum()) if nonfinite == SKIP_ELEMENT else 0


def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    total = 0
    for i, (p, g, s1, s2, a1, a2) in enumerate(zip(params, grads, state1, state2, absmax1, absmax2)):
        k = {name: _f32(float(constants[i, j]), p.device) for j, name in enumerate(CONSTANT_FIELDS)}
        total += _adam_one_tensor(p, g, s1, s2, a1, a2, k, code1, code2, nonfinite)
    return torch.tensor(total, dtype=torch.int64)


OPS = {
    "code_table": code_table,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
    "adam_step": adam_step,
}
