"""Triton kernel for the fused Adam step with 8-bit (or float32) states (docs/numerics.md section 4).

Multi-tensor: one launch covers every tensor of a call that shares (param dtype, grad dtype), i.e. one
launch per parameter group in the usual case. Triton cannot take a list of tensors, so the host builds
  - `meta` (int64 [n_tensors, 8]): the tensors' addresses, numel and state kind (8 or 32 bits), and
  - `progs` (int32 [n_programs, 2]): for each program, its tensor index and its first 256-element block.
Each program updates ROWS consecutive blocks of one tensor, loading its pointers from `meta` (int64 ->
pointer casts). 8-bit and float32-state tensors share the launch through a branch on the state kind.
Both tables depend only on the tensors' addresses and sizes and are cached. The one-state step
(kernels/one_state.py) launches the same way and shares this module's helpers: `program_tile`, `step_operands`,
`load_state_8bit`, `store_state_8bit`, `store_count` in the kernels, `launch_groups` on the host.

Per element the math is blockwise.h's adam_moments / adam_param_8bit / adam_param_32bit: `tl.fma` where
the contract has fma, `tl.div_rn` / `tl.sqrt_rn` (correctly rounded on a GPU, unlike `/` and `tl.sqrt`),
and launches with `enable_fp_fusion=False` so nothing else is contracted. A block's new absmax is the
max over its updated m (v) kept in registers; no full-size float32 temporaries are written.

The non-finite count comes back as a 0-dim int64 tensor on the parameters' device (no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyquant._contract import CONSTANT_FIELDS, OPTIMIZER_BLOCK
from pyquant.kernels.blockwise import (
    LaunchTables,
    DTYPE_CODES,
    LAUNCH,
    load_f32,
    masked_abs,
    quantize_values,
    rounded_to,
    store_f32,
)

STATE_BLOCK = OPTIMIZER_BLOCK  # block size of the 8-bit states
ADAM_ROWS = 4  # state blocks per program
# Globals a kernel reads must be constexpr (Triton's compiler refuses other globals).
N_CONSTANTS = tl.constexpr(len(CONSTANT_FIELDS))  # columns of `constants`
META_FIELDS = tl.constexpr(8)  # param, grad, state1, state2, absmax1, absmax2 addresses; numel; state bits
_LAUNCH_TABLES = LaunchTables(limit=32)


@triton.jit
def storage_ptr(addr, DTYPE: tl.constexpr):
    """The pointer load_f32/store_f32 expect for storage of DTYPE, from a raw int64 address."""
    if DTYPE == 0:
        ptr = addr.to(tl.pointer_type(tl.float32))
    else:
        ptr = addr.to(tl.pointer_type(tl.int16))
    return ptr


@triton.jit
def program_tile(meta_ptr, prog_ptr, FIELDS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's share of a multi-tensor launch: its tensor `t`, that tensor's row of `meta` (FIELDS int64
    values, numel and state bits last), its ROWS state blocks, their element offsets [ROWS, BLOCK], the mask of
    the elements that exist (the partial last block, blocks past the end) and of the blocks that do."""
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + 2 * pid)  # tensor this program works on
    first = tl.load(prog_ptr + 2 * pid + 1)  # its first state block within that tensor
    row = meta_ptr + t * FIELDS
    numel = tl.load(row + FIELDS - 2)
    blocks = first + tl.arange(0, ROWS)  # state block indices within the tensor
    offs = blocks.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # element indices
    mask = offs < numel
    block_ok = blocks.to(tl.int64) * BLOCK < numel
    return t, row, blocks, offs, mask, block_ok


