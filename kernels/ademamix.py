"""Triton kernel for the fused AdEMAMix step (docs/numerics.md, "AdEMAMix"): AdEMAMix8bit and AdEMAMix with float32
states; the op pyquant::ademamix_step_.

Launched as kernels/adam.py's step, whose helpers it shares: one launch per (param dtype, grad dtype) group of a
call, the tensors' addresses in `meta` (int64 [n_tensors, 8]: param, grad, state1, state2, absmax1, absmax2, numel,
state bits) and each program's (tensor, first block) in `progs`. state1 holds the fast EMA m1 then the slow EMA m2,
numel elements apart; for 8-bit states absmax1 holds their block scales, one tensor's block count apart.

Per element the math is blockwise.h's ademamix_moments / ademamix_param_given_sqrt: `tl.fma` exactly where the
contract has fma, `tl.div_rn` / `tl.sqrt_rn`, launches with `enable_fp_fusion=False`. Under skip, a non-finite
gradient element keeps its parameter and states (the kept states still count in the blocks' new scales) and is
counted; the count is a 0-dim int64 tensor on the parameters' device.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pyquant._contract import ADEMAMIX_FIELDS
from pyquant.kernels.adam import (
    ADAM_ROWS,
    STATE_BLOCK,
    launch_groups,
    load_state_8bit,
    program_tile,
    step_operands,
    store_count,
    store_state_8bit,
)
from pyquant.kernels.blockwise import LAUNCH, LaunchTables, store_f32

# Globals a kernel reads must be constexpr.
N_CONSTANTS = tl.constexpr(len(ADEMAMIX_FIELDS))  # columns of `constants`, in pq::AdemamixConstants order
META_FIELDS = tl.constexpr(8)  # param, grad, state1, state2, absmax1, absmax2 addresses; numel; state bits
_LAUNCH_TABLES = LaunchTables(limit=32)
# The kernel reads the constants by column: the columns it assumes.
assert ADEMAMIX_FIELDS == ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta3", "one_minus_beta3",
                           "alpha", "eps", "c1", "c2", "neg_lr", "decay", "inv_grad_scale"), ADEMAMIX_FIELDS


@triton.jit
def ademamix_update(p, g, m1, m2, nu, k):
    """(new parameter, m1, m2, nu) in float32 for the row of constants at `k`: blockwise.h's ademamix_moments, then
    p * decay + (-lr) * ((m1 / c1 + alpha * m2) / (sqrt(nu) / c2 + eps)) with the last step fused."""
    m1 = tl.fma(tl.load(k + 1), g, m1 * tl.load(k + 0))
    m2 = tl.fma(tl.load(k + 5), g, m2 * tl.load(k + 4))
    nu = tl.fma(tl.load(k + 3) * g, g, nu * tl.load(k + 2))
    mixed = tl.div_rn(m1, tl.load(k + 8)) + tl.load(k + 6) * m2
    denom = tl.div_rn(tl.sqrt_rn(nu), tl.load(k + 9)) + tl.load(k + 7)
    p_new = tl.fma(tl.load(k + 10), tl.div_rn(mixed, denom), p * tl.load(k + 11))
    return p_new, m1, m2, nu


@triton.jit
def _ademamix_kernel(meta_ptr, const_ptr, prog_ptr, code1_ptr, code2_ptr, table1_ptr, table2_ptr, bad_ptr,
                     P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, NONFINITE: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    t, row, blocks, offs, mask, block_ok = program_tile(meta_ptr, prog_ptr, META_FIELDS, ROWS, BLOCK)
    numel = tl.load(row + 6)
    bits = tl.load(row + 7)
    k = const_ptr + t * N_CONSTANTS  # the tensor's row of constants
    p_ptr, p, g, bad, update = step_operands(row, offs, mask, tl.load(k + 12), P_DTYPE, G_DTYPE, NONFINITE)

    # `bits` is a run-time value: both branches are compiled, so the uint8 codes and the float32 states need
    # different names (see adam.py).
    if bits == 8:
        s1_addr, a1_addr = tl.load(row + 2), tl.load(row + 4)
        n_blocks = (numel + BLOCK - 1) // BLOCK
        q1_ptr, a1_ptr, m1 = load_state_8bit(s1_addr, a1_addr, code1_ptr, blocks, offs, mask, block_ok)
        # m2: its codes numel bytes after m1's, its scales n_blocks floats (4 bytes each) after m1's
        q2_ptr, a2_ptr, m2 = load_state_8bit(s1_addr + numel, a1_addr + 4 * n_blocks, code1_ptr, blocks, offs, mask,
                                             block_ok)
        q3_ptr, a3_ptr, nu = load_state_8bit(tl.load(row + 3), tl.load(row + 5), code2_ptr, blocks, offs, mask,
                                             block_ok)
        p_new, m1_new, m2_new, nu_new = ademamix_update(p, g, m1, m2, nu, k)
        store_f32(p_ptr, offs, p_new, update, P_DTYPE)
        if NONFINITE == 0:
            m1_new = tl.where(bad, m1, m1_new)
            m2_new = tl.where(bad, m2, m2_new)
            nu_new = tl.where(bad, nu, nu_new)
        store_state_8bit(q1_ptr, a1_ptr, m1_new, table1_ptr, blocks, offs, mask, block_ok)
        store_state_8bit(q2_ptr, a2_ptr, m2_new, table1_ptr, blocks, offs, mask, block_ok)
        store_state_8bit(q3_ptr, a3_ptr, nu_new, table2_ptr, blocks, offs, mask, block_ok)
    else:
        f1_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        f3_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        f_m1 = tl.load(f1_ptr + offs, mask=mask, other=0.0)
        f_m2 = tl.load(f1_ptr + numel + offs, mask=mask, other=0.0)
        f_nu = tl.load(f3_ptr + offs, mask=mask, other=0.0)
        f_p, f_m1, f_m2, f_nu = ademamix_update(p, g, f_m1, f_m2, f_nu, k)
        tl.store(f1_ptr + offs, f_m1, mask=update)
        tl.store(f1_ptr + numel + offs, f_m2, mask=update)
        tl.store(f3_ptr + offs, f_nu, mask=update)
        store_f32(p_ptr, offs, f_p, update, P_DTYPE)

    store_count(bad_ptr, mask, bad, NONFINITE)


def ademamix_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, table1, table2, nonfinite):
    """The operands checked by the caller (capi.check_ademamix_operands); `table1`, `table2`: the bin -> index
    tables of code1 and code2 (pyquant.backends.code_tables). Returns the number of skipped elements, 0-dim int64
    on the params' device."""
    code1, code2 = code1.contiguous(), code2.contiguous()

    def launch(grid, meta, k, progs, counts, p_dtype, g_dtype):
        _ademamix_kernel[grid](
            meta, k, progs, code1, code2, table1, table2, counts,
            P_DTYPE=p_dtype, G_DTYPE=g_dtype, NONFINITE=nonfinite, ROWS=ADAM_ROWS, BLOCK=STATE_BLOCK, **LAUNCH,
        )

    return launch_groups(list(zip(params, grads, state1, state2, absmax1, absmax2)), constants, _LAUNCH_TABLES,
                         launch)
