"""One training loop for every setting, one record per run, and the resumable grid.

A run trains with early stopping on validation, saves the best-on-validation checkpoint atomically, reloads it,
chooses the decision threshold on validation, tests it, and times inference of that model on pre-loaded test batches.
Its folder ``<out>/<task>_<model>_<setting>_S<scale>_seed<seed>_<hash>/`` holds ``record.json`` (written last,
atomically: a run without it is unfinished and reruns), ``best.pt`` and ``split.json``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pyquant._files import write_atomic, write_text_atomic
from pyquant.experiment import config as config_mod
from pyquant.experiment import lock, parallel
from pyquant.experiment.measure import (
    EnergyMeter,
    PeakMemory,
    count_flops,
    environment,
    memory_breakdown,
    optimizer_state_bytes,
    saved_activation_bytes,
    synchronize,
)
from pyquant.experiment.metrics import THRESHOLD_RULES, binary_metrics, bootstrap_intervals, roc_auc
from pyquant.experiment.models import create_model
from pyquant.experiment.settings import resolve
from pyquant.experiment.tasks import TaskData, get_task
from pyquant.subsets import harness as subsets_harness

RECORD_FORMAT = "pyquant-experiment-run-v1"
RECORD_NAME = "record.json"
CHECKPOINT_NAME = "best.pt"


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_record(path: Path, record: dict) -> None:
    """The one JSON writer: NaN/inf become null, written to a temporary file and moved into place."""
    write_text_atomic(path, json.dumps(_finite_or_none(record), indent=1, sort_keys=False) + "\n")


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(run_dir: Path, run_hash: str) -> bool:
    record = read_record(Path(run_dir) / RECORD_NAME)
    return bool(record) and record.get("status") == "done" and record.get("config_hash") == run_hash


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then os.replace: an interrupted or failed save (a full disk: "no space
    left on <path>") never leaves a half-written file, and the previous checkpoint stays."""
    write_atomic(path, lambda f: torch.save(state, f))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Batches:
    """Moves a batch to the device, down-samples images to ``size`` (area interpolation) and casts to ``dtype``."""

    def __init__(self, device: torch.device, size: int | None, dtype: torch.dtype):
        self.device, self.size, self.dtype = device, size, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return x.to(self.dtype)


def train_step(model, x, y, optimizer, scaler, recipe, loss_fn=None) -> torch.Tensor:
    """One training step (forward, backward, optimizer) on a batch already on the device; the detached loss.
    The one step every caller uses: the epoch loop, `pyquant profile` and bench/test_train_step.py.
    ``loss_fn(logits, y)``: another loss than mean cross-entropy (importance sampling's weighted one)."""
    with recipe.autocast():
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y) if loss_fn is None else loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # skipped when a scaled gradient overflowed (float16)
    scaler.update()
    return loss.detach()


def train_epoch(model, loader, optimizer, scaler, recipe, batches, importance=None) -> tuple[float, int]:
    """One pass over the training data; (mean loss over finite steps, number of non-finite steps).
    ``importance``: the loader's pyquant.subsets.ImportanceSampler, when the setting samples by importance."""
    model.train()
    device = batches.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    bad = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in loader:
        x, y = batches(x), y.to(device)
        if importance is not None:  # b of the B presampled, by score; their weights go into the loss
            x, y = importance.select(model, x, y, recipe.autocast)
        loss = train_step(model, x, y, optimizer, scaler, recipe, None if importance is None else importance.loss)
        finite = torch.isfinite(loss)
        total += torch.where(finite, loss.detach().double() * len(y), 0.0)
        count += finite.double() * len(y)
        bad += (~finite).long()
    n = count.item()
    return (total.item() / n if n else math.nan), int(bad.item())


