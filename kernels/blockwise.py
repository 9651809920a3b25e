"""Triton kernels for block-wise 8-bit quantisation (docs/numerics.md sections 2 and 3).

The per-element math follows csrc/include/pyquant/blockwise.h operation by operation. Kernels are
launched with `enable_fp_fusion=False` so that no a*b+c is contracted into an fma; float32 division and
square root use `tl.div_rn` / `tl.sqrt_rn`, which are correctly rounded on a GPU (plain `/` and
`tl.sqrt` are approximate there). Triton's interpreter computes with numpy and cannot show that
difference, so it holds by construction.

Storage conversions do not rely on Triton's casts for bfloat16: the interpreter truncates float32 ->
bfloat16 and mishandles bfloat16 subnormals, so bfloat16 is converted with integer bit operations (exact
widening; round to nearest even on store, as torch's `.to()`). float16 uses Triton's casts (exact
widening; `cvt.rn` on a GPU, numpy's round-to-nearest-even under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyquant._contract import DTYPE_CODES, GRID_POINTS

# The storage dtype codes as the kernels' constexpr arguments (enum pq_dtype of capi.h).
F32, F16, BF16 = DTYPE_CODES[torch.float32], DTYPE_CODES[torch.float16], DTYPE_CODES[torch.bfloat16]
TABLE_BLOCK = 4096  # bins per code-table program
QUANT_TILE = 4096  # elements per quantize program: ROWS blocks x COLS columns
DEQUANT_BLOCK = 1024  # elements per dequantize program
NUM_WARPS = 4
LAUNCH = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}  # never contract a*b+c (the contract's rule)


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels address: float32 as is, 16-bit floats as their int16 bit patterns."""
    return t if t.dtype == torch.float32 else t.view(torch.int16)


# ---- storage conversions ----
class LaunchTables:
    """The host tables of a multi-tensor launch (Triton cannot take a list of tensors): `meta`, one int64 row per
    tensor (addresses, sizes, kinds), and `progs`, one int32 (tensor, block) pair per program. They depend only
    on the rows, so the last `limit` pairs are kept: a training loop steps the same tensors every time."""

    def __init__(self, limit: int):
        self.limit = limit
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device, rows: list, programs) -> tuple[torch.Tensor, torch.Tensor]:
        """(meta, progs) on `device` for `rows`; `programs(rows)` lists the (tensor, block) pairs on a miss."""
        key = (str(device), *(value for row in rows for value in row))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        meta = torch.tensor(rows, dtype=torch.int64).to(device)
        progs = torch.tensor(programs(rows), dtype=torch.int32).reshape(-1, 2).to(device)
        if len(self.cache) >= self.limit:
            self.cache.pop(next(iter(self.cache)))  # the oldest
        self.cache[key] = (meta, progs)
        return meta, progs


