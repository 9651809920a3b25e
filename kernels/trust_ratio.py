"""Triton kernels of the norm passes of LAMB's and LARS' trust ratios (docs/numerics.md, "LAMB and LARS"): the ops
pyquant::lamb_norms and pyquant::lars_norms.

Launched as kernels/adam.py's step (`launch_groups`: one launch per (param dtype, grad dtype), the tensors' addresses
in `meta`, ADAM_ROWS blocks of 256 per program), with one more address per tensor: a float64 buffer of two values per
block. Each program writes, for each of its blocks, the sum of p^2 and of the direction's squares (r for LAMB, d for
LARS; 0 for masked lanes and, under skip, non-finite gradient elements), each square in float64 (exact) and each
block summed by halving: x[i] + x[i + h] for h = 128, ..., 1, as a reshape to (rows, 2, h) and a sum over the
axis of two (a two-element sum is one addition, the same in any order). The tensors' block sums are then summed by
halving on the host side (pyquant.backends.triton.optimizer), so the sums are those of the C++ library and the
reference, bit for bit.

Per element the math is blockwise.h's adam_moments and lamb_direction (LAMB) or decayed_grad (LARS), with
`tl.fma`, `tl.div_rn` and `tl.sqrt_rn` and launches with `enable_fp_fusion=False`, as the steps. Nothing but the
block sums is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyquant._contract import CONSTANT_FIELDS, ONE_STATE_FIELDS, OPTIMIZER_BLOCK, blocks_of
from pyquant.kernels.adam import ADAM_ROWS, STATE_BLOCK, launch_groups, load_state_8bit, program_tile, step_operands
from pyquant.kernels.blockwise import LAUNCH, LaunchTables

N_ADAM = tl.constexpr(len(CONSTANT_FIELDS))  # columns of LAMB's constants (pq::AdamConstants)
N_ONE_STATE = tl.constexpr(len(ONE_STATE_FIELDS))  # columns of LARS' constants (pq::OneStateConstants)
LAMB_META = tl.constexpr(9)  # param, grad, state1, state2, absmax1, absmax2, sums addresses; numel; state bits
LARS_META = tl.constexpr(5)  # param, grad, sums addresses; numel; state bits (unused)
_LAUNCH_TABLES = LaunchTables(limit=32)
# The kernels read the constants by column: the columns they assume.
assert CONSTANT_FIELDS[:5] == ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps"), CONSTANT_FIELDS
assert (CONSTANT_FIELDS[6], *CONSTANT_FIELDS[9:]) == ("c2", "inv_grad_scale", "inv_c1", "weight_decay"), CONSTANT_FIELDS
assert (ONE_STATE_FIELDS[7], ONE_STATE_FIELDS[8], ONE_STATE_FIELDS[10]) == ("weight_decay", "grad_decay",
                                                                             "inv_grad_scale"), ONE_STATE_FIELDS


@triton.jit
def halve(x, ROWS: tl.constexpr, HALF: tl.constexpr):
    """x[r, i] + x[r, i + HALF] for i < HALF (x: [ROWS, 2 * HALF]): [r, 0, i] is x[r, i], [r, 1, i] x[r, i + HALF]."""
    return tl.sum(tl.reshape(x, (ROWS, 2, HALF)), axis=1)


@triton.jit
def halving_sum(x, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Each row's sum (x: [ROWS, BLOCK], BLOCK 256) by halving, blockwise.h halving_sum's order; unrolled (a constexpr
    cannot change inside a loop)."""
    tl.static_assert(BLOCK == 256)
    x = halve(halve(halve(halve(x, ROWS, 128), ROWS, 64), ROWS, 32), ROWS, 16)
    x = halve(halve(halve(halve(x, ROWS, 8), ROWS, 4), ROWS, 2), ROWS, 1)
    return tl.reshape(x, (ROWS,))


