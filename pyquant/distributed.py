"""pyquant's 8-bit optimizers inside torch.distributed: DDP, FSDP2 shards and DCP checkpoints (docs/distributed.md).

DDP needs nothing from here: every rank holds the whole model and steps it with the same all-reduced gradient.
FSDP2 (`fully_shard`) makes each parameter a DTensor whose local tensor is this rank's shard. The optimizer then
steps the local shard with the local gradient, and keeps its states per shard: 8-bit blocks of 256 elements
counted within the local shard. Whether a parameter gets 8-bit states is decided on its full (global) size, so
the choice is the same on every rank and for every world size, and the same as without sharding.

Blocks of a local shard do not survive resharding, so for DTensor parameters `state_dict()` presents the moments
to torch.distributed.checkpoint (DCP) as float32 DTensors laid out like the parameter (`exp_avg`, `exp_avg_sq`, as
torch.optim.Adam names them): DCP reshards them to any world size, and loading quantises each rank's new shard.
Those float32 values are exactly the stored moments (code[q] * absmax), and loading finds back blocks that
represent them bit for bit wherever the shard layout allows it, which it always does for an unchanged world size.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist

from pyquant import functional as F
from pyquant._contract import OPTIMIZER_BLOCK

__all__ = ["load_checkpoint", "save_checkpoint"]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor. Importing DTensor costs a third of a second, so it is only looked up once
    something else has imported it: until then no tensor can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view: writing it writes the DTensor), or `t` itself."""
    return t.to_local() if is_sharded(t) else t


def refuse_sharded(optimizer, what: str) -> None:
    if any(is_sharded(p) for group in optimizer.param_groups for p in group["params"]):
        raise NotImplementedError(
            f"{what} needs unsharded parameters; under FSDP2, state_dict() already holds torch.optim.Adam's "
            "exp_avg and exp_avg_sq, as DTensors"
        )


def sum_over_shards(params: list, sums: torch.Tensor) -> torch.Tensor:
    """`sums` (one row of per-tensor sums for each of `params`, e.g. LAMB's and LARS' squared norms) with the rows
    of DTensor parameters summed over the ranks that hold their shards: the sums of whole tensors, the same on
    every rank. One all-reduce per mesh dimension that shards some of them (Replicate dimensions hold the same
    values already). Every rank steps the same parameters in the same order, so the collectives match."""
    rows: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if is_sharded(p):
            for dim, placement in enumerate(p.placements):
                if placement.is_shard():
                    rows.setdefault((p.device_mesh, dim), []).append(i)
    for (mesh, dim), index in rows.items():
        part = sums[index]
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        sums[index] = part
    return sums


# ---- the state of one DTensor parameter, as DCP sees it ----
def moments(optimizer, shard: torch.Tensor, state: dict) -> dict[str, torch.Tensor]:
    """The float32 moments that the state of one parameter's local `shard` stands for (dequantised if 8-bit or
    4-bit), by their DCP names (optimizer._moment_slots: Adam's exp_avg and exp_avg_sq, SGD's momentum_buffer, ...)."""
    out = {}
    for name, key, index in optimizer._moment_slots():
        number = int(key[-1])  # state1 -> absmax1, qmap1
        values = state[key] if index is None else state[key][index]
        if values.dtype == torch.uint8:
            absmax = state[f"absmax{number}"] if index is None else state[f"absmax{number}"][index]
            out[name] = optimizer._dequantized_moment(shard, number, values, absmax, state)
        else:
            out[name] = values.clone()
    return out


def sharded_state_entry(optimizer, p, state: dict) -> dict:
    """`state_dict()` entry of a DTensor parameter: its float32 moments as DTensors placed like `p`."""

    from torch.distributed.tensor import DTensor

    def like_param(local: torch.Tensor) -> DTensor:
        return DTensor.from_local(
            local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )

    moments_of_shard = moments(optimizer, p.to_local(), state)
    entry = {"step": state["step"], **{name: like_param(m) for name, m in moments_of_shard.items()}}
    if "master" in state:  # master_weights=True: this shard's float32 copy of a low-precision parameter
        entry["master"] = like_param(state["master"])
    for key in optimizer._whole_tensor_states:  # the same on every rank (LAMB's unorm_vec): a plain tensor
        if key in state:
            entry[key] = state[key].clone()
    return entry


def checked_sharded_state(optimizer, p, saved: dict, where: str) -> dict:
    """Inverse of `sharded_state_entry`: validate one saved entry against `p` and quantise this rank's shard."""
    step = saved.get("step")
    if isinstance(step, torch.Tensor):
        step = step.item()
    if step is None or float(step) != int(step) or int(step) < 0:
        raise ValueError(f"{where}: 'step' must be a non-negative integer, got {saved.get('step')!r}")
    local = p.to_local()
    slots = optimizer._moment_slots()
    loaded = {}
    for key in [name for name, _, _ in slots] + ["master"]:
        t = saved.get(key)
        if key == "master" and t is None:  # only optimizers with master_weights=True write one
            continue
        if not is_sharded(t):
            raise ValueError(
                f"{where}: the parameter is a sharded DTensor, so its state must hold {key!r} as a DTensor "
                f"(the format of state_dict() under FSDP2, loaded through torch.distributed.checkpoint); "
                f"got {type(t).__name__} (keys {sorted(saved)})"
            )
        if t.shape != p.shape or t.placements != p.placements or t.device_mesh != p.device_mesh:
            raise ValueError(
                f"{where}: {key} is a DTensor of shape {tuple(t.shape)} placed {t.placements} on {t.device_mesh}, "
                f"the parameter has shape {tuple(p.shape)} placed {p.placements} on {p.device_mesh}"
            )
        t = t.to_local()
        if t.shape != local.shape or t.dtype != torch.float32:
            raise ValueError(
                f"{where}: local {key} is {t.dtype} of shape {tuple(t.shape)}, expected float32 of shape "
                f"{tuple(local.shape)} (this rank's shard)"
            )
        loaded[key] = t.to(local.device).contiguous()
    state = {"step": int(step)}
    if "master" in loaded and optimizer._keeps_master(p):
        state["master"] = loaded["master"]
    eight_bit = optimizer._uses_8bit(p)
    parts: dict[str, list] = {}  # state key -> [(values, absmax)], several where moments are stacked (AdEMAMix)
    for name, key, _ in slots:
        quantized = optimizer._quantized_moment(loaded[name], int(key[-1])) if eight_bit else (loaded[name].clone(), None)
        parts.setdefault(key, []).append(quantized)
    for key, values in parts.items():
        number = key[-1]
        stacked = len(values) > 1
        state[key] = torch.stack([v for v, _ in values]) if stacked else values[0][0]
        if eight_bit:
            state[f"absmax{number}"] = torch.stack([a for _, a in values]) if stacked else values[0][1]
            state[f"qmap{number}"] = optimizer._codes_on(local.device)[int(number) - 1]
    return state


