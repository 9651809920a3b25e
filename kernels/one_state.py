"""Triton kernel for the fused step of the one-state 8-bit optimizers (docs/numerics.md, "The one-state rules"):
Lion8bit, SGD8bit (momentum), RMSprop8bit, Adagrad8bit; the op pyquant::one_state_step_.

Launched as kernels/adam.py's step, whose helpers it shares: one launch per (param dtype, grad dtype) group of a
call, the tensors' addresses in `meta` (int64 [n_tensors, 6]: param, grad, state1, absmax1, numel, state bits) and
each program's (tensor, first block) in `progs`; 8-bit and float32-state tensors share a launch through a branch
on the state kind. The rule is a constexpr, so each rule compiles its own kernel with only its own arithmetic.

Per element the math is blockwise.h's one_state_first / one_state_param, in the contract's order: the state (and
the decayed gradient or parameter) first, then the square root (RMSprop, Adagrad), then the parameter, then the
requantisation of the 8-bit state with the block's new absmax from registers. `tl.fma` exactly where the contract
has fma, `tl.div_rn` / `tl.sqrt_rn`, and launches with `enable_fp_fusion=False` so nothing else is contracted.
Under skip, a non-finite gradient element keeps its parameter and state (the kept state still counts in the
block's new absmax) and is counted; the count is a 0-dim int64 tensor on the parameters' device.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pyquant._contract import ONE_STATE_FIELDS, ONE_STATE_RULES
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
N_CONSTANTS = tl.constexpr(len(ONE_STATE_FIELDS))  # columns of `constants`, in pq::OneStateConstants order
META_FIELDS = tl.constexpr(6)  # param, grad, state1, absmax1 addresses; numel; state bits
MOMENTUM = tl.constexpr(ONE_STATE_RULES["momentum"])
LION = tl.constexpr(ONE_STATE_RULES["lion"])
RMSPROP = tl.constexpr(ONE_STATE_RULES["rmsprop"])
_LAUNCH_TABLES = LaunchTables(limit=32)
# The kernels read the constants by column: the columns they assume.
assert ONE_STATE_FIELDS == ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "neg_lr", "decay",
                            "weight_decay", "grad_decay", "first_step", "inv_grad_scale", "trust_ratio"), ONE_STATE_FIELDS


@triton.jit
def torch_sign(x):
    """torch.sign on the bits (blockwise.h torch_sign): +-1 with x's sign, +0 for +-0 and NaN."""
    u = x.to(tl.uint32, bitcast=True)
    magnitude = u & 0x7FFFFFFF
    keep = (magnitude != 0) & (magnitude <= 0x7F800000)
    return tl.where(keep, (u & 0x80000000) | 0x3F800000, 0).to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def one_state_update(p, g, s, k, RULE: tl.constexpr, EIGHT_BIT: tl.constexpr):
    """(new parameter, new state) in float32: blockwise.h one_state_first then one_state_param, for the row of
    constants at `k` (ONE_STATE_FIELDS order)."""
    beta1 = tl.load(k + 0)
    one_minus_beta1 = tl.load(k + 1)
    neg_lr = tl.load(k + 5)
    if RULE == LION:
        p = p * tl.load(k + 6)  # decay
        if EIGHT_BIT:
            u = s * beta1 + g * one_minus_beta1
        else:
            u = tl.fma(one_minus_beta1, g, s * beta1)
        s_new = tl.fma(tl.load(k + 3), g, s * tl.load(k + 2))  # one_minus_beta2, beta2
        p_new = tl.fma(neg_lr, torch_sign(u), p)
    else:
        grad_decay = tl.load(k + 8)
        g = tl.where(grad_decay != 0.0, tl.fma(tl.load(k + 7), p, g), g)  # weight_decay
        if RULE == MOMENTUM:
            g = g * tl.load(k + 11)  # trust_ratio: LARS' ratio; SGD's is 1, an exact no-op
            s_new = tl.where(tl.load(k + 9) != 0.0, g, s * beta1 + g)  # first_step: s = g
            p_new = tl.fma(neg_lr, s_new, p)
        else:
            if RULE == RMSPROP:
                s_new = tl.fma(one_minus_beta1 * g, g, s * beta1)
            else:  # Adagrad
                s_new = tl.fma(g, g, s)
            denom = tl.sqrt_rn(s_new) + tl.load(k + 4)  # eps
            if EIGHT_BIT:
                p_new = p + tl.div_rn(neg_lr * g, denom)
            else:
                p_new = tl.fma(neg_lr, tl.div_rn(g, denom), p)
    return p_new, s_new


@triton.jit
def _one_state_kernel(meta_ptr, const_ptr, prog_ptr, code_ptr, table_ptr, bad_ptr,
                      RULE: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, NONFINITE: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr):
    t, row, blocks, offs, mask, block_ok = program_tile(meta_ptr, prog_ptr, META_FIELDS, ROWS, BLOCK)
    bits = tl.load(row + 5)
    k = const_ptr + t * N_CONSTANTS  # the tensor's row of constants
    p_ptr, p, g, bad, update = step_operands(row, offs, mask, tl.load(k + 10), P_DTYPE, G_DTYPE, NONFINITE)

    # `bits` is a run-time value: both branches are compiled, so the uint8 codes and the float32 state need
    # different names (see adam.py).
    if bits == 8:
        q_ptr, a_ptr, s = load_state_8bit(tl.load(row + 2), tl.load(row + 3), code_ptr, blocks, offs, mask, block_ok)
        p_new, s_new = one_state_update(p, g, s, k, RULE, True)
        store_f32(p_ptr, offs, p_new, update, P_DTYPE)
        if NONFINITE == 0:
            s_new = tl.where(bad, s, s_new)
        store_state_8bit(q_ptr, a_ptr, s_new, table_ptr, blocks, offs, mask, block_ok)
    else:
        f_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        s = tl.load(f_ptr + offs, mask=mask, other=0.0)
        p_new, s_new = one_state_update(p, g, s, k, RULE, False)
        tl.store(f_ptr + offs, s_new, mask=update)
        store_f32(p_ptr, offs, p_new, update, P_DTYPE)

    store_count(bad_ptr, mask, bad, NONFINITE)


def one_state_step(params, grads, state1, absmax1, constants, code1, table1, rule, nonfinite):
    """The operands checked by the caller (capi.check_one_state_operands); `table1`: code1's bin -> index table
    (pyquant.backends.code_tables). Returns the number of skipped elements, 0-dim int64 on the params' device."""
    code1 = code1.contiguous()

    def launch(grid, meta, k, progs, counts, p_dtype, g_dtype):
        _one_state_kernel[grid](
            meta, k, progs, code1, table1, counts, RULE=rule, P_DTYPE=p_dtype, G_DTYPE=g_dtype, NONFINITE=nonfinite,
            ROWS=ADAM_ROWS, BLOCK=STATE_BLOCK, **LAUNCH,
        )

    return launch_groups(list(zip(params, grads, state1, absmax1)), constants, _LAUNCH_TABLES, launch)