@triton.jit
def store_block_sums(sums_addr, blocks, block_ok, p, d, keep, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Each block's sums of p^2 and d^2 over the lanes in `keep` (d) or in range (p: masked lanes load as 0)."""
    sums_ptr = sums_addr.to(tl.pointer_type(tl.float64))
    pd = p.to(tl.float64)
    dd = tl.where(keep, d, 0.0).to(tl.float64)
    tl.store(sums_ptr + 2 * blocks, halving_sum(pd * pd, ROWS, BLOCK), mask=block_ok)
    tl.store(sums_ptr + 2 * blocks + 1, halving_sum(dd * dd, ROWS, BLOCK), mask=block_ok)


@triton.jit
def _lamb_norms_kernel(meta_ptr, const_ptr, prog_ptr, code1_ptr, code2_ptr, counts_ptr,
                       P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, NONFINITE: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr):
    t, row, blocks, offs, mask, block_ok = program_tile(meta_ptr, prog_ptr, LAMB_META, ROWS, BLOCK)
    bits = tl.load(row + 8)
    k = const_ptr + t * N_ADAM  # the tensor's row of constants, in pq::AdamConstants order
    _, p, g, bad, update = step_operands(row, offs, mask, tl.load(k + 9), P_DTYPE, G_DTYPE, NONFINITE)
    if bits == 8:
        q1_ptr, a1_ptr, m = load_state_8bit(tl.load(row + 2), tl.load(row + 4), code1_ptr, blocks, offs, mask, block_ok)
        q2_ptr, a2_ptr, v = load_state_8bit(tl.load(row + 3), tl.load(row + 5), code2_ptr, blocks, offs, mask, block_ok)
    else:
        m = tl.load(tl.load(row + 2).to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
        v = tl.load(tl.load(row + 3).to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    m = tl.fma(tl.load(k + 1), g, m * tl.load(k + 0))  # blockwise.h adam_moments
    v = tl.fma(tl.load(k + 3) * g, g, v * tl.load(k + 2))
    r = tl.div_rn(m * tl.load(k + 10), tl.div_rn(tl.sqrt_rn(v), tl.load(k + 6)) + tl.load(k + 4))  # lamb_direction
    wd = tl.load(k + 11)
    r = tl.where(wd > 0.0, tl.fma(wd, p, r), r)
    store_block_sums(tl.load(row + 6), blocks, block_ok, p, r, update, ROWS, BLOCK)
    tl.store(counts_ptr + tl.program_id(0), 0)  # launch_groups' non-finite counts: the steps count, not this pass


@triton.jit
def _lars_norms_kernel(meta_ptr, const_ptr, prog_ptr, counts_ptr,
                       P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, NONFINITE: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr):
    t, row, blocks, offs, mask, block_ok = program_tile(meta_ptr, prog_ptr, LARS_META, ROWS, BLOCK)
    k = const_ptr + t * N_ONE_STATE  # the tensor's row of constants, in pq::OneStateConstants order
    _, p, g, bad, update = step_operands(row, offs, mask, tl.load(k + 10), P_DTYPE, G_DTYPE, NONFINITE)
    d = tl.where(tl.load(k + 8) != 0.0, tl.fma(tl.load(k + 7), p, g), g)  # blockwise.h decayed_grad
    store_block_sums(tl.load(row + 2), blocks, block_ok, p, d, update, ROWS, BLOCK)
    tl.store(counts_ptr + tl.program_id(0), 0)


def _block_sums_buffers(params) -> list[torch.Tensor]:
    return [torch.zeros(2 * blocks_of(p.numel(), OPTIMIZER_BLOCK), dtype=torch.float64, device=p.device)
            for p in params]


def lamb_block_sums(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    """Per tensor, its blocks' (sum of p^2, sum of r^2) pairs: float64 [2 * blocks]. Operands checked by the caller
    (capi.check_adam_operands)."""
    sums = _block_sums_buffers(params)
    code1, code2 = code1.contiguous(), code2.contiguous()

    def launch(grid, meta, k, progs, counts, p_dtype, g_dtype):
        _lamb_norms_kernel[grid](meta, k, progs, code1, code2, counts, P_DTYPE=p_dtype, G_DTYPE=g_dtype,
                                 NONFINITE=nonfinite, ROWS=ADAM_ROWS, BLOCK=STATE_BLOCK, **LAUNCH)

    launch_groups(list(zip(params, grads, state1, state2, absmax1, absmax2, sums)), constants, _LAUNCH_TABLES, launch)
    return sums


def lars_block_sums(params, grads, constants, nonfinite):
    """lamb_block_sums for LARS' direction d = g + wd p (capi.check_lars_norms_operands checked the operands)."""
    sums = _block_sums_buffers(params)

    def launch(grid, meta, k, progs, counts, p_dtype, g_dtype):
        _lars_norms_kernel[grid](meta, k, progs, counts, P_DTYPE=p_dtype, G_DTYPE=g_dtype, NONFINITE=nonfinite,
                                 ROWS=ADAM_ROWS, BLOCK=STATE_BLOCK, **LAUNCH)

    launch_groups(list(zip(params, grads, sums)), constants, _LAUNCH_TABLES, launch)
    return sums
