"""Block-wise 8-bit quantisation, API-compatible with bitsandbytes.functional.

Each op is a `torch.library` custom op in the `pyquant` namespace with a fake kernel (so `torch.compile`
and meta tensors work); its device kernels run on the backend that `pyquant.backends` selects.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from typing import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from pyquant import _maps, backends
from pyquant._native import check_blocksize
from pyquant._nvtx import kernel_range

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_dynamic_maps: dict[bool, torch.Tensor] = {}
_code_tables: dict[tuple, torch.Tensor] = {}
# The same code tensor (the optimizers' maps) is looked up every step: find it by identity and version
# first, so that a GPU step does not copy the code to the host to build the content key.
_tables_by_tensor = WeakIdKeyDictionary()


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 float32 codes of bitsandbytes' dynamic map (7 exponent bits, 8 bits), bit for bit.

    `signed=True` is the map of Adam's first moment, `signed=False` the map of the second.
    """
    signed = bool(signed)
    if signed not in _dynamic_maps:
        hex_words = re.findall(r"[0-9a-f]{8}", _maps.SIGNED_HEX if signed else _maps.UNSIGNED_HEX)
        bits = torch.tensor([int(w, 16) for w in hex_words], dtype=torch.int64).to(torch.int32)
        code = bits.view(torch.float32).clone()
        digest = hashlib.sha256(code.numpy().astype("<f4").tobytes()).hexdigest()
        expected = _maps.SIGNED_SHA256 if signed else _maps.UNSIGNED_SHA256
        if digest != expected:
            raise RuntimeError(f"pyquant's stored {'signed' if signed else 'unsigned'} dynamic map is corrupt")
        _dynamic_maps[signed] = code
    return _dynamic_maps[signed].clone()


# Built now, in eager mode: the first call reads numpy, which torch.compile cannot trace (it failed the first
# optimizer step under torch.compile, which creates the optimizer's maps); later calls only clone the cache.
for _signed in (True, False):
    create_dynamic_map(_signed)


