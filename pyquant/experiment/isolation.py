"""Runs in processes of their own: each run in a fresh (spawned) Python process, so that its process memory figures
are its own, and with ``nproc`` = N in N data-parallel processes (the ranks; pyquant.experiment.parallel says what
each does). A Ctrl-C ends them with one line, not a traceback per process.
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

from pyquant.experiment import config as config_mod
from pyquant.experiment import parallel
from pyquant.experiment.records import RECORD_NAME, read_record
from pyquant.experiment.single_run import run_one
from pyquant.experiment.tasks import get_task


def spawn(target, args: tuple):
    """Start ``target(*args)`` in a fresh (spawned) Python process that holds Ctrl-C back until ``target`` starts.

    The child imports torch first (a few seconds); a Ctrl-C then would print a traceback from deep inside an import.
    The child is started with SIGINT blocked (a signal mask survives fork and exec), so a Ctrl-C in that time waits
    in it until :func:`_interruptible` unblocks it just before ``target``, and ends it with exit code 130;
    :func:`stop_after_interrupt` ends a child that had not started."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    started = context.Event()
    process = context.Process(target=_interruptible, args=(started, target, args))
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        process.start()
        process.started = started
        return process
    # While the child starts, the parent's own Ctrl-C is only recorded: the parent's other threads (tqdm's, torch's)
    # do not block SIGINT, so one of them may take it, and a handler that raised inside process.start() would leave
    # a half-started child. (An ignored SIGINT was lost that way: delivered to another thread while ignored.)
    interrupted = []
    handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, handler)
    process.started = started
    if interrupted:  # Ctrl-C came while the child started: as if before it (it has not begun the target)
        process.terminate()
        process.join()
        raise KeyboardInterrupt
    return process


def _interruptible(started, target, args: tuple) -> None:
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        started.set()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C held back since the start arrives now
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
    # A rank that finished leaves without the interpreter's shutdown: in loaded CI runs a rank that had finished
    # and written everything was still seen to abort there ("terminate called without an active exception", exit
    # code -6, from a thread of the torn-down gloo group), which failed the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(run: dict, run_dir: Path, progress: bool = True) -> int:
    """Run ``run`` on ``run['nproc']`` spawned processes; the exit code of the first that failed, else 0. When one
    rank fails, the others are stopped rather than left waiting for it in a collective."""
    nproc = parallel.check(int(run["nproc"]), run["batch_size"])
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


def _child(run: dict, run_dir: str, progress: bool) -> None:
    try:
        run_one(run, Path(run_dir), get_task(run["task"], run["data"]), progress)
    except (OSError, KeyError, ValueError) as e:  # missing data, bad config, full disk: one line, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def start(run: dict, run_dir: Path, progress: bool):
    """``run_one`` started in a fresh (spawned) Python process, so that its process memory figures are its own."""
    return spawn(_child, (run, str(run_dir), progress))  # a Ctrl-C: exit code 130, one line


def result(run: dict, run_dir: Path, exitcode: int) -> dict:
    """The record of a run's finished process(es), or the error of its exit code."""
    if exitcode == 130:
        raise KeyboardInterrupt
    record = read_record(Path(run_dir) / RECORD_NAME)
    if exitcode != 0 or record is None:
        raise RuntimeError(f"run {config_mod.run_name(run)} failed (exit code {exitcode}); its error is above")
    return record


def run_isolated(run: dict, run_dir: Path, progress: bool = True) -> dict:
    """``run_one`` in a fresh Python process (spawned), so that its process memory figures are its own; with
    ``nproc`` > 1, in that many data-parallel processes."""
    if int(run.get("nproc", 1)) > 1:
        return result(run, run_dir, launch(run, run_dir, progress))
    process = start(run, run_dir, progress)
    try:
        process.join()
    except KeyboardInterrupt:
        stop_after_interrupt([process])
        raise
    return result(run, run_dir, process.exitcode)
