"""Block-wise 8-bit quantisation, API-compatible with bitsandbytes.functional.

The front-end: it checks the user's arguments and calls the ops of pyquant._ops (`torch.library` custom ops
with fake kernels, so `torch.compile` and meta tensors work), whose kernels run on the backend that
`pyquant.backends` selects.
"""

from __future__ import annotations

import hashlib
import re
import torch

from pyquant import _maps, _ops, backends
from pyquant._contract import FLOAT_DTYPES, check_blocksize

_dynamic_maps: dict[bool, torch.Tensor] = {}


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


_four_bit_maps: dict[bool, torch.Tensor] = {}


def create_4bit_map(signed: bool = True) -> torch.Tensor:
    """The 16 float32 codes of a 4-bit optimizer state (docs/numerics.md, "4-bit states"): `signed=True` the first
    moment's dynamic map (3 exponent bits; zero at index 7), `signed=False` the second moment's linear map
    without zero, k/16 for k = 1..16."""
    signed = bool(signed)
    if signed not in _four_bit_maps:
        if signed:
            bits = torch.tensor([int(w, 16) for w in _maps.SIGNED4_POSITIVE_HEX.split()], dtype=torch.int32)
            positive = bits.view(torch.float32)
            code = torch.cat([-positive.flip(0), torch.zeros(1), positive, torch.ones(1)])
        else:
            code = torch.arange(1, 17, dtype=torch.float32) / 16
        _four_bit_maps[signed] = code
    return _four_bit_maps[signed].clone()


# Built now, in eager mode: the first call reads numpy, which torch.compile cannot trace (it failed the first
# optimizer step under torch.compile, which creates the optimizer's maps); later calls only clone the cache.
for _signed in (True, False):
    create_dynamic_map(_signed)
    create_4bit_map(_signed)


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
    return _ops.quantize_blockwise(x.contiguous(), code, blocksize)


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
    return _ops.dequantize_blockwise(q.contiguous(), absmax.reshape(-1).contiguous(), code, blocksize, dtype)


def adam_step_multi_tensor(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    """One fused Adam step over lists of tensors (op `pyquant::adam_step_`; the optimizers check the inputs).
    Returns the number of non-finite gradient elements skipped, a 0-dim int64 tensor."""
    args = (list(params), list(grads), list(state1), list(state2), list(absmax1), list(absmax2),
            constants, code1, code2, nonfinite)
    if not args[0]:
        return torch.zeros((), dtype=torch.int64)
    written = [t for tensors in args[:1] + args[2:6] for t in tensors]
    return _ops.call_eagerly(_ops.adam_step_, "adam_step", args[0][0], args, written)


def runs_prepared_steps(first: torch.Tensor) -> bool:
    """Whether a step over tensors like `first` may run through a PreparedStep (prepare_adam_step,
    prepare_one_state_step, prepare_ademamix_step): an eager call on a CPU tensor whose backend is the C++ library. Checked every step:
    `pyquant.use_backend` and torch.compile can change the answer between steps."""
    return first.is_cpu and backends.runs_eagerly(first) and backends.select("cpu") == "cpu"


def prepare_adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2):
    """The C++ library's Adam step over these tensors, checked and described once, to be run step after step
    with new gradients and constants (pyquant.backends.cpu.optimizer.PreparedStep; Optimizer8bit keeps one per
    parameter group). Only where runs_prepared_steps(params[0])."""
    from pyquant.backends.cpu.optimizer import prepare_adam_step as prepare

    return prepare(list(params), list(grads), list(state1), list(state2), list(absmax1), list(absmax2),
                   constants, code1, code2)


def prepare_one_state_step(params, grads, state1, absmax1, constants, code1, rule):
    """prepare_adam_step for the one-state rules."""
    from pyquant.backends.cpu.optimizer import prepare_one_state_step as prepare

    return prepare(list(params), list(grads), list(state1), list(absmax1), constants, code1, rule)


def prepare_ademamix_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2):
    """prepare_adam_step for AdEMAMix."""
    from pyquant.backends.cpu.optimizer import prepare_ademamix_step as prepare

    return prepare(list(params), list(grads), list(state1), list(state2), list(absmax1), list(absmax2),
                   constants, code1, code2)