@torch.inference_mode()
def predict(model, loader, recipe, batches) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean cross-entropy, probability of class 1, labels) over a loader."""
    model.eval()
    losses, probs, labels = [], [], []
    for x, y in loader:
        with recipe.autocast():
            logits = model(batches(x)).float()
        y = y.to(logits.device)
        losses.append(F.cross_entropy(logits, y, reduction="sum"))
        probs.append(logits.softmax(1)[:, 1])
        labels.append(y)
    n = sum(len(y) for y in labels)
    return (torch.stack(losses).sum().item() / n, torch.cat(probs).cpu().double().numpy(), torch.cat(labels).cpu().numpy())


@torch.inference_mode()
def time_inference(model, batches: list[torch.Tensor], recipe, device, repeats: int, warmup: int, energy: EnergyMeter):
    """Median wall time of ``repeats`` synchronised passes over pre-loaded batches after ``warmup`` batches, the
    peak memory and the energy per pass."""
    model.eval()
    with recipe.autocast():
        for x in (batches * max(1, warmup))[:warmup]:
            model(x)
        synchronize(device)
        with PeakMemory(device) as memory:
            e0 = energy.read()
            times = []
            for _ in range(max(1, repeats)):
                synchronize(device)
                t0 = time.perf_counter()
                for x in batches:
                    model(x)
                synchronize(device)
                times.append(time.perf_counter() - t0)
            e1 = energy.read()
    joules = None if e0 is None else (e1 - e0) / max(1, repeats)
    return statistics.median(times), times, memory, joules


def _loader(dataset, batch_size: int, workers: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    # A last batch of one sample breaks batch norm in training mode: drop it then.
    drop_last = shuffle and len(dataset) % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      drop_last=drop_last, persistent_workers=workers > 0)


def run_one(run: dict, run_dir: Path, data: TaskData, progress: bool = True) -> dict:
    """Train, select, test and time one run; write and return its record."""
    from tqdm.auto import tqdm

    from pyquant.amp import GradScaler

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = parallel.rank_device(run["device"])
    if run["threads"]:
        torch.set_num_threads(int(run["threads"]))
    seed_everything(run["seed"])
    recipe = resolve(run["setting"], device.type, run["amp_dtype"], run["half_dtype"])
    scale = int(run["scale"])
    if data.image_size is None and scale != 1:
        raise ValueError(f"task {run['task']!r} has no images: down-sampling scale must be 1, got {scale}")
    size = None if data.image_size is None else data.image_size // scale
    empty = [part for part in ("train", "val", "test") if len(getattr(data, part)) == 0]
    if empty:  # config.validate refuses zero fractions; too few patients for three splits ends here
        raise ValueError(f"task {run['task']!r}: the {' and '.join(empty)} split(s) are empty; a run trains on train, "
                         "early-stops on val and reports test: give each split a positive fraction and data for it")
    from pyquant.data import save_split

    if parallel.is_main():
        save_split(run_dir / "split.json", data.split, data.patient_ids, meta={"task": run["task"], "data": run["data"]})

    model = create_model(run["model"], in_chans=data.in_chans, num_classes=data.num_classes,
                         pretrained=run["pretrained"], img_size=size, **run["model_args"])
    params = sum(p.numel() for p in model.parameters())
    example = torch.zeros((1, data.in_chans, size, size) if size else (1, data.in_chans))
    flops = count_flops(model, example)
    model = recipe.prepare_model(model.to(device))
    optimizer = recipe.make_optimizer(model.parameters(), float(run["lr"]))
    scaler = GradScaler(device.type, enabled=recipe.loss_scaling)
    input_dtype = recipe.model_dtype
    batches = _Batches(device, size, input_dtype)
    bs, workers = int(run["batch_size"]), int(run["workers"])
    train_model = parallel.wrap(model, device)  # DistributedDataParallel under --nproc N; model itself otherwise
    # pyquant.subsets: the training subset is chosen before training (timed apart), importance sampling during it.
    train_set, selection = subsets_harness.training_subset(run, recipe.setting, data,
                                                           _Batches(device, size, torch.float32), device)
    importance = subsets_harness.importance_sampler(recipe.setting, len(train_set), bs, run["seed"], parallel.world_size())
    if parallel.world_size() > 1:
        train_loader = parallel.train_loader(train_set, bs, workers, run["seed"])
    elif importance is not None:
        train_loader = importance.loader(train_set, workers)
    else:
        train_loader = _loader(train_set, bs, workers, True, run["seed"])
    val_loader = _loader(data.val, bs, workers, False, run["seed"])
    test_loader = _loader(data.test, bs, workers, False, run["seed"])

    maximise = run["monitor"] == "val_auc"
    if run["monitor"] not in ("val_loss", "val_auc"):
        raise ValueError(f"monitor must be val_loss or val_auc, got {run['monitor']!r}")
    ckpt_path = run_dir / CHECKPOINT_NAME
    energy = EnergyMeter(device)
    history, best, best_epoch, time_to_best, bad_epochs, diverged = [], None, 0, None, 0, False
    train_peak = eval_peak = train_growth = eval_growth = 0
    memory_method = ""
    nonfinite_steps = 0
    epochs = tqdm(range(1, int(run["epochs"]) + 1), desc="epochs", leave=False, disable=not progress, unit="ep")
    synchronize(device)
    e_start = energy.read()
    start = time.perf_counter()
    for epoch in epochs:
        parallel.set_epoch(train_loader, epoch)
        t0 = time.perf_counter()
        with PeakMemory(device) as mem:
            train_loss, bad_steps = train_epoch(train_model, train_loader, optimizer, scaler, recipe, batches, importance)
        train_loss = parallel.mean_over_ranks(train_loss)
        synchronize(device)
        if not parallel.is_main():  # rank 0 validates and decides; the other ranks only train
            if parallel.broadcast_stop(False):
                break
            continue
        t1 = time.perf_counter()
        with PeakMemory(device) as vmem:
            val_loss, val_p, val_y = predict(model, val_loader, recipe, batches)
        val_auc = roc_auc(val_y, val_p)
        nonfinite_steps += bad_steps
        train_peak, eval_peak, memory_method = max(train_peak, mem.peak_bytes), max(eval_peak, vmem.peak_bytes), mem.method
        train_growth, eval_growth = max(train_growth, mem.growth_bytes), max(eval_growth, vmem.growth_bytes)
        value = -val_auc if maximise else val_loss
        improved = math.isfinite(value) and (best is None or value < best)
        if improved or best_epoch == 0:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "epoch": epoch, "config_hash": run["hash"],
                                        "monitor": run["monitor"], "value": float(-value if maximise else value)})
            best, best_epoch, bad_epochs = (value if math.isfinite(value) else None), epoch, 0
            synchronize(device)
            time_to_best = time.perf_counter() - start
        else:
            bad_epochs += 1
        t2 = time.perf_counter()
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc,
                        "nonfinite_steps": bad_steps, "train_s": t1 - t0, "val_s": t2 - t1,
                        "loss_scale": scaler.get_scale() if recipe.loss_scaling else None})
        epochs.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}", val_auc=f"{val_auc:.3f}",
                           best=best_epoch)
        diverged = not math.isfinite(val_loss) or not math.isfinite(train_loss)
        if parallel.broadcast_stop(diverged or bad_epochs >= int(run["patience"]) and epoch >= int(run["min_epochs"])
                                   or subsets_harness.out_of_time(recipe.setting, time.perf_counter() - start)):
            break
    synchronize(device)
    train_total = time.perf_counter() - start
    e_train = energy.read()
    epochs.close()
    if not parallel.is_main():
        return {}
    first_batch = torch.stack([data.train[i][0] for i in range(min(bs // parallel.world_size(), len(data.train)))])
    breakdown = memory_breakdown(
        model, optimizer, activations_saved_bytes=saved_activation_bytes(model, batches(first_batch), recipe.autocast()),
        allocator_peak_bytes=train_peak if device.type == "cuda" else None)

    # The best-on-validation checkpoint, read back from disk, is what gets tested and timed.
    checkpoint = torch.load(ckpt_path, map_location=device, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    val_loss, val_p, val_y = predict(model, val_loader, recipe, batches)
    threshold = THRESHOLD_RULES[run["threshold_rule"]](val_y, val_p)
    with PeakMemory(device) as tmem:
        test_loss, test_p, test_y = predict(model, test_loader, recipe, batches)
    eval_peak, eval_growth = max(eval_peak, tmem.peak_bytes), max(eval_growth, tmem.growth_bytes)
    val_metrics = {**binary_metrics(val_y, val_p, threshold), "loss": val_loss}
    test_metrics = {**binary_metrics(test_y, test_p, threshold), "loss": test_loss,
                    "accuracy_argmax": float(((test_p > 0.5) == test_y.astype(bool)).mean())}
    # Kept per image so that the report can resample patients over the seeds of a setting (bootstrap intervals).
    test_ids = [str(data.patient_ids[i]) for i in data.split["test"]]
    intervals = bootstrap_intervals([(test_y, test_p, test_ids, threshold)])
    test_metrics.update(auc_ci=intervals["auc"], balanced_accuracy_ci=intervals["balanced_accuracy"])
    predictions = {"patient_id": test_ids, "label": test_y.astype(int).tolist(), "score": test_p.tolist()}

    preloaded = [batches(x) for x, _ in test_loader]
    synchronize(device)
    inference_s, inference_all, imem, inference_j = time_inference(
        model, preloaded, recipe, device, int(run["inference_repeats"]), int(run["warmup_batches"]), energy)
    n_test = sum(len(x) for x in preloaded)
    del preloaded

    energy_record = energy.describe()
    if energy.available:
        energy_record.update(train_wh=(e_train - e_start) / 3600, inference_wh=inference_j / 3600,
                             note="RAPL counts the whole CPU package" if energy.source.startswith("rapl") else None)
    record = {
        "format": RECORD_FORMAT,
        "status": "done",
        "run_id": config_mod.run_name(run),
        "config_hash": run["hash"],
        "config": run,
        "setting": recipe.record(),
        "data": {"summary": data.summary, "train": len(data.train), "val": len(data.val), "test": len(data.test),
                 "image_size": size, "split_file": "split.json"},
        "model": {"name": run["model"], "params": params, "flops_forward_per_sample": flops,
                  "input_shape": list(example.shape), "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())},
        "training": {"epochs_run": len(history), "best_epoch": best_epoch, "monitor": run["monitor"],
                     "best_value": None if best is None else (-best if maximise else best),
                     "stopped_early": len(history) < int(run["epochs"]) and not diverged, "diverged": diverged,
                     "nonfinite_steps": nonfinite_steps, "history": history, "checkpoint": CHECKPOINT_NAME},
        "metrics": {"threshold_rule": run["threshold_rule"], "threshold": threshold, "val": val_metrics, "test": test_metrics,
                    "test_predictions": predictions},
        "subsets": subsets_harness.record(selection, importance, recipe.setting, train_total),
        "resources": {
            "memory": {"method": memory_method, "train_peak_bytes": train_peak, "eval_peak_bytes": eval_peak,
                       "inference_peak_bytes": imem.peak_bytes, "train_growth_bytes": train_growth,
                       "eval_growth_bytes": eval_growth, "inference_growth_bytes": imem.growth_bytes,
                       "optimizer_state_bytes": optimizer_state_bytes(optimizer), "breakdown": breakdown,
                       "note": "peak: highest use in the phase; growth: peak minus use when the phase began"},
            "time": {"train_total_s": train_total, "to_best_s": time_to_best, "inference_s": inference_s,
                     "inference_runs_s": inference_all, "inference_per_sample_ms": 1e3 * inference_s / max(1, n_test),
                     "inference_batches": len(test_loader), "synchronised": True,
                     "note": "train time includes the validation pass of each epoch and checkpoint saving"},
            "energy": energy_record,
        },
        "parallel": parallel.describe(len(train_set), bs),
        "environment": environment(device),
    }
    write_record(run_dir / RECORD_NAME, record)
    return record


def _summary_line(record: dict) -> str:
    """One line per finished run, under 100 columns for the usual names (the run's folder has its full name)."""
    from pyquant.experiment.report import train_memory_bytes

    c, t, r = record["config"], record["metrics"]["test"], record["resources"]
    memory = train_memory_bytes(record)
    ci = t.get("auc_ci")
    return (f"{c['model']} {c['setting']} S{c['scale']} seed{c['seed']}: AUC {t['auc']:.3f}"
            + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f" bal.acc {t['balanced_accuracy']:.3f} "
            f"{r['time']['train_total_s']:.0f} s train mem. {'n/a' if memory is None else f'{memory / 2**20:.1f}'} MiB")


def _child(run: dict, run_dir: str, progress: bool) -> None:
    try:
        run_one(run, Path(run_dir), get_task(run["task"], run["data"]), progress)
    except (OSError, KeyError, ValueError) as e:  # missing data, bad config, full disk: one line, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _start(run: dict, run_dir: Path, progress: bool):
    """``run_one`` started in a fresh (spawned) Python process, so that its process memory figures are its own."""
    return parallel.spawn(_child, (run, str(run_dir), progress))  # a Ctrl-C: exit code 130, one line


def _result(run: dict, run_dir: Path, exitcode: int) -> dict:
    """The record of a run's finished process(es), or the error of its exit code."""
    if exitcode == 130:
        raise KeyboardInterrupt
    record = read_record(Path(run_dir) / RECORD_NAME)
    if exitcode != 0 or record is None:
        raise RuntimeError(f"run {config_mod.run_name(run)} failed (exit code {exitcode}); its error is above")
    return record


def run_isolated(run: dict, run_dir: Path, progress: bool = True) -> dict:
    """``run_one`` in a fresh Python process (spawned), so that its process memory figures are its own; with
    ``nproc`` > 1, in that many data-parallel processes (pyquant.experiment.parallel)."""
    if int(run.get("nproc", 1)) > 1:
        return _result(run, run_dir, parallel.launch(run, run_dir, progress))
    process = _start(run, run_dir, progress)
    try:
        process.join()
    except KeyboardInterrupt:
        parallel.stop_after_interrupt([process])
        raise
    return _result(run, run_dir, process.exitcode)


def check_names(runs: list[dict]) -> None:
    """Fail before anything runs when a task, model, setting or optimizer name is not registered."""
    from pyquant.experiment.models import MODELS
    from pyquant.experiment.settings import OPTIMIZERS, get_setting
    from pyquant.experiment.tasks import TASKS

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
                finish(run, run_dir, lock_path, lambda: _result(run, run_dir, process.exitcode))

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
                finished = is_finished(run_dir, run["hash"])  # by another process since the list was made
                if not finished and run_dir.exists():  # an interrupted earlier attempt: start it again from scratch
                    shutil.rmtree(run_dir)
                if not finished and jobs > 1:
                    process = _start(run, run_dir, False)
                    active[process.sentinel] = (process, run, run_dir, lock_path)
                    continue
            except BaseException:
                lock.release(lock_path)
                raise
            if finished:
                lock.release(lock_path)
                bar.update()
            elif cfg["isolate"] or int(run.get("nproc", 1)) > 1:
                finish(run, run_dir, lock_path, lambda: run_isolated(run, run_dir, progress))
            else:
                finish(run, run_dir, lock_path, lambda: run_one(run, run_dir, task_data(run), progress))
        settle(1)  # all done
    except KeyboardInterrupt:
        parallel.stop_after_interrupt([a[0] for a in active.values()])
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
