"""The resumable grid: every unfinished run of a config, one at a time or ``jobs`` at a time, each in a process of
its own (pyquant.experiment.isolation) or in this one; finished runs (pyquant.experiment.records) are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from pyquant.experiment import config as config_mod
from pyquant.experiment import isolation, lock
from pyquant.experiment.models import MODELS
from pyquant.experiment.records import is_finished, resume
from pyquant.experiment.report import train_memory_bytes
from pyquant.experiment.settings import OPTIMIZERS, get_setting
from pyquant.experiment.single_run import run_one
from pyquant.experiment.tasks import TASKS, TaskData, get_task


def _summary_line(record: dict) -> str:
    """One line per finished run, under 100 columns for the usual names (the run's folder has its full name)."""
    c, t, r = record["config"], record["metrics"]["test"], record["resources"]
    memory = train_memory_bytes(record)
    ci = t.get("auc_ci")
    return (f"{c['model']} {c['setting']} S{c['scale']} seed{c['seed']}: AUC {t['auc']:.3f}"
            + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f" bal.acc {t['balanced_accuracy']:.3f} "
            f"{r['time']['train_total_s']:.0f} s train mem. {'n/a' if memory is None else f'{memory / 2**20:.1f}'} MiB")


def check_names(runs: list[dict]) -> None:
    """Fail before anything runs when a task, model, setting or optimizer name is not registered."""
    for kind, key, registry in [("task", "task", TASKS), ("model", "model", MODELS)]:
        unknown = sorted({r[key] for r in runs} - set(registry))
        if unknown:
            raise KeyError(f"unknown {kind}(s) {', '.join(unknown)}; registered: {', '.join(sorted(registry))}")
    for name in {r["setting"] for r in runs}:
        setting = get_setting(name)  # a registered setting or one with modifiers (subset:..., importance-sampling)
        if setting.optimizer not in OPTIMIZERS:
            raise KeyError(f"setting {name!r} uses unknown optimizer {setting.optimizer!r}")


HELD_ELSEWHERE = 3  # run_grid's code when runs were skipped because other processes hold them


def run_grid(cfg: dict, progress: bool = True, log=print) -> int:
    """Run every unfinished run of ``cfg``; 0 when all are done, 130 when interrupted (rerun to resume),
    HELD_ELSEWHERE when some were left to the other processes running them (pyquant.experiment.lock).
    ``jobs`` > 1: that many runs at a time, each in its own process (a 2-core machine trains two 1-thread runs
    faster than one 2-thread run of these small models); their progress bars are then hidden."""
    from multiprocessing.connection import wait

    from tqdm.auto import tqdm

    runs = config_mod.expand(cfg)
    check_names(runs)
    out = Path(cfg["out"])
    try:  # fail here, with the folder's name, rather than with a traceback after the first run
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(config_mod.to_toml(cfg))
    except OSError as e:
        raise RuntimeError(f"cannot write the runs folder {out}: {e.strerror or e}") from None
    todo = [r for r in runs if not is_finished(out / config_mod.run_name(r), r["hash"])]
    jobs = config_mod.concurrent_runs(cfg)
    log(f"{len(runs)} runs in the grid, {len(runs) - len(todo)} already finished, {len(todo)} to run"
        + (f", {jobs} at a time" if jobs > 1 else "") + f" -> {out}/")
    cached: dict = {}  # one task's data in memory at a time, for runs in this process (isolate = false)

    def task_data(run) -> TaskData:
        key = json.dumps([run["task"], run["data"]], sort_keys=True)
        if key not in cached:
            cached.clear()
            cached[key] = get_task(run["task"], run["data"])
        return cached[key]

    if jobs > 1:  # generate (and cache) each task's data here, once, not in several runs at the same time
        for run in todo:
            task_data(run)
        cached.clear()
    held = []
    active: dict = {}  # process sentinel -> (process, run, run_dir, lock_path), the runs started and not yet done
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress)
    say = tqdm.write if progress else log

    def finish(run, run_dir, lock_path, produce) -> None:
        try:
            record = produce()
        finally:
            lock.release(lock_path)
        bar.update()
        say(_summary_line(record))

    def settle(limit: int) -> None:
        """Wait until fewer than ``limit`` runs are running, finishing those that ended."""
        while len(active) >= limit:
            for sentinel in wait(list(active)):
                process, run, run_dir, lock_path = active.pop(sentinel)
                process.join()
                finish(run, run_dir, lock_path, lambda: isolation.result(run, run_dir, process.exitcode))

    try:
        for run in todo:
            name = config_mod.run_name(run)
            bar.set_description(f"{run['model']} {run['setting']} S{run['scale']} seed{run['seed']}")
            run_dir, lock_path = out / name, out / f".{name}.lock"
            settle(jobs)  # a free slot
            holder = lock.acquire(lock_path)
            if holder is not None:  # another live process runs it: leave its folder alone
                held.append(name)
                say(f"{name}: skipped, run by {lock.describe(holder, lock_path)}")
                bar.update()
                continue
            try:
                finished = resume(run_dir, run["hash"])  # finished by another process since the list was made?
                if not finished and jobs > 1:
                    process = isolation.start(run, run_dir, False)
                    active[process.sentinel] = (process, run, run_dir, lock_path)
                    continue
            except BaseException:
                lock.release(lock_path)
                raise
            if finished:
                lock.release(lock_path)
                bar.update()
            elif cfg["isolate"] or int(run.get("nproc", 1)) > 1:
                finish(run, run_dir, lock_path, lambda: isolation.run_isolated(run, run_dir, progress))
            else:
                finish(run, run_dir, lock_path, lambda: run_one(run, run_dir, task_data(run), progress))
        settle(1)  # all done
    except KeyboardInterrupt:
        isolation.stop_after_interrupt([a[0] for a in active.values()])
        for _, _, _, lock_path in active.values():
            lock.release(lock_path)
        bar.close()
        log("\ninterrupted: finished runs are kept; run the same command again to resume")
        return 130
    except Exception:  # a failed run: the others still running finish (their records are kept), then the error
        for process, run, run_dir, lock_path in active.values():
            process.join()
            lock.release(lock_path)
        raise
    bar.close()
    if held:
        log(f"{len(held)} run(s) left to the other process(es) running them; run the same command again once "
            "they finish to check the grid is complete")
        return HELD_ELSEWHERE
    return 0