# ---- input checks: every public entry point says exactly what is wrong ----
def check_code(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"code must be a torch.Tensor of 256 float32 values, got {type(code).__name__}")
    if code.dtype != torch.float32 or code.numel() != 256 or code.dim() != 1:
        raise ValueError(
            f"code must be 256 sorted float32 values (a 1-D tensor), got dtype {code.dtype} and shape {tuple(code.shape)}"
        )
    if code.device != device:
        raise ValueError(f"code is on {code.device} but the data is on {device}; move them to the same device")
    # The values can only be read from a real tensor, and reading them under torch.compile would be
    # data-dependent control flow: meta and fake tensors (and traced code) skip this check of the contents.
    if code.device.type != "meta" and not torch.compiler.is_compiling():
        host = code.detach().cpu()
        if not torch.isfinite(host).all() or not (host[1:] >= host[:-1]).all():
            raise ValueError("code must be 256 finite float32 values sorted in ascending order")
    return code.contiguous()


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def cached_code_table(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry bin -> code index table of `code` (docs/numerics.md section 2, step 5), cached."""
    hit = _tables_by_tensor.get(code)
    if hit is not None and hit[0] == code._version:
        return hit[1]
    key = (code.device, code.detach().cpu().numpy().tobytes())
    table = _code_tables.get(key)
    if table is None:
        # Built by the selected backend where it has a table builder (all builders give the same bits,
        # tests check it); the cuda backend has none and takes the CPU's table.
        build = backends.ops(code.device.type).get("code_table")
        if build is not None:
            table = build(code.detach())
        else:
            host = "cpu" if backends.available("cpu", "cpu") else "reference"
            table = importlib.import_module(f"pyquant._{host}").code_table(code.detach().cpu()).to(code.device)
        _code_tables[key] = table
    _tables_by_tensor[code] = (code._version, table)
    return table


# ---- custom ops ----
@torch.library.custom_op("pyquant::quantize_blockwise", mutates_args=())
def _quantize_blockwise_op(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    with kernel_range("quantize_blockwise"):
        return backends.implementation("quantize_blockwise", x.device.type)(x, code, blocksize)


@_quantize_blockwise_op.register_fake
def _(x, code, blocksize):
    blocks = -(-x.numel() // blocksize)
    return torch.empty_like(x, dtype=torch.uint8), x.new_empty((blocks,), dtype=torch.float32)


@torch.library.custom_op("pyquant::dequantize_blockwise", mutates_args=())
def _dequantize_blockwise_op(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    with kernel_range("dequantize_blockwise"):
        return backends.implementation("dequantize_blockwise", q.device.type)(q, absmax, code, blocksize, dtype)


@_dequantize_blockwise_op.register_fake
def _(q, absmax, code, blocksize, dtype):
    return torch.empty_like(q, dtype=dtype)


@torch.library.custom_op(
    "pyquant::adam_step_", mutates_args=("params", "state1", "state2", "absmax1", "absmax2")
)
def _adam_step_op(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state1: list[torch.Tensor],
    state2: list[torch.Tensor],
    absmax1: list[torch.Tensor],
    absmax2: list[torch.Tensor],
    constants: torch.Tensor,
    code1: torch.Tensor,
    code2: torch.Tensor,
    nonfinite: int,
) -> torch.Tensor:
    with kernel_range("adam_step"):
        return backends.implementation("adam_step", params[0].device.type)(
            params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite
        )


@_adam_step_op.register_fake
def _(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    return params[0].new_empty((), dtype=torch.int64)


# ---- public API ----
def _one_block_at_most(blocksize: int, n: int) -> int:
    """A blocksize above n is n: the same single block and the same bits, and no kernel walks a huge
    block (a Triton loop over 2**62 masked columns, the reference's zero padding to the blocksize)."""
    return blocksize if blocksize <= n else max(n, 1)


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `x` block by block to 8-bit code indices.

    Returns `(q, absmax)`: `q` is uint8 with x's shape, `absmax` float32 with one entry per block of
    `blocksize` consecutive elements (in x's row-major order; the last block may be partial).
    `code` defaults to the signed dynamic map. The bits equal bitsandbytes' CPU `quantize_blockwise`.
    """
    _check_float(x, "x")
    blocksize = _one_block_at_most(check_blocksize(blocksize), x.numel())
    code = check_code(create_dynamic_map(True).to(x.device) if code is None else code, x.device)
    return _quantize_blockwise_op(x.contiguous(), code, blocksize)


def dequantize_blockwise(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None = None,
    blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: out = code[q] * absmax[block], in float32, then rounded once to `dtype`."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
        raise TypeError(f"q must be a uint8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be a float32 tensor, got {getattr(absmax, 'dtype', type(absmax).__name__)}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    blocksize = check_blocksize(blocksize)
    blocks = -(-q.numel() // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(
            f"absmax has {absmax.numel()} entries but q has {q.numel()} elements, i.e. {blocks} blocks of {blocksize}"
        )
    if absmax.device != q.device:
        raise ValueError(f"absmax is on {absmax.device} but q is on {q.device}")
    code = check_code(create_dynamic_map(True).to(q.device) if code is None else code, q.device)
    blocksize = _one_block_at_most(blocksize, q.numel())
    return _dequantize_blockwise_op(q.contiguous(), absmax.reshape(-1).contiguous(), code, blocksize, dtype)


def adam_step_multi_tensor(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state1: Sequence[torch.Tensor],
    state2: Sequence[torch.Tensor],
    absmax1: Sequence[torch.Tensor],
    absmax2: Sequence[torch.Tensor],
    constants: torch.Tensor,
    code1: torch.Tensor,
    code2: torch.Tensor,
    nonfinite: int,
) -> torch.Tensor:
    """One fused Adam step over a list of tensors (the optimizers' kernel; inputs are checked by them)."""
    args = (list(params), list(grads), list(state1), list(state2), list(absmax1), list(absmax2),
            constants, code1, code2, nonfinite)
    if not args[0] or not backends.runs_eagerly(args[0][0]):
        return _adam_step_op(*args)
    # The kernel directly (backends.runs_eagerly says why), then the version bumps of the op's `mutates_args`.
    with kernel_range("adam_step"):
        count = backends.implementation("adam_step", args[0][0].device.type)(*args)
    torch.autograd.graph.increment_version([t for written in args[:1] + args[2:6] for t in written])
    return count
