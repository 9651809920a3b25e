"""Reference kernels of the block-wise quantisation ops: pyquant's numerics in plain torch, short and obviously
right (docs/numerics.md section 2).

The reference backend is the executable specification that every other backend is tested against, and the
fallback when the compiled library is missing; it runs on any device. Constants are float32 0-dim tensors so that
each operation rounds to float32 exactly as the contract says.
"""

from __future__ import annotations

import torch

from pyquant._contract import GRID_POINTS
from pyquant.backends import kernel


def f32(value: float, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) * f32(0.5, code.device)


def grid_bins(x: torch.Tensor, inv_absmax: torch.Tensor) -> torch.Tensor:
    """Steps 3-4: y = clamp(x * inv, -1, 1); bin = trunc(((y + 1) * 0.5) * 65535 + 0.5); NaN -> bin 0."""
    dev = x.device
    y = torch.clamp(x * inv_absmax, -1.0, 1.0)
    t = (y + f32(1.0, dev)) * f32(0.5, dev)
    s = t * f32(65535.0, dev) + f32(0.5, dev)
    s = torch.where(torch.isnan(s), torch.zeros_like(s), s)
    return s.to(torch.int64) & 0xFFFF


@kernel("code_table", "reference")
def code_table(code: torch.Tensor) -> torch.Tensor:
    """Step 5 for all bins: table[bin] = number of midpoints strictly below the bin's centre."""
    bins = torch.arange(GRID_POINTS, device=code.device)
    centres = (bins * 2).float() / f32(65535.0, code.device) - f32(1.0, code.device)
    return torch.searchsorted(code_midpoints(code), centres, side="left").to(torch.uint8)


def nan_ignoring_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Per-row max |x| with NaN ignored and inf counted (0 for an empty or all-NaN row)."""
    a = blocks.abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(dim=1)


def as_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Zero-pad to whole blocks: padding zeros never change an absmax and are dropped afterwards."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=flat.dtype, device=flat.device)
    padded[:n] = flat
    return padded.view(blocks, blocksize)


def quantize_with_absmax(blocks: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    inv = (f32(1.0, blocks.device) / absmax).unsqueeze(1)
    q = table[grid_bins(blocks, inv)]
    return torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)


@kernel("quantize_blockwise", "reference")
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    flat = x.reshape(-1).float()
    blocks = as_blocks(flat, blocksize)
    absmax = nan_ignoring_absmax(blocks)
    q = quantize_with_absmax(blocks, absmax, code_table(code))
    return q.reshape(-1)[: flat.numel()].reshape(x.shape), absmax


@kernel("dequantize_blockwise", "reference")
def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype):
    flat = q.reshape(-1).long()
    scale = absmax.repeat_interleave(blocksize)[: flat.numel()]
    return (code[flat] * scale).to(dtype).reshape(q.shape)