def quantize_moment(x: torch.Tensor, code: torch.Tensor, block: int = OPTIMIZER_BLOCK, plain=None):
    """(one uint8 code per element, x's shape; float32 scale per block) of `x` in blocks of `block`: blocks that are
    exactly code[q] * absmax (dequantised pyquant states) get that q and absmax back, bit for bit in value; any
    other block gets the plain quantisation, `plain(rows)` -> (codes, absmax) of the zero-padded blocks (default:
    8-bit block-wise, F.quantize_blockwise).

    Quantising a dequantised block again does not always give it back: the 8-bit quantiser goes through a
    65536-point grid that is coarser than the map's smallest codes, and a block whose largest magnitude is negative
    holds code[0] * absmax, which is -0.9929 * absmax in the signed 8-bit map (the signed maps have no -1). So each
    block's scale is found instead (its largest magnitude, or that over -code[0], to within 2 ulp) and each
    element's code is looked up in code * scale.
    """
    flat = x.reshape(-1)
    n, blocks = flat.numel(), -(-flat.numel() // block)
    # Pad the last block with zeros: they change neither its scale nor the codes of its real elements.
    rows = torch.zeros(blocks * block, dtype=torch.float32, device=x.device)
    rows[:n] = flat
    rows = rows.view(blocks, block)
    if plain is None:
        q, absmax = F.quantize_blockwise(rows, code, block)
    else:
        q, absmax = plain(rows)
    q = q.reshape(blocks, block).clone()
    absmax = absmax.clone()
    largest = rows.abs().amax(dim=1)
    scales = [largest]
    if code[0] < 0:  # a signed map: the largest magnitude may be -code[0] * absmax
        guess = (largest / -code[0]).view(torch.int32)
        scales += [(guess + ulps).view(torch.float32) for ulps in (0, 1, -1, 2, -2)]
    found = torch.zeros(blocks, dtype=torch.bool, device=x.device)
    for scale in scales:
        values = code * scale[:, None]  # every value a block with this scale can hold, ascending
        codes = torch.searchsorted(values, rows).clamp_(max=code.numel() - 1)
        exact = values.gather(1, codes).view(torch.int32) == rows.view(torch.int32)
        exact.view(-1)[n:] = True  # padding is not part of the moment
        hit = exact.all(dim=1) & ~found
        q[hit], absmax[hit] = codes[hit].to(torch.uint8), scale[hit]
        found |= hit
        if found.all():
            break
    return q.view(-1)[:n].view(x.shape), absmax


# ---- DCP checkpoints of a model and its optimizer ----
def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save model and optimizer with torch.distributed.checkpoint, atomically: the directory `path` appears
    complete or not at all (written as `path.tmp`, then renamed by rank 0). Call it on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    path = os.fspath(path)
    staging = path + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted save
    _barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=staging)
    _barrier()
    if rank0:
        old = path + ".old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a `save_checkpoint` directory into model and optimizer, from any world size. Call it on every rank.

    Everything is read into fresh tensors and checked first: a checkpoint that does not fit (another model,
    shapes that differ) raises ValueError naming the entry, and leaves model and optimizer as they were.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.utils._pytree import tree_map_only

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"no torch.distributed.checkpoint directory at {path} (its .metadata is missing)")
    had_state = bool(optimizer.state)  # DCP's template step creates zero states in a fresh optimizer
    try:
        state = {
            "model": tree_map_only(torch.Tensor, lambda t: t.detach().clone(), get_model_state_dict(model)),
            "optim": get_optimizer_state_dict(model, optimizer),  # fresh float32 tensors: no alias of the states
        }
        try:
            dcp.load(state, checkpoint_id=path)
        except CheckpointException as error:  # every rank's failure, tracebacks included: keep the messages
            reasons = "; ".join(sorted({str(exc) for exc, _ in error.failures.values()}))
            raise ValueError(f"checkpoint {path} does not fit this model and optimizer: {reasons}") from None
        # load_state_dict checks every entry, then installs new state and param_groups objects (pyquant's and
        # torch's do): holding the current ones keeps them as they are, should the model's load still fail.
        kept = {"state": optimizer.state, "param_groups": optimizer.param_groups}
        set_optimizer_state_dict(model, optimizer, state["optim"])
        try:
            set_model_state_dict(model, state["model"])
        except BaseException:
            optimizer.__setstate__(kept)
            raise
    except BaseException:
        if not had_state:
            optimizer.state.clear()
        raise


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
