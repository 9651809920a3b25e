"""Triton kernel for GradScaler's unscale-and-check (`pyquant::unscale_`, launched by pyquant.backends.triton.amp).

Per element it is torch's `_amp_foreach_non_finite_check_and_unscale_`: widen the gradient to float32
(float64 stays float64), a non-finite value (inf or NaN) sets found_inf to 1.0, the result is
`v if inv_scale == 1.0 else v * inv_scale` rounded once back to the gradient's dtype, in place.
Non-finite values stay non-finite (NaN payloads are not part of the contract: torch's own CPU kernel
writes 0x7FC0 or 0xFFFF for a bfloat16 NaN depending on where the element sits).

Multi-tensor: ONE launch covers every gradient of a call, whatever their dtypes. Triton cannot take a
list of tensors, so the host builds (as pyquant.kernels.adam does)
  - `meta` (int64 [n_tensors, 3]): address, numel and dtype code of each gradient, and
  - `progs` (int32 [n_programs, 2]): each program's tensor index and block index within that tensor;
each program branches on its tensor's dtype code at run time. Both tables depend only on the tensors'
addresses, sizes and dtypes, and are cached. found_inf is written only by programs that saw a
non-finite value, and only with 1.0, so concurrent writes cannot disagree; nothing syncs with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyquant._contract import DTYPE_CODES
from pyquant.kernels.blockwise import LAUNCH, LaunchTables, load_f32, store_f32

BLOCK = 1024  # elements per program
_LAUNCH_TABLES = LaunchTables(limit=16)


@triton.jit
def _nonfinite32(x):
    return (x.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit
def _unscale_16_or_32(addr, offs, mask, inv, DTYPE: tl.constexpr):
    """Unscale one block stored as DTYPE (F32, F16 or BF16) through float32; returns its non-finite mask."""
    if DTYPE == 0:
        ptr = addr.to(tl.pointer_type(tl.float32))
    else:
        ptr = addr.to(tl.pointer_type(tl.int16))  # 16-bit floats are handled as bit patterns
    x = load_f32(ptr, offs, mask, DTYPE)
    store_f32(ptr, offs, tl.where(inv == 1.0, x, x * inv), mask, DTYPE)
    return mask & _nonfinite32(x)


@triton.jit
def _unscale_kernel(meta_ptr, prog_ptr, found_ptr, inv_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + 2 * pid)  # the tensor this program works on
    block = tl.load(prog_ptr + 2 * pid + 1)  # its block within that tensor
    addr = tl.load(meta_ptr + 3 * t)
    numel = tl.load(meta_ptr + 3 * t + 1)
    code = tl.load(meta_ptr + 3 * t + 2)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    inv = tl.load(inv_ptr)  # float32
    if code == 0:
        bad = _unscale_16_or_32(addr, offs, mask, inv, 0)
    elif code == 1:
        bad = _unscale_16_or_32(addr, offs, mask, inv, 1)
    elif code == 2:
        bad = _unscale_16_or_32(addr, offs, mask, inv, 2)
    else:  # float64: torch's opmath is double, the float32 inv_scale widens exactly
        ptr = addr.to(tl.pointer_type(tl.float64))
        x = tl.load(ptr + offs, mask=mask, other=0.0)
        tl.store(ptr + offs, tl.where(inv == 1.0, x, x * inv.to(tl.float64)), mask=mask)
        bad = mask & ((x.to(tl.uint64, bitcast=True) & 0x7FF0000000000000) == 0x7FF0000000000000)
    any_bad = tl.max(bad.to(tl.int32), axis=0)
    tl.store(found_ptr, 1.0, mask=any_bad > 0)


def _tables(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [(g.data_ptr(), g.numel(), DTYPE_CODES[g.dtype]) for g in grads]
    return _LAUNCH_TABLES.get(grads[0].device, rows, lambda rows: [
        (t, b) for t, (_, numel, _) in enumerate(rows) for b in range(triton.cdiv(numel, BLOCK))])


def unscale_(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """In place: grads *= inv_scale (skipped where inv_scale == 1), found_inf = 1.0 if any is non-finite.

    All grads on found_inf's device, any mix of float32/float16/bfloat16/float64; found_inf and
    inv_scale float32 with one element. One kernel launch for the whole list.
    """
    device = found_inf.device
    for i, g in enumerate(grads):
        if g.device != device:
            raise ValueError(f"unscale_: grad {i} is on {g.device}, found_inf on {device}; make one call per device")
        if g.dtype not in DTYPE_CODES:
            raise TypeError(f"unscale_: grad {i} is {g.dtype}; need float32, float16, bfloat16 or float64")
    # The kernel addresses dense storage: a non-contiguous grad is unscaled in a contiguous copy.
    work = [g if g.is_contiguous() else g.contiguous() for g in grads]
    live = [w for w in work if w.numel() > 0]
    if live:
        meta, progs = _tables(live)
        _unscale_kernel[(progs.shape[0],)](
            meta, progs, found_inf, inv_scale.to(device=device, dtype=torch.float32).reshape(1),
            BLOCK=BLOCK, **LAUNCH,
        )
    for g, w in zip(grads, work):
        if w is not g:
            g.copy_(w)
