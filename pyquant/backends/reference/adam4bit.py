"""Reference kernel of the Adam step with 4-bit states (docs/numerics.md, "4-bit states"), and the 4-bit state
codec it is made of: the executable spec that the C++, Triton and CUDA kernels give the bits of.

A 4-bit state holds one code (0..15) per element, two to a byte: element 2i in the low nibble of byte i, element
2i+1 in the high one (lpmm's order; an odd last element leaves its high nibble 0). A value is `code[q] * scale`
(one float32 multiplication); a code is the number of the map's 15 float32 midpoints `(code[j] + code[j+1]) * 0.5`
strictly below `x / scale` (a true float32 division, as the paper's code; ties go to the lower code; NaN gets
code 0), and `x = 0` where the scale is 0. Scales:
- first moment, and the second moment of 1-D tensors or with rank1=False: the block's max |x| over 128 elements;
- second moment with rank1=True, tensors of 2 to 8 dimensions: per element, the min over the dimensions d of the
  max of v over the slice that shares the element's index along d (rows and columns for a matrix), stored as the
  maxima of dimension 0, then 1, ... (sum(shape) floats).
Every max ignores NaN and counts inf. The second moment's map has no zero, so a stored v is never 0 unless its
whole scale is.
"""

from __future__ import annotations

import torch

from pyquant._contract import CONSTANT_FIELDS, FOURBIT_BLOCK, SKIP_ELEMENT
from pyquant.backends import kernel
from pyquant.backends.reference.blockwise import f32
from pyquant.backends.reference.optimizer import fma32, unscaled_grad


# ---- packing ----
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (flat) -> ceil(n / 2) bytes, element 2i in the low nibble of byte i."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n codes of packed bytes (int64, for indexing a map)."""
    packed = packed.reshape(-1).to(torch.int64)
    return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n]


# ---- scales ----
def _nan_as_zero(x: torch.Tensor) -> torch.Tensor:
    # max that ignores NaN: the values are |x| >= 0, so a NaN may stand in as 0
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)


def block_scales(x: torch.Tensor) -> torch.Tensor:
    """max |x| over each block of FOURBIT_BLOCK elements of flat x (the last block partial), NaN ignored."""
    a = _nan_as_zero(x.abs())
    pad = -x.numel() % FOURBIT_BLOCK
    return torch.cat([a, a.new_zeros(pad)]).view(-1, FOURBIT_BLOCK).amax(dim=1)


def rank1_maxima(v: torch.Tensor, shape) -> torch.Tensor:
    """The rank-1 statistics of v (>= 0) viewed as `shape`: for each dimension d, the max over every other
    dimension, concatenated (sum(shape) floats)."""
    a = _nan_as_zero(v.reshape(shape).abs())
    if a.numel() == 0:  # an empty tensor (an FSDP2 rank's empty shard of a matrix): maxima 0, as a new state's
        return a.new_zeros(sum(shape))
    out = []
    for d in range(len(shape)):
        others = [i for i in range(len(shape)) if i != d]
        out.append(a.amax(dim=others) if others else a)
    return torch.cat(out)


def rank1_scale(maxima: torch.Tensor, shape) -> torch.Tensor:
    """Per element, the min over dimensions of its slices' maxima (flat, numel elements)."""
    scale, offset = None, 0
    for d, size in enumerate(shape):
        view = [1] * len(shape)
        view[d] = size
        m = maxima[offset:offset + size].view(view)
        scale = m if scale is None else torch.minimum(scale, m)
        offset += size
    return scale.expand(tuple(shape)).reshape(-1)


def element_scales(scales: torch.Tensor, n: int, shape, rank1: bool) -> torch.Tensor:
    """The scale of each of the n elements: rank-1 maxima, or one per block of FOURBIT_BLOCK."""
    if rank1:
        return rank1_scale(scales, shape)
    return scales.repeat_interleave(FOURBIT_BLOCK)[:n]


def new_scales(values: torch.Tensor, shape, rank1: bool) -> torch.Tensor:
    return rank1_maxima(values, shape) if rank1 else block_scales(values)


