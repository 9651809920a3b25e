"""Data-parallel runs: ``nproc = N`` (``pyquant experiment --nproc N``) trains each run in N processes with torch's
DistributedDataParallel (gloo on CPU, nccl on CUDA, one GPU per rank).

- ``batch_size`` is the global batch: each rank takes ``batch_size / N`` samples per step, so the learning rate and
  the number of steps per epoch are those of the single-process run. N must divide ``batch_size`` (checked before
  anything runs).
- The training set is shuffled and partitioned by a ``DistributedSampler`` seeded with the run's seed, with
  ``drop_last``: when N does not divide the number of training samples, the last ``len % N`` samples of each
  epoch's shuffle are left out (a different few each epoch). The record says how many.
- DDP all-reduces (averages) the gradients, so every rank's optimizer (``pyquant.Adam8bit`` included) takes the same
  step. Batch-norm statistics are per rank, as with DDP without SyncBatchNorm; DDP broadcasts rank 0's buffers at
  each forward, and the model that is validated, saved and tested is rank 0's.
- Rank 0 validates, saves the checkpoint, tests, times inference, measures memory (its own process) and writes the
  record; after each epoch it broadcasts whether to stop, so every rank runs the same epochs.

This module holds what a rank asks and does inside a run (its rank, its share of the data, the collectives); it
imports nothing else of the harness, so the config, the run and the launcher can all use it.
pyquant.experiment.isolation starts the processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def check(nproc, batch_size) -> int:
    """The world size, or a ValueError naming what is wrong with ``nproc`` and ``batch_size``."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a whole number >= 1, got {nproc!r}")
    if int(batch_size) % nproc:
        raise ValueError(f"nproc {nproc} does not divide batch_size {batch_size}: batch_size is the global batch, "
                         f"split evenly over the ranks; use a batch size that is a multiple of {nproc}")
    return nproc


def rank_device(name: str) -> torch.device:
    """The run's device for this rank: rank r of a CUDA run uses GPU r."""
    device = torch.device(name)
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", rank())
    return device


def train_loader(dataset, batch_size: int, workers: int, seed: int) -> DataLoader:
    """This rank's share of the training data: ``batch_size / world`` samples a step, reshuffled each epoch."""
    n = world_size()
    per_rank = int(batch_size) // n
    if len(dataset) < n:
        raise ValueError(f"{len(dataset)} training samples cannot be split over {n} processes (nproc)")
    sampler = DistributedSampler(dataset, num_replicas=n, rank=rank(), shuffle=True, seed=int(seed), drop_last=True)
    # As in the single-process loader: a last batch of one sample breaks batch norm in training mode.
    drop_last = len(sampler) % per_rank == 1
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      persistent_workers=workers > 0)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model to train with: DistributedDataParallel over ``model`` on several ranks, ``model`` itself on one."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_ranks(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.item() / world_size()


def broadcast_stop(stop: bool) -> bool:
    """Rank 0's decision to stop training, on every rank."""
    if world_size() == 1:
        return stop
    t = torch.tensor([int(stop)], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def describe(n_train: int, batch_size: int) -> dict:
    n = world_size()
    return {"world_size": n, "backend": dist.get_backend() if n > 1 else None, "global_batch": int(batch_size),
            "per_rank_batch": int(batch_size) // n, "train_samples_dropped_per_epoch": n_train % n if n > 1 else 0,
            "note": "rank 0 validates, tests, measures and writes; memory figures are rank 0's process" if n > 1 else None}
