"""Triton kernels of the Adam step with 4-bit states (docs/numerics.md, "4-bit states"); the op
pyquant::adam4bit_step_. Per element the math of csrc/include/pyquant/adam4bit.h and blockwise.h (adam_moments,
adam_param_8bit / adam_param_32bit): `tl.fma` where those have fmaf, `tl.div_rn` / `tl.sqrt_rn`, launches with
`enable_fp_fusion=False`.

One program per block of 128 elements, one launch per tensor (a multi-tensor launch table like kernels/adam.py's is
left for when this runs on a GPU in earnest). A rank-1 tensor takes two launches, as the CPU driver's two passes:
`_rank1_maxima_kernel` recomputes each element's new v and folds it into the maxima of its slice along every
dimension with atomic max (order-independent: the same bits for any schedule), then `_adam4bit_kernel` recomputes
v, updates m and p and quantises both with the new maxima; the host copies the new maxima over the old ones last.
An element's index along dimension d is (flat index // stride_d) % shape_d (`dims`: shapes, contiguous strides,
offsets of each dimension's maxima; NDIM is a compile-time constant).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyquant._contract import CONSTANT_FIELDS, FOURBIT_BLOCK, DTYPE_CODES, RANK1_MAX_DIMS
from pyquant.kernels.blockwise import LAUNCH, load_f32, masked_abs, rounded_to, storage_view, store_f32

BLOCK = tl.constexpr(FOURBIT_BLOCK)
HALF = tl.constexpr(FOURBIT_BLOCK // 2)  # bytes of codes per block
MAXD = tl.constexpr(RANK1_MAX_DIMS)  # entries per section of `dims` (globals a kernel reads must be constexpr)
# The kernels read the constants by column (pq_adam_constants' order) from each tensor's row: the columns they
# assume (those after them, LAMB's, are not read).
assert CONSTANT_FIELDS[:10] == ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "eps_c2", "c2",
                                "step_size", "decay", "inv_grad_scale"), CONSTANT_FIELDS


@triton.jit
def _nibbles(q_ptr, offs, mask):
    """The 4-bit codes of elements `offs` (element 2k in the low nibble of byte k)."""
    byte = tl.load(q_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    return (byte >> ((offs & 1) * 4)) & 15


@triton.jit
def _rank1_scale(max_ptr, dims_ptr, offs, mask, NDIM: tl.constexpr):
    """Per element, the min over dimensions of the maxima of its slices (adam4bit.h's rank-1 scale)."""
    scale = tl.full(offs.shape, float("inf"), tl.float32)
    for d in tl.static_range(NDIM):
        index = (offs // tl.load(dims_ptr + MAXD + d)) % tl.load(dims_ptr + d)
        scale = tl.minimum(scale, tl.load(max_ptr + tl.load(dims_ptr + 2 * MAXD + d) + index, mask=mask,
                                          other=0.0))
    return scale


@triton.jit
def _grad(g_ptr, offs, mask, k, G_DTYPE: tl.constexpr, NONFINITE: tl.constexpr):
    """The unscaled gradient (blockwise.h's unscaled_grad) and where it is skipped (inf/NaN under skip)."""
    g = rounded_to(load_f32(g_ptr, offs, mask, G_DTYPE) * tl.load(k + 9), G_DTYPE)
    bad = ((g.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000) & (NONFINITE == 0)
    return g, bad


@triton.jit
def _code(y, mids_ptr):
    """adam4bit.h's fourbit_code: the number of midpoints strictly below y (NaN: 0)."""
    c = tl.zeros(y.shape, tl.int32)
    for j in tl.static_range(15):
        c += (tl.load(mids_ptr + j) < y).to(tl.int32)
    return c


@triton.jit
def _store_codes(q_ptr, x, scale, mids_ptr, pid, n):
    """Quantise float32 x under per-element scales (x / scale, 0 where the scale is 0) and pack two a byte."""
    zero = scale == 0.0
    y = tl.where(zero, 0.0, tl.div_rn(x, tl.where(zero, 1.0, scale)))
    c = _code(y, mids_ptr)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    c = tl.where(offs < n, c, 0)  # an odd tensor's last byte: high nibble 0
    lo, hi = tl.split(tl.reshape(c, (HALF, 2)))
    byte_offs = pid * HALF + tl.arange(0, HALF)
    tl.store(q_ptr + byte_offs, (lo | (hi << 4)).to(tl.uint8), mask=byte_offs < (n + 1) // 2)


@triton.jit
def _rank1_maxima_kernel(g_ptr, s2_ptr, a2_ptr, new_ptr, dims_ptr, code2_ptr, k, n,
                         G_DTYPE: tl.constexpr, NONFINITE: tl.constexpr, NDIM: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g, bad = _grad(g_ptr, offs, mask, k, G_DTYPE, NONFINITE)
    v = tl.load(code2_ptr + _nibbles(s2_ptr, offs, mask)) * _rank1_scale(a2_ptr, dims_ptr, offs, mask, NDIM)
    nv = tl.fma(tl.load(k + 3) * g, g, v * tl.load(k + 2))
    nv = masked_abs(tl.where(bad, v, nv), mask)  # NaN ignored, as every max of the states
    for d in tl.static_range(NDIM):
        index = (offs // tl.load(dims_ptr + MAXD + d)) % tl.load(dims_ptr + d)
        tl.atomic_max(new_ptr + tl.load(dims_ptr + 2 * MAXD + d) + index, nv, mask=mask)


@triton.jit
def _adam4bit_kernel(p_ptr, g_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, new_ptr, dims_ptr, code1_ptr, code2_ptr, mids1_ptr,
                     mids2_ptr, k, bad_ptr, n, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                     NONFINITE: tl.constexpr, QUANTIZED: tl.constexpr, NDIM: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = load_f32(p_ptr, offs, mask, P_DTYPE)
    g, bad = _grad(g_ptr, offs, mask, k, G_DTYPE, NONFINITE)
    if QUANTIZED:
        m = tl.load(code1_ptr + _nibbles(s1_ptr, offs, mask)) * tl.load(a1_ptr + pid)
        if NDIM > 0:
            v_scale = _rank1_scale(a2_ptr, dims_ptr, offs, mask, NDIM)
        else:
            v_scale = tl.zeros(offs.shape, tl.float32) + tl.load(a2_ptr + pid)
        v = tl.load(code2_ptr + _nibbles(s2_ptr, offs, mask)) * v_scale
    else:
        m = tl.load(s1_ptr + offs, mask=mask, other=0.0)
        v = tl.load(s2_ptr + offs, mask=mask, other=0.0)
    nm = tl.fma(tl.load(k + 1), g, m * tl.load(k + 0))
    nv = tl.fma(tl.load(k + 3) * g, g, v * tl.load(k + 2))
    if QUANTIZED:  # adam_param_8bit: p * decay + (step * m) / (sqrt(v) / c2 + eps)
        denom = tl.div_rn(tl.sqrt_rn(nv), tl.load(k + 6)) + tl.load(k + 4)
        np = p * tl.load(k + 8) + tl.div_rn(tl.load(k + 7) * nm, denom)
    else:  # adam_param_32bit: fma(step, m / (sqrt(v) + eps * c2), p * decay)
        np = tl.fma(tl.load(k + 7), tl.div_rn(nm, tl.sqrt_rn(nv) + tl.load(k + 5)), p * tl.load(k + 8))
    nm = tl.where(bad, m, nm)
    nv = tl.where(bad, v, nv)
    store_f32(p_ptr, offs, tl.where(bad, p, np), mask, P_DTYPE)
    tl.store(bad_ptr + pid, tl.sum((mask & bad).to(tl.int32)))
    if QUANTIZED:
        amax1 = tl.max(masked_abs(nm, mask), axis=0)
        tl.store(a1_ptr + pid, amax1)
        _store_codes(s1_ptr, nm, tl.zeros(offs.shape, tl.float32) + amax1, mids1_ptr, pid, n)
        if NDIM > 0:
            _store_codes(s2_ptr, nv, _rank1_scale(new_ptr, dims_ptr, offs, mask, NDIM), mids2_ptr, pid, n)
        else:
            amax2 = tl.max(masked_abs(nv, mask), axis=0)
            tl.store(a2_ptr + pid, amax2)
            _store_codes(s2_ptr, nv, tl.zeros(offs.shape, tl.float32) + amax2, mids2_ptr, pid, n)
    else:
        tl.store(s1_ptr + offs, nm, mask=mask)
        tl.store(s2_ptr + offs, nv, mask=mask)


def _dims(shape, device) -> torch.Tensor:
    """int64 [3 * RANK1_MAX_DIMS]: the shape, its contiguous strides, where each dimension's maxima start."""
    shape = list(shape)
    strides, offsets, s, o = [], [], 1, 0
    for size in reversed(shape):
        strides.insert(0, s)
        s *= size
    for size in shape:
        offsets.append(o)
        o += size
    pad = [0] * (RANK1_MAX_DIMS - len(shape))
    return torch.tensor(shape + pad + strides + pad + offsets + pad, dtype=torch.int64, device=device)


def adam4bit_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite):
    """The operands checked by the caller (capi.check_adam4bit_operands). Returns the number of skipped elements,
    0-dim int64 on the params' device."""
    if not params:
        return torch.zeros((), dtype=torch.int64)
    device = params[0].device
    code1, code2 = code1.contiguous(), code2.contiguous()
    mids1, mids2 = ((c[:-1] + c[1:]) * 0.5 for c in (code1, code2))
    constants = constants.to(device=device, dtype=torch.float32).contiguous()
    counts = []
    for i, (p, g, s1, s2, a1, a2, r) in enumerate(zip(params, grads, state1, state2, absmax1, absmax2, rank1)):
        n = p.numel()
        if n == 0:
            continue
        grid = (triton.cdiv(n, FOURBIT_BLOCK),)
        k = constants[i]
        pv, gv = storage_view(p), storage_view(g)
        p_code, g_code = DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
        ndim = p.dim() if r else 0
        dims = _dims(p.shape if r else [], device)
        new = torch.zeros(sum(p.shape) if r else 1, dtype=torch.float32, device=device)
        if r:
            _rank1_maxima_kernel[grid](gv, s2, a2, new, dims, code2, k, n, G_DTYPE=g_code, NONFINITE=nonfinite,
                                       NDIM=ndim, **LAUNCH)
        bad = torch.zeros(grid[0], dtype=torch.int32, device=device)
        a1, a2 = (a if a.numel() else new for a in (a1, a2))  # float32 states: unused, but a real pointer
        _adam4bit_kernel[grid](pv, gv, s1, s2, a1, a2, new, dims, code1, code2, mids1, mids2, k, bad, n,
                               P_DTYPE=p_code, G_DTYPE=g_code, NONFINITE=nonfinite,
                               QUANTIZED=s1.dtype == torch.uint8, NDIM=ndim, **LAUNCH)
        if r:
            a2.copy_(new)
        counts.append(bad.sum(dtype=torch.int64))
    return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64, device=device)