# ---- the codec ----
def quantize4(x: torch.Tensor, scale: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Codes (int64) of float32 x with per-element float32 scales: midpoints strictly below x / scale."""
    y = torch.where(scale == 0, torch.zeros_like(x), x / scale)
    mids = (code[:-1] + code[1:]) * 0.5
    return (mids.view(1, -1) < y.view(-1, 1)).sum(dim=1)  # NaN compares false: code 0


def dequantize4(packed: torch.Tensor, scale: torch.Tensor, code: torch.Tensor, n: int) -> torch.Tensor:
    return code[unpack_nibbles(packed, n)] * scale


def quantize_state(values: torch.Tensor, shape, rank1: bool, code: torch.Tensor):
    """(packed codes, scales) of a float32 state with `shape` (flat values)."""
    values = values.reshape(-1).float()
    scales = new_scales(values, shape, rank1)
    q = quantize4(values, element_scales(scales, values.numel(), shape, rank1), code)
    return pack_nibbles(q), scales


def dequantize_state(packed: torch.Tensor, scales: torch.Tensor, shape, rank1: bool, code: torch.Tensor):
    n = 1
    for s in shape:
        n *= s
    return dequantize4(packed, element_scales(scales, n, shape, rank1), code, n)


def ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root (torch's CPU float32 sqrt is not: MKL's vsSqrt). The root of a
    float32 in float64 rounded to float32 is correctly rounded (53 >= 2 * 24 + 2)."""
    return torch.sqrt(x.double()).float()


# ---- the step ----
def adam4bit_update(pf, gf, m, v, k: dict, quantized: bool):
    """(new p, new m, new v) in float32: the one formula of the 4-bit step (docs/numerics.md)."""
    new_m = fma32(k["one_minus_beta1"], gf, m * k["beta1"])
    new_v = fma32(k["one_minus_beta2"] * gf, gf, v * k["beta2"])
    decayed = pf * k["decay"]
    if quantized:  # the paper's update: p * decay + (-lr / c1) * m / (sqrt(v) / c2 + eps)
        new_p = decayed + (k["step_size"] * new_m) / (ieee_sqrt(new_v) / k["c2"] + k["eps"])
    else:  # float32 states: Adam8bit's float32 rule, with the IEEE root
        new_p = fma32(k["step_size"], new_m / (ieee_sqrt(new_v) + k["eps_c2"]), decayed)
    return new_p, new_m, new_v


def _one_tensor(p, g, s1, s2, a1, a2, k, code1, code2, rank1: bool, nonfinite: int) -> int:
    n, shape = p.numel(), tuple(p.shape)
    if n == 0:  # nothing to step; as every kernel, leave an empty tensor's scales as they are
        return 0
    gf = unscaled_grad(g.reshape(-1), k["inv_grad_scale"])
    pf = p.reshape(-1).float()
    quantized = s1.dtype == torch.uint8
    if quantized:
        m = dequantize_state(s1, a1, shape, False, code1)
        v = dequantize_state(s2, a2, shape, rank1, code2)
    else:
        m, v = s1.reshape(-1), s2.reshape(-1)
    new_p, new_m, new_v = adam4bit_update(pf, gf, m, v, k, quantized)
    bad = ~torch.isfinite(gf)
    if nonfinite == SKIP_ELEMENT:
        new_m, new_v, new_p = torch.where(bad, m, new_m), torch.where(bad, v, new_v), torch.where(bad, pf, new_p)
    p.copy_(new_p.reshape(p.shape))
    if quantized:
        for state, scales, values, r, code in ((s1, a1, new_m, False, code1), (s2, a2, new_v, rank1, code2)):
            packed, new = quantize_state(values, shape, r, code)
            state.copy_(packed)
            scales.copy_(new)
    else:
        s1.copy_(new_m.reshape(s1.shape))
        s2.copy_(new_v.reshape(s2.shape))
    return int(bad.sum()) if nonfinite == SKIP_ELEMENT else 0


@kernel("adam4bit_step", "reference")
def adam4bit_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite):
    total = 0
    for i, (p, g, s1, s2, a1, a2) in enumerate(zip(params, grads, state1, state2, absmax1, absmax2)):
        k = {name: f32(float(constants[i, j]), p.device) for j, name in enumerate(CONSTANT_FIELDS)}
        total += _one_tensor(p, g, s1, s2, a1, a2, k, code1, code2, bool(rank1[i]), nonfinite)
    return torch.tensor(total, dtype=torch.int64)
