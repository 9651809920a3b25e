"""Triton kernels of the Adam step with 4-bit states (docs/numerics.md, "4-bit states"); the op
pyquant::adam4bit_step_. Per element the math of csrc/include/pyquant/adam4bit.h and blockwise.h (adam_moments,
adam_param_8bit / adam_param_32bit): `tl.fma` where those have fmaf, `tl.div_rn` / `tl.sqrt_rn`, launches with
`enable_fp_fusion=False`.

Multi-tensor, as kernels/adam.py: the tensors of a call that share (param dtype, grad dtype), one parameter group
in the usual case, take two launches whatever their number, kinds and shapes. The host builds (and caches, see
blockwise.LaunchTables) two tables, two host->device copies:
  - `meta` (int64 [n_tensors, META_FIELDS]): the tensors' addresses; the rank-1 second moment's number of
    dimensions (0: block-wise or float32 states), where its new maxima start in the call's `new` buffer, its shape
    and contiguous strides (RANK1_MAX_DIMS each, padded); numel and the state bits (4 or 32) last;
  - `progs` (int32 [n_programs, 2]): each program's tensor and first 128-element block; ROWS blocks a program.
A program never shares a byte of codes with another: it starts on a block boundary and a block (128 elements, an
even number) is whole bytes, so the shared last byte of an odd tensor's two nibbles is written by one program.

The rank-1 tensors' programs come first in `progs`, so the first launch, `_rank1_maxima_kernel`, runs over that
prefix only: it recomputes each element's new v and folds it into the maxima of its slice along every dimension,
with atomic max into `new` (zeroed). Max is commutative and associative, and the values are >= 0 floats (NaN
dropped), so the result is the same bits for any order in which programs and lanes arrive: any schedule, any
ROWS, any GPU. The second launch, `_adam4bit_kernel`, runs every program: it recomputes v, updates m and p, and
quantises both (a rank-1 v with the new maxima; block-wise scales from registers). The host copies the new maxima
over the old ones last (one foreach copy): the maxima pass and the step both read the old ones.
An element's index along dimension d is (flat index // stride_d) % shape_d; the number of dimensions is a run-time
value read from `meta` (a loop of ndim steps: rank-1 tensors of 2 to 8 dimensions share a launch and a compile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyquant._contract import CONSTANT_FIELDS, FOURBIT_BLOCK, DTYPE_CODES, RANK1_MAX_DIMS
from pyquant.kernels.adam import program_tile, storage_ptr
from pyquant.kernels.blockwise import LAUNCH, LaunchTables, load_f32, masked_abs, rounded_to, store_f32

ROWS = 4  # 128-element blocks per program
# Globals a kernel reads must be constexpr.
BLOCK = tl.constexpr(FOURBIT_BLOCK)
HALF = tl.constexpr(FOURBIT_BLOCK // 2)  # bytes of codes per block
N_CONSTANTS = tl.constexpr(len(CONSTANT_FIELDS))  # columns of `constants`
# meta's columns: 0..5 param, grad, state1, state2, absmax1, absmax2 addresses; NDIM; NEW_BASE; SHAPE.. and
# STRIDE.. (RANK1_MAX_DIMS each); numel and state bits last (where adam.program_tile reads numel).
NDIM, NEW_BASE, SHAPE, STRIDE = (tl.constexpr(c) for c in (6, 7, 8, 8 + RANK1_MAX_DIMS))
META_FIELDS = tl.constexpr(8 + 2 * RANK1_MAX_DIMS + 2)
_LAUNCH_TABLES = LaunchTables(limit=32)
# The kernels read the constants by column (pq_adam_constants' order) from each tensor's row: the columns they
# assume (those after them, LAMB's, are not read).
assert CONSTANT_FIELDS[:10] == ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "eps_c2", "c2",
                                "step_size", "decay", "inv_grad_scale"), CONSTANT_FIELDS


@triton.jit
def _nibbles(q_ptr, offs, mask):
    """The 4-bit codes of elements `offs` (element 2k in the low nibble of byte k)."""
    byte = tl.load(q_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    return (byte >> ((offs & 1) * 4).to(tl.int32)) & 15


@triton.jit
def _rank1_scale(max_ptr, row, offs, mask):
    """Per element, the min over dimensions of the maxima of its slices (adam4bit.h's rank-1 scale); max_ptr: the
    tensor's maxima, dimension 0's then 1's ..."""
    scale = tl.full(offs.shape, float("inf"), tl.float32)
    for d in range(tl.load(row + NDIM)):
        size = tl.load(row + SHAPE + d)
        index = (offs // tl.load(row + STRIDE + d)) % size
        scale = tl.minimum(scale, tl.load(max_ptr + index, mask=mask, other=0.0))
        max_ptr += size  # dimension d + 1's maxima
    return scale


@triton.jit
def _grad(row, offs, mask, k, G_DTYPE: tl.constexpr, NONFINITE: tl.constexpr):
    """The unscaled gradient (blockwise.h's unscaled_grad) and where it is skipped (inf/NaN under skip)."""
    g_ptr = storage_ptr(tl.load(row + 1), G_DTYPE)
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
def _store_codes(q_ptr, x, scale, mids_ptr, blocks, offs, numel, R: tl.constexpr):
    """Quantise float32 x [R, BLOCK] under per-element scales (x / scale, 0 where the scale is 0) and pack two a
    byte, each block's codes into its HALF bytes."""
    zero = scale == 0.0
    y = tl.where(zero, 0.0, tl.div_rn(x, tl.where(zero, 1.0, scale)))
    c = tl.where(offs < numel, _code(y, mids_ptr), 0)  # an odd tensor's last byte: high nibble 0
    lo, hi = tl.split(tl.reshape(c, (R, HALF, 2)))
    byte_offs = blocks.to(tl.int64)[:, None] * HALF + tl.arange(0, HALF)[None, :]
    tl.store(q_ptr + byte_offs, (lo | (hi << 4)).to(tl.uint8), mask=byte_offs < (numel + 1) // 2)


@triton.jit
def _rank1_maxima_kernel(meta_ptr, prog_ptr, const_ptr, code2_ptr, new_ptr,
                         G_DTYPE: tl.constexpr, NONFINITE: tl.constexpr, R: tl.constexpr):
    t, row, blocks, offs, mask, block_ok = program_tile(meta_ptr, prog_ptr, META_FIELDS, R, BLOCK)
    k = const_ptr + t * N_CONSTANTS
    g, bad = _grad(row, offs, mask, k, G_DTYPE, NONFINITE)
    s2_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
    a2_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    v = tl.load(code2_ptr + _nibbles(s2_ptr, offs, mask)) * _rank1_scale(a2_ptr, row, offs, mask)
    nv = tl.fma(tl.load(k + 3) * g, g, v * tl.load(k + 2))
    nv = masked_abs(tl.where(bad, v, nv), mask)  # NaN ignored, as every max of the states
    new_ptr += tl.load(row + NEW_BASE)
    for d in range(tl.load(row + NDIM)):
        size = tl.load(row + SHAPE + d)
        index = (offs // tl.load(row + STRIDE + d)) % size
        # max is commutative and associative on these values (>= 0, no NaN): the same maxima for any order of
        # the programs' atomics, so the same bits on any schedule
        tl.atomic_max(new_ptr + index, nv, mask=mask)
        new_ptr += size


@triton.jit
def _adam4bit_kernel(meta_ptr, prog_ptr, const_ptr, code1_ptr, code2_ptr, mids1_ptr, mids2_ptr, new_ptr, bad_ptr,
                     P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, NONFINITE: tl.constexpr, R: tl.constexpr):
    t, row, blocks, offs, mask, block_ok = program_tile(meta_ptr, prog_ptr, META_FIELDS, R, BLOCK)
    numel = tl.load(row + META_FIELDS - 2)
    k = const_ptr + t * N_CONSTANTS
    p_ptr = storage_ptr(tl.load(row + 0), P_DTYPE)
    p = load_f32(p_ptr, offs, mask, P_DTYPE)
    g, bad = _grad(row, offs, mask, k, G_DTYPE, NONFINITE)
    ndim = tl.load(row + NDIM)
    # The state bits are a run-time value: Triton compiles both branches and joins the names they share, so the
    # 4-bit codes (q*_ptr, uint8) and the float32 moments (f*_ptr) need different names.
    if tl.load(row + META_FIELDS - 1) == 4:
        q1_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
        q2_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
        a1_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        a2_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        m = tl.load(code1_ptr + _nibbles(q1_ptr, offs, mask)) * tl.load(a1_ptr + blocks, mask=block_ok)[:, None]
        if ndim > 0:
            v_scale = _rank1_scale(a2_ptr, row, offs, mask)
        else:
            v_scale = tl.zeros(offs.shape, tl.float32) + tl.load(a2_ptr + blocks, mask=block_ok)[:, None]
        v = tl.load(code2_ptr + _nibbles(q2_ptr, offs, mask)) * v_scale
        nm = tl.fma(tl.load(k + 1), g, m * tl.load(k + 0))
        nv = tl.fma(tl.load(k + 3) * g, g, v * tl.load(k + 2))
        # adam_param_8bit: p * decay + (step * m) / (sqrt(v) / c2 + eps)
        denom = tl.div_rn(tl.sqrt_rn(nv), tl.load(k + 6)) + tl.load(k + 4)
        np = p * tl.load(k + 8) + tl.div_rn(tl.load(k + 7) * nm, denom)
        nm = tl.where(bad, m, nm)
        nv = tl.where(bad, v, nv)
        store_f32(p_ptr, offs, tl.where(bad, p, np), mask, P_DTYPE)
        amax1 = tl.max(masked_abs(nm, mask), axis=1)
        tl.store(a1_ptr + blocks, amax1, mask=block_ok)
        _store_codes(q1_ptr, nm, tl.zeros(offs.shape, tl.float32) + amax1[:, None], mids1_ptr, blocks, offs, numel, R)
        if ndim > 0:
            scale2 = _rank1_scale(new_ptr + tl.load(row + NEW_BASE), row, offs, mask)
        else:
            amax2 = tl.max(masked_abs(nv, mask), axis=1)
            tl.store(a2_ptr + blocks, amax2, mask=block_ok)
            scale2 = tl.zeros(offs.shape, tl.float32) + amax2[:, None]
        _store_codes(q2_ptr, nv, scale2, mids2_ptr, blocks, offs, numel, R)
    else:
        f1_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        f2_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        m = tl.load(f1_ptr + offs, mask=mask, other=0.0)
        v = tl.load(f2_ptr + offs, mask=mask, other=0.0)
        nm = tl.fma(tl.load(k + 1), g, m * tl.load(k + 0))
        nv = tl.fma(tl.load(k + 3) * g, g, v * tl.load(k + 2))
        # adam_param_32bit: fma(step, m / (sqrt(v) + eps * c2), p * decay)
        np = tl.fma(tl.load(k + 7), tl.div_rn(nm, tl.sqrt_rn(nv) + tl.load(k + 5)), p * tl.load(k + 8))
        store_f32(p_ptr, offs, tl.where(bad, p, np), mask, P_DTYPE)
        tl.store(f1_ptr + offs, tl.where(bad, m, nm), mask=mask)
        tl.store(f2_ptr + offs, tl.where(bad, v, nv), mask=mask)
    tl.store(bad_ptr + tl.program_id(0), tl.sum((mask & bad).to(tl.int32)))


def _row(p, g, s1, s2, a1, a2, rank1: bool, new_base: int) -> list[int]:
    """The tensor's row of `meta` (see the module docstring)."""
    shape = list(p.shape) if rank1 else []
    strides, s = [], 1
    for size in reversed(shape):
        strides.insert(0, s)
        s *= size
    pad = [0] * (RANK1_MAX_DIMS - len(shape))
    bits = 4 if s1.dtype == torch.uint8 else 32
    return [t.data_ptr() for t in (p, g, s1, s2, a1, a2)] + [len(shape), new_base] + shape + pad + strides + pad + [
        p.numel(), bits]


def _tiles(numel: int) -> int:
    return triton.cdiv(triton.cdiv(numel, FOURBIT_BLOCK), ROWS)


def _programs(rows) -> list[tuple[int, int]]:
    """program -> (tensor, first block): the rank-1 tensors' programs first (the maxima pass runs that prefix)."""
    order = sorted(range(len(rows)), key=lambda t: rows[t][NDIM.value] == 0)  # stable: table order otherwise
    return [(t, b) for t in order for b in range(0, _tiles(rows[t][-2]) * ROWS, ROWS)]


def adam4bit_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite):
    """The operands checked by the caller (capi.check_adam4bit_operands). Returns the number of skipped elements,
    0-dim int64 on the params' device."""
    if not params:
        return torch.zeros((), dtype=torch.int64)
    device = params[0].device
    total = torch.zeros((), dtype=torch.int64, device=device)
    buckets: dict[tuple, list[int]] = {}  # (param dtype, grad dtype) -> tensor indices: two launches each
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.numel() > 0:
            buckets.setdefault((p.dtype, g.dtype), []).append(i)
    if not buckets:
        return total
    code1, code2 = code1.contiguous(), code2.contiguous()
    mids1, mids2 = ((c[:-1] + c[1:]) * 0.5 for c in (code1, code2))
    consts = constants.to(device=device, dtype=torch.float32).contiguous()
    for (p_dtype, g_dtype), idx in buckets.items():
        rows, maxima, olds = [], [], []  # maxima: the rank-1 tensors' new maxima sizes, olds: their absmax2
        for i in idx:
            rows.append(_row(params[i], grads[i], state1[i], state2[i], absmax1[i], absmax2[i], bool(rank1[i]),
                             sum(maxima)))
            if rank1[i]:
                maxima.append(absmax2[i].numel())
                olds.append(absmax2[i])
        meta, progs = _LAUNCH_TABLES.get(device, rows, _programs)
        k = consts if len(idx) == len(params) else consts[torch.tensor(idx, device=device)].contiguous()
        new = torch.zeros(max(sum(maxima), 1), dtype=torch.float32, device=device)
        counts = torch.empty(progs.shape[0], dtype=torch.int32, device=device)
        g_code, p_code = DTYPE_CODES[g_dtype], DTYPE_CODES[p_dtype]
        rank1_programs = sum(_tiles(row[-2]) for row in rows if row[NDIM.value] > 0)
        if rank1_programs:
            _rank1_maxima_kernel[(rank1_programs,)](meta, progs, k, code2, new, G_DTYPE=g_code,
                                                    NONFINITE=nonfinite, R=ROWS, **LAUNCH)
        _adam4bit_kernel[(progs.shape[0],)](meta, progs, k, code1, code2, mids1, mids2, new, counts,
                                            P_DTYPE=p_code, G_DTYPE=g_code, NONFINITE=nonfinite, R=ROWS, **LAUNCH)
        if olds:
            torch._foreach_copy_(olds, list(new.split(maxima)))
        total += counts.sum(dtype=torch.int64)
    return total