@triton.jit
def load_f32(ptr, offs, mask, DTYPE: tl.constexpr):
    """Load storage of DTYPE (F32: float32 pointer; F16/BF16: int16 pointer) as float32, exactly."""
    if DTYPE == 0:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    elif DTYPE == 1:
        x = tl.load(ptr + offs, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        # bfloat16 is the high half of a float32: zero-extend the 16 bits and shift them up.
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        x = (bits << 16).to(tl.float32, bitcast=True)
    return x


@triton.jit
def float_to_bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even; a NaN stays a quiet NaN (blockwise.h)."""
    u = x.to(tl.uint32, bitcast=True)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    # Adding 0x7FFF plus the lowest kept bit rounds the 16 dropped bits to nearest, ties to even.
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    bits = tl.where(is_nan, (u >> 16) | 0x40, rounded)
    return bits.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def rounded_to(x, DTYPE: tl.constexpr):
    """float32 `x` rounded once to DTYPE's precision, as float32: what store_f32 then load_f32 give."""
    if DTYPE == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif DTYPE == 2:
        x = (float_to_bf16_bits(x).to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x


@triton.jit
def store_f32(ptr, offs, x, mask, DTYPE: tl.constexpr):
    """Store float32 `x` to storage of DTYPE with one round-to-nearest-even rounding."""
    if DTYPE == 0:
        tl.store(ptr + offs, x, mask=mask)
    elif DTYPE == 1:
        tl.store(ptr + offs, x.to(tl.float16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, float_to_bf16_bits(x), mask=mask)


# ---- quantisation math (blockwise.h) ----
@triton.jit
def masked_abs(x, mask):
    """|x| with NaN (and masked-off lanes) as 0, so a max over it ignores NaN and counts inf."""
    a = tl.abs(x)
    return tl.where(mask & (a == a), a, 0.0)


@triton.jit
def block_inverse(absmax):
    """1 / absmax per block (correctly rounded); an all-zero block gets 1 (its codes are forced to 0)."""
    return tl.div_rn(1.0, tl.where(absmax == 0.0, 1.0, absmax))


@triton.jit
def grid_bin(x, inv):
    """blockwise.h grid_bin: y = clamp(x * inv, -1, 1) (NaN passes), bin = trunc(((y+1)*0.5)*65535 + 0.5)."""
    y = x * inv
    y = tl.where(y > 1.0, 1.0, y)
    y = tl.where(y < -1.0, -1.0, y)
    t = (y + 1.0) * 0.5
    s = t * 65535.0 + 0.5
    s = tl.where(s != s, 0.0, s)  # NaN -> bin 0
    return s.to(tl.int32) & 0xFFFF  # s is in [0.5, 65535.5]: truncation is the contract's rounding


@triton.jit
def quantize_values(x, absmax, table_ptr, mask):
    """Codes of `x` ([ROWS, COLS]) against per-row `absmax` ([ROWS]), looked up in the bin table."""
    inv = block_inverse(absmax)[:, None]
    q = tl.load(table_ptr + grid_bin(x, inv), mask=mask, other=0)
    return tl.where((absmax == 0.0)[:, None], 0, q).to(tl.uint8)


@triton.jit
def _code_table_kernel(code_ptr, table_ptr, BLOCK: tl.constexpr):
    # table[bin] = number of midpoints (code[j] + code[j+1]) * 0.5, j = 0..254, strictly below the bin's
    # centre (2*bin)/65535 - 1: blockwise.h code_index_of_bin, a binary search of 8 halvings of [0, 255].
    bins = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    centre = tl.div_rn((2 * bins).to(tl.float32), 65535.0) - 1.0  # 2*bin < 2^24: exact in float32
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.full([BLOCK], 255, dtype=tl.int32)
    for _ in tl.static_range(8):
        active = lo < hi  # a finished search has lo == hi, and its mid could be 255 (no midpoint 255)
        mid = (lo + hi) >> 1
        midpoint = (tl.load(code_ptr + mid, mask=active, other=0.0)
                    + tl.load(code_ptr + mid + 1, mask=active, other=0.0)) * 0.5
        below = midpoint < centre
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    tl.store(table_ptr + bins, lo.to(tl.uint8))


@triton.jit
def _quantize_kernel(x_ptr, table_ptr, q_ptr, absmax_ptr, n, blocksize, nblocks,
                     DTYPE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # One program quantises ROWS consecutive blocks; a block longer than COLS is walked in chunks of COLS,
    # once for its absmax and once more for its codes.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # block indices
    row_ok = rows < nblocks  # the last program may have rows past the last block
    start = rows.to(tl.int64) * blocksize  # first element of each block
    cols = tl.arange(0, COLS)
    amax = tl.zeros([ROWS], dtype=tl.float32)
    for c0 in range(0, blocksize, COLS):
        col = c0 + cols  # position inside the block
        offs = start[:, None] + col[None, :]
        mask = row_ok[:, None] & (col < blocksize)[None, :] & (offs < n)  # (offs < n): partial last block
        x = load_f32(x_ptr, offs, mask, DTYPE)
        amax = tl.maximum(amax, tl.max(masked_abs(x, mask), axis=1))
    tl.store(absmax_ptr + rows, amax, mask=row_ok)
    for c0 in range(0, blocksize, COLS):
        col = c0 + cols
        offs = start[:, None] + col[None, :]
        mask = row_ok[:, None] & (col < blocksize)[None, :] & (offs < n)
        x = load_f32(x_ptr, offs, mask, DTYPE)
        tl.store(q_ptr + offs, quantize_values(x, amax, table_ptr, mask), mask=mask)


@triton.jit
def _dequantize_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n, blocksize,
                       DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(q_ptr + offs, mask=mask, other=0)
    scale = tl.load(absmax_ptr + offs // blocksize, mask=mask, other=0.0)  # absmax of each element's block
    store_f32(out_ptr, offs, tl.load(code_ptr + q, mask=mask, other=0.0) * scale, mask, DTYPE)


def code_table(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry bin -> code index table of a sorted 256-entry `code`, on code's device."""
    table = torch.empty(GRID_POINTS, dtype=torch.uint8, device=code.device)
    _code_table_kernel[(GRID_POINTS // TABLE_BLOCK,)](code.contiguous(), table, BLOCK=TABLE_BLOCK, **LAUNCH)
    return table


def quantize_blockwise(x: torch.Tensor, table: torch.Tensor, blocksize: int):
    """`table`: the code's bin -> index table (pyquant.backends.code_tables)."""
    n = x.numel()
    nblocks = -(-n // blocksize)
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if n == 0:
        return q, absmax
    cols = min(triton.next_power_of_2(blocksize), QUANT_TILE)
    rows = QUANT_TILE // cols
    grid = (triton.cdiv(nblocks, rows),)
    _quantize_kernel[grid](
        storage_view(x.contiguous()), table, q, absmax, n, blocksize, nblocks,
        DTYPE=DTYPE_CODES[x.dtype], ROWS=rows, COLS=cols, **LAUNCH,
    )
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype):
    n = q.numel()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, DEQUANT_BLOCK),)
    _dequantize_kernel[grid](
        q.contiguous(), absmax.contiguous(), code.contiguous(), storage_view(out), n, blocksize,
        DTYPE=DTYPE_CODES[dtype], BLOCK=DEQUANT_BLOCK, **LAUNCH,
    )
    return out
