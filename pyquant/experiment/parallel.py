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
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

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


def spawn(target, args: tuple):
    """Start ``target(*args)`` in a fresh (spawned) Python process that ignores Ctrl-C until ``target`` starts.

    The child imports torch first (a few seconds); a Ctrl-C then would print a traceback from deep inside an import.
    An ignored SIGINT stays ignored across exec, and Python then installs no handler, so the child sets its own
    just before ``target`` and reports started; :func:`stop_after_interrupt` ends a child that had not started."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    started = context.Event()
    process = context.Process(target=_interruptible, args=(started, target, args))
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        process.start()
    else:
        # Blocked, the parent's own Ctrl-C in this moment stays pending (Linux queues a blocked signal even while
        # it is ignored) and arrives once the handler is back.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    process.started = started
    return process


def _interruptible(started, target, args: tuple) -> None:
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        started.set()
        target(*args)
    except KeyboardInterrupt:  # one line from the parent ("interrupted: ..."), not a traceback per process
        raise SystemExit(130) from None


STOP_GRACE_S = 60  # how long an interrupted child may take to unwind (close its data loaders) before it is ended


def stop_after_interrupt(processes: list) -> None:
    """After a Ctrl-C: the children started by :func:`spawn` got it too, except those still importing (they ignore
    it): end those, and wait for the others to unwind."""
    for p in processes:
        if not p.started.is_set():
            p.terminate()
    for p in processes:
        p.join(timeout=STOP_GRACE_S)
        if p.is_alive():  # it ignored the Ctrl-C after all (it started just as it came)
            p.terminate()
            p.join()


def _worker(rank_: int, nproc: int, init_file: str, run: dict, run_dir: str, progress: bool) -> None:
    from pyquant.experiment.runner import run_one
    from pyquant.experiment.tasks import get_task

    device = torch.device(run["device"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not run["threads"]:  # N ranks share the cores; without this each would start one thread per core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    if device.type == "cuda":
        torch.cuda.set_device(rank_)
    # The timeout also bounds the final barrier, where the other ranks wait for rank 0's test and inference.
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank_, world_size=nproc,
                            timeout=datetime.timedelta(minutes=30))
    try:
        run_one(run, Path(run_dir), get_task(run["task"], run["data"]), progress and rank_ == 0)
        # Every rank tears the group down together: a rank that left early (the others only train) once made a
        # rank abort ("terminate called without an active exception") in a loaded test run.
        dist.barrier()
    except (FileNotFoundError, KeyError, ValueError) as e:  # missing data, bad config: one line, not a traceback
        if rank_ == 0:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        dist.destroy_process_group()


def launch(run: dict, run_dir: Path, progress: bool = True) -> int:
    """Run ``run`` on ``run['nproc']`` spawned processes; the exit code of the first that failed, else 0. When one
    rank fails, the others are stopped rather than left waiting for it in a collective."""
    nproc = check(int(run["nproc"]), run["batch_size"])
    if run["device"].startswith("cuda") and torch.cuda.device_count() < nproc:
        raise ValueError(f"nproc {nproc} needs {nproc} GPUs, this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="pyquant-ddp-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")  # a file store: no port to pick or collide on
        processes = [spawn(_worker, (r, nproc, init_file, run, str(run_dir), progress)) for r in range(nproc)]
        failed = 0
        try:
            while any(p.is_alive() for p in processes):
                for p in processes:
                    p.join(timeout=0.2)
                    if p.exitcode not in (None, 0) and not failed:
                        failed = p.exitcode
                if failed:
                    for p in processes:
                        if p.is_alive():
                            p.terminate()
        except KeyboardInterrupt:
            stop_after_interrupt(processes)
            raise
        for p in processes:
            p.join()
        return failed or next((p.exitcode for p in processes if p.exitcode), 0)