def prepare_adam4bit_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1):
    """prepare_adam_step for the Adam step with 4-bit states (`rank1`: one bool per tensor)."""
    from pyquant.backends.cpu.optimizer import prepare_adam4bit_step as prepare

    return prepare(list(params), list(grads), list(state1), list(state2), list(absmax1), list(absmax2),
                   constants, code1, code2, [bool(r) for r in rank1])


def one_state_step_multi_tensor(params, grads, state1, absmax1, constants, code1, rule, nonfinite):
    """One fused step of a one-state rule (op `pyquant::one_state_step_`: momentum, Lion, RMSprop, Adagrad) over
    lists of tensors; the optimizers check the inputs. Returns the number of non-finite gradient elements skipped."""
    args = (list(params), list(grads), list(state1), list(absmax1), constants, code1, rule, nonfinite)
    if not args[0]:
        return torch.zeros((), dtype=torch.int64)
    written = [t for tensors in (args[0], args[2], args[3]) for t in tensors]
    return _ops.call_eagerly(_ops.one_state_step_, "one_state_step", args[0][0], args, written)


def lamb_norms_multi_tensor(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    """LAMB's norm pass (op `pyquant::lamb_norms`) over adam_step_multi_tensor's operands: float64 (n, 2), the sums
    of squares of each parameter and of its direction. The optimizer checks the inputs."""
    args = (list(params), list(grads), list(state1), list(state2), list(absmax1), list(absmax2),
            constants, code1, code2, nonfinite)
    if not args[0]:
        return torch.zeros((0, 2), dtype=torch.float64)
    return _ops.call_eagerly(_ops.lamb_norms, "lamb_norms", args[0][0], args)


def lars_norms_multi_tensor(params, grads, constants, nonfinite):
    """LARS' norm pass (op `pyquant::lars_norms`): float64 (n, 2), the sums of squares of each parameter and of its
    direction g + wd*p (`constants`: one_state_step_multi_tensor's rows)."""
    args = (list(params), list(grads), constants, nonfinite)
    if not args[0]:
        return torch.zeros((0, 2), dtype=torch.float64)
    return _ops.call_eagerly(_ops.lars_norms, "lars_norms", args[0][0], args)


def ademamix_step_multi_tensor(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    """One fused AdEMAMix step over lists of tensors (op `pyquant::ademamix_step_`; the optimizer checks the
    inputs): state1[i] is (2, *params[i].shape), the fast and slow EMAs. Returns the number of non-finite gradient
    elements skipped, a 0-dim int64 tensor."""
    args = (list(params), list(grads), list(state1), list(state2), list(absmax1), list(absmax2),
            constants, code1, code2, nonfinite)
    if not args[0]:
        return torch.zeros((), dtype=torch.int64)
    written = [t for tensors in args[:1] + args[2:6] for t in tensors]
    return _ops.call_eagerly(_ops.ademamix_step_, "ademamix_step", args[0][0], args, written)


def adam4bit_step_multi_tensor(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1,
                               nonfinite):
    """One fused Adam step with 4-bit states over lists of tensors (op `pyquant::adam4bit_step_`; the optimizer
    checks the inputs). Returns the number of non-finite gradient elements skipped, a 0-dim int64 tensor."""
    args = (list(params), list(grads), list(state1), list(state2), list(absmax1), list(absmax2),
            constants, code1, code2, [bool(r) for r in rank1], nonfinite)
    if not args[0]:
        return torch.zeros((), dtype=torch.int64)
    written = [t for tensors in args[:1] + args[2:6] for t in tensors]
    return _ops.call_eagerly(_ops.adam4bit_step_, "adam4bit_step", args[0][0], args, written)


def quantize_4bit_state(values: torch.Tensor, shape, rank1: bool, code: torch.Tensor):
    """(packed uint8 codes, float32 scales) of a float32 state of `shape`, as the 4-bit step stores it (block-wise
    scales, or rank-1 maxima when `rank1`)."""
    from pyquant.backends.reference.adam4bit import quantize_state

    return quantize_state(values, tuple(shape), bool(rank1), code)


def dequantize_4bit_state(packed: torch.Tensor, scales: torch.Tensor, shape, rank1: bool, code: torch.Tensor):
    """The float32 values (flat) of a 4-bit state of `shape`."""
    from pyquant.backends.reference.adam4bit import dequantize_state

    return dequantize_state(packed, scales, tuple(shape), bool(rank1), code)