@triton.jit
def step_operands(row, offs, mask, inv_grad_scale, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                  NONFINITE: tl.constexpr):
    """The parameter (address in column 0 of the tensor's `meta` row) as its pointer and float32 values; the
    gradient (column 1) unscaled as blockwise.h's unscaled_grad (as a separate GradScaler.unscale_ pass would
    have stored it); where the gradient is inf or NaN; and the elements the step writes (not the skipped ones)."""
    p_ptr = storage_ptr(tl.load(row + 0), P_DTYPE)
    p = load_f32(p_ptr, offs, mask, P_DTYPE)
    g_ptr = storage_ptr(tl.load(row + 1), G_DTYPE)
    g = rounded_to(load_f32(g_ptr, offs, mask, G_DTYPE) * inv_grad_scale, G_DTYPE)
    bad = (g.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000  # inf or NaN
    if NONFINITE == 0:
        update = mask & ~bad  # a skipped element keeps its parameter and states
    else:
        update = mask
    return p_ptr, p, g, bad, update


@triton.jit
def load_state_8bit(q_addr, a_addr, code_ptr, blocks, offs, mask, block_ok):
    """An 8-bit state (codes at q_addr, block absmax at a_addr) dequantised: (codes' pointer, absmax pointer,
    float32 values)."""
    q_ptr = q_addr.to(tl.pointer_type(tl.uint8))
    a_ptr = a_addr.to(tl.pointer_type(tl.float32))
    a = tl.load(a_ptr + blocks, mask=block_ok, other=0.0)
    return q_ptr, a_ptr, tl.load(code_ptr + tl.load(q_ptr + offs, mask=mask, other=0)) * a[:, None]


@triton.jit
def store_state_8bit(q_ptr, a_ptr, x, table_ptr, blocks, offs, mask, block_ok):
    """Requantise float32 `x` into an 8-bit state: each block's new absmax over its real elements only
    (masked_abs zeroes the lanes past numel), from registers, then the codes."""
    amax = tl.max(masked_abs(x, mask), axis=1)
    tl.store(a_ptr + blocks, amax, mask=block_ok)
    tl.store(q_ptr + offs, quantize_values(x, amax, table_ptr, mask), mask=mask)


@triton.jit
def store_count(bad_ptr, mask, bad, NONFINITE: tl.constexpr):
    """This program's number of skipped (non-finite) gradient elements: 0 when they propagate."""
    if NONFINITE == 0:
        tl.store(bad_ptr + tl.program_id(0), tl.sum((mask & bad).to(tl.int32)))
    else:
        tl.store(bad_ptr + tl.program_id(0), 0)


@triton.jit
def _adam_kernel(meta_ptr, const_ptr, prog_ptr, code1_ptr, code2_ptr, table1_ptr, table2_ptr, bad_ptr,
                 P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, NONFINITE: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr):
    t, row, blocks, offs, mask, block_ok = program_tile(meta_ptr, prog_ptr, META_FIELDS, ROWS, BLOCK)
    bits = tl.load(row + 7)
    k = const_ptr + t * N_CONSTANTS  # the tensor's row of constants, in pq::AdamConstants order
    beta1 = tl.load(k + 0)
    one_minus_beta1 = tl.load(k + 1)
    beta2 = tl.load(k + 2)
    one_minus_beta2 = tl.load(k + 3)
    eps = tl.load(k + 4)
    eps_c2 = tl.load(k + 5)
    c2 = tl.load(k + 6)
    step_size = tl.load(k + 7)
    decay = tl.load(k + 8)
    inv_grad_scale = tl.load(k + 9)
    p_ptr, p, g, bad, update = step_operands(row, offs, mask, inv_grad_scale, P_DTYPE, G_DTYPE, NONFINITE)

    # `bits` is a run-time value: Triton compiles both branches and joins the names they share, so the 8-bit
    # codes (q*_ptr, uint8) and the float32 moments (f*_ptr) need different names.
    if bits == 8:
        q1_ptr, a1_ptr, m = load_state_8bit(tl.load(row + 2), tl.load(row + 4), code1_ptr, blocks, offs, mask, block_ok)
        q2_ptr, a2_ptr, v = load_state_8bit(tl.load(row + 3), tl.load(row + 5), code2_ptr, blocks, offs, mask, block_ok)
        m_new = tl.fma(one_minus_beta1, g, m * beta1)
        v_new = tl.fma(one_minus_beta2 * g, g, v * beta2)
        denom = tl.div_rn(tl.sqrt_rn(v_new), c2) + eps
        p_new = p * decay
        p_new = p_new + tl.div_rn(step_size * m_new, denom)
        store_f32(p_ptr, offs, p_new, update, P_DTYPE)
        if NONFINITE == 0:
            m_new = tl.where(bad, m, m_new)
            v_new = tl.where(bad, v, v_new)
        store_state_8bit(q1_ptr, a1_ptr, m_new, table1_ptr, blocks, offs, mask, block_ok)
        store_state_8bit(q2_ptr, a2_ptr, v_new, table2_ptr, blocks, offs, mask, block_ok)
    else:
        f1_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        f2_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        m = tl.load(f1_ptr + offs, mask=mask, other=0.0)
        v = tl.load(f2_ptr + offs, mask=mask, other=0.0)
        m_new = tl.fma(one_minus_beta1, g, m * beta1)
        v_new = tl.fma(one_minus_beta2 * g, g, v * beta2)
        u = tl.div_rn(m_new, tl.sqrt_rn(v_new) + eps_c2)
        p_new = tl.fma(step_size, u, p * decay)
        tl.store(f1_ptr + offs, m_new, mask=update)
        tl.store(f2_ptr + offs, v_new, mask=update)
        store_f32(p_ptr, offs, p_new, update, P_DTYPE)

    store_count(bad_ptr, mask, bad, NONFINITE)


def _check(i, device, p, g, s1, s2, a1, a2):
    if p.device != device:
        raise ValueError(f"adam_step: param {i} is on {p.device}, param 0 on {device}; make one call per device")
    for name, t in (("param", p), ("grad", g), ("state1", s1), ("state2", s2), ("absmax1", a1), ("absmax2", a2)):
        if not t.is_contiguous():
            raise ValueError(f"adam_step: {name} of tensor {i} must be contiguous")
        if t.device != p.device:
            raise ValueError(f"adam_step: {name} of tensor {i} is on {t.device}, its param on {p.device}")
    if p.dtype not in DTYPE_CODES or g.dtype not in DTYPE_CODES:
        raise TypeError(f"adam_step: tensor {i} has param {p.dtype} / grad {g.dtype}; need float32/16, bfloat16")
    if g.numel() != p.numel() or s1.numel() != p.numel() or s2.numel() != p.numel():
        raise ValueError(f"adam_step: grad and states of tensor {i} must have its {p.numel()} elements")
    if s1.dtype != s2.dtype or s1.dtype not in (torch.uint8, torch.float32):
        raise TypeError(f"adam_step: states of tensor {i} must both be uint8 or both float32")
    if s1.dtype == torch.uint8:
        blocks = -(-p.numel() // STATE_BLOCK)
        if a1.numel() != blocks or a2.numel() != blocks or a1.dtype != torch.float32 or a2.dtype != torch.float32:
            raise ValueError(f"adam_step: absmax of tensor {i} must be {blocks} float32 values")


def _programs(rows) -> list[tuple[int, int]]:
    """program -> (tensor, first block): ADAM_ROWS blocks of one tensor per program (numel: a row's next-to-last)."""
    return [(t, b) for t, row in enumerate(rows) for b in range(0, -(-row[-2] // STATE_BLOCK), ADAM_ROWS)]


def launch_groups(tensors: list[tuple], constants: torch.Tensor, tables: LaunchTables, launch) -> torch.Tensor:
    """The multi-tensor launches of an optimizer step, shared by adam_step and one_state.one_state_step.

    `tensors`: one (param, grad, state..., absmax...) tuple per tensor, checked by the caller; `constants`: one row
    per tensor. The non-empty tensors are bucketed by (param dtype, grad dtype) and each bucket is one call of
    `launch(grid, meta, constants, progs, counts, P_DTYPE, G_DTYPE)`, where meta's rows are the tuple's addresses,
    then numel and the state bits (8 for uint8 states, else 32), and `counts` gets one non-finite count per program.
    Returns the total count, a 0-dim int64 tensor on the parameters' device."""
    if not tensors:
        return torch.zeros((), dtype=torch.int64)
    device = tensors[0][0].device
    total = torch.zeros((), dtype=torch.int64, device=device)
    buckets: dict[tuple, list[int]] = {}  # (param dtype, grad dtype) -> tensor indices: one launch each
    for i, (p, g, *_) in enumerate(tensors):
        if p.numel() > 0:
            buckets.setdefault((p.dtype, g.dtype), []).append(i)
    if not buckets:
        return total
    consts = constants.to(device=device, dtype=torch.float32).contiguous()
    for (p_dtype, g_dtype), idx in buckets.items():
        group = [tensors[i] for i in idx]
        rows = [[t.data_ptr() for t in ts] + [ts[0].numel(), 8 if ts[2].dtype == torch.uint8 else 32] for ts in group]
        meta, progs = tables.get(device, rows, _programs)
        k = consts if len(idx) == len(tensors) else consts[torch.tensor(idx, device=device)].contiguous()
        counts = torch.empty(progs.shape[0], dtype=torch.int32, device=device)
        launch((progs.shape[0],), meta, k, progs, counts, DTYPE_CODES[p_dtype], DTYPE_CODES[g_dtype])
        total += counts.sum(dtype=torch.int64)
    return total


def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, table1, table2, nonfinite):
    """`table1`, `table2`: the bin -> index tables of code1 and code2 (pyquant.backends.code_tables)."""
    if len(params) == 0:
        return torch.zeros((), dtype=torch.int64)
    device = params[0].device
    if nonfinite not in (0, 1):
        raise ValueError(f"adam_step: nonfinite must be 0 (skip element) or 1 (propagate), got {nonfinite!r}")
    tensors = list(zip(params, grads, state1, state2, absmax1, absmax2))
    for i, group in enumerate(tensors):
        _check(i, device, *group)
    code1, code2 = code1.contiguous(), code2.contiguous()

    def launch(grid, meta, k, progs, counts, p_dtype, g_dtype):
        _adam_kernel[grid](
            meta, k, progs, code1, code2, table1, table2, counts,
            P_DTYPE=p_dtype, G_DTYPE=g_dtype, NONFINITE=nonfinite, ROWS=ADAM_ROWS, BLOCK=STATE_BLOCK, **LAUNCH,
        )

    return launch_groups(tensors, constants, _LAUNCH_TABLES, launch)
