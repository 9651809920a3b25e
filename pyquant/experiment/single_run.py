"""One run: train with early stopping on validation, save the best-on-validation checkpoint atomically, reload it,
choose the decision threshold on validation, test it, time inference of that model on pre-loaded test batches, and
write the run's record (pyquant.experiment.records) last.

:func:`run_one` is its steps in order; the order is part of the result (the model, the proxy of a subset setting
and the data loaders draw from the seeded random number generators in this order).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyquant.experiment import config as config_mod
from pyquant.experiment import parallel, subset_settings
from pyquant.experiment.loop import Batches, data_loader, predict, seed_everything, time_inference, train_epoch
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
from pyquant.experiment.records import (
    CHECKPOINT_NAME,
    RECORD_FORMAT,
    RECORD_NAME,
    SPLIT_NAME,
    save_checkpoint,
    write_record,
)
from pyquant.experiment.settings import resolve
from pyquant.experiment.tasks import TaskData


def run_one(run: dict, run_dir: Path, data: TaskData, progress: bool = True) -> dict:
    """Train, select, test and time one run; write and return its record (on ranks other than 0 of a
    data-parallel run, which only train: ``{}``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = parallel.rank_device(run["device"])
    if run["threads"]:
        torch.set_num_threads(int(run["threads"]))
    seed_everything(run["seed"])
    recipe = resolve(run["setting"], device.type, run["amp_dtype"], run["half_dtype"])
    size = _image_size(run, data)
    _save_split(run, run_dir, data)
    built = _build(run, data, recipe, device, size)
    feed = _feed(run, data, recipe, device, size)
    if run["monitor"] not in ("val_loss", "val_auc"):
        raise ValueError(f"monitor must be val_loss or val_auc, got {run['monitor']!r}")
    energy = EnergyMeter(device)
    trained = _train(run, run_dir, built, feed, recipe, device, energy, progress)
    if not parallel.is_main():
        return {}
    breakdown = memory_breakdown(
        built.model, built.optimizer,
        activations_saved_bytes=saved_activation_bytes(built.model, built.batches(_first_batch(run, data)),
                                                       recipe.autocast()),
        allocator_peak_bytes=trained.train_peak if device.type == "cuda" else None)
    metrics = _test(run, run_dir, built, feed, recipe, device, trained, data)
    timing = _inference_timing(run, built, feed, recipe, device, energy)
    record = _record(run, data, size, recipe, device, built, feed, trained, metrics, timing, breakdown, energy)
    write_record(run_dir / RECORD_NAME, record)
    return record


def _image_size(run: dict, data: TaskData) -> int | None:
    """The side of the images the run trains on (None for a task without images); a ValueError for a run that
    cannot work on ``data``."""
    scale = int(run["scale"])
    if data.image_size is None and scale != 1:
        raise ValueError(f"task {run['task']!r} has no images: down-sampling scale must be 1, got {scale}")
    empty = [part for part in ("train", "val", "test") if len(getattr(data, part)) == 0]
    if empty:  # config.validate refuses zero fractions; too few patients for three splits ends here
        raise ValueError(f"task {run['task']!r}: the {' and '.join(empty)} split(s) are empty; a run trains on train, "
                         "early-stops on val and reports test: give each split a positive fraction and data for it")
    return None if data.image_size is None else data.image_size // scale


def _save_split(run: dict, run_dir: Path, data: TaskData) -> None:
    from pyquant.data import save_split

    if parallel.is_main():
        save_split(run_dir / SPLIT_NAME, data.split, data.patient_ids, meta={"task": run["task"], "data": run["data"]})


@dataclass
class _Built:
    """The model to train and what trains it."""

    model: torch.nn.Module  # validated, saved, tested and timed (rank 0's)
    train_model: torch.nn.Module  # DistributedDataParallel over ``model`` under --nproc N; ``model`` itself otherwise
    optimizer: torch.optim.Optimizer
    scaler: object
    batches: Batches  # to the device, down-sampled, in the model's input dtype
    params: int
    flops: object
    input_shape: list


def _build(run: dict, data: TaskData, recipe, device: torch.device, size: int | None) -> _Built:
    from pyquant.amp import GradScaler

    model = create_model(run["model"], in_chans=data.in_chans, num_classes=data.num_classes,
                         pretrained=run["pretrained"], img_size=size, **run["model_args"])
    params = sum(p.numel() for p in model.parameters())
    example = torch.zeros((1, data.in_chans, size, size) if size else (1, data.in_chans))
    flops = count_flops(model, example)
    model = recipe.prepare_model(model.to(device))
    optimizer = recipe.make_optimizer(model.parameters(), float(run["lr"]))
    scaler = GradScaler(device.type, enabled=recipe.loss_scaling)
    return _Built(model=model, train_model=parallel.wrap(model, device), optimizer=optimizer, scaler=scaler,
                  batches=Batches(device, size, recipe.model_dtype), params=params, flops=flops,
                  input_shape=list(example.shape))


@dataclass
class _Feed:
    """The data a run reads: the training set (a subset under ``subset:...``) and the three loaders."""

    train_set: object
    selection: dict  # the subset selection's record, {} without one
    importance: object  # the ImportanceSampler of ``importance-sampling`` settings, else None
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader


def _feed(run: dict, data: TaskData, recipe, device: torch.device, size: int | None) -> _Feed:
    bs, workers, seed = int(run["batch_size"]), int(run["workers"]), run["seed"]
    # pyquant.subsets: the training subset is chosen before training (timed apart), importance sampling during it.
    train_set, selection = subset_settings.training_subset(run, recipe.setting, data,
                                                           Batches(device, size, torch.float32), device)
    importance = subset_settings.importance_sampler(recipe.setting, len(train_set), bs, seed, parallel.world_size())
    if parallel.world_size() > 1:
        train = parallel.train_loader(train_set, bs, workers, seed)
    elif importance is not None:
        train = importance.loader(train_set, workers)
    else:
        train = data_loader(train_set, bs, workers, True, seed)
    return _Feed(train_set=train_set, selection=selection, importance=importance, train=train,
                 val=data_loader(data.val, bs, workers, False, seed),
                 test=data_loader(data.test, bs, workers, False, seed))


class _EarlyStopping:
    """Which epoch is the best on validation so far (its checkpoint is the one kept), and when to stop."""

    def __init__(self, run: dict):
        self.monitor = run["monitor"]
        self.maximise = self.monitor == "val_auc"
        self.patience, self.min_epochs = int(run["patience"]), int(run["min_epochs"])
        self.best, self.best_epoch, self.bad_epochs = None, 0, 0  # best: minimised (AUC negated)

    def update(self, epoch: int, val_loss: float, val_auc: float) -> float | None:
        """The monitored value when ``epoch`` is the new best (always for the first epoch), else None."""
        value = -val_auc if self.maximise else val_loss
        improved = math.isfinite(value) and (self.best is None or value < self.best)
        if not (improved or self.best_epoch == 0):
            self.bad_epochs += 1
            return None
        self.best, self.best_epoch, self.bad_epochs = (value if math.isfinite(value) else None), epoch, 0
        return float(-value if self.maximise else value)

    def patience_spent(self, epoch: int) -> bool:
        return self.bad_epochs >= self.patience and epoch >= self.min_epochs

    def best_value(self) -> float | None:
        return None if self.best is None else (-self.best if self.maximise else self.best)


@dataclass
class _Trained:
    """What the training phase measured (on ranks other than 0 only ``train_s``)."""

    stopping: _EarlyStopping
    history: list = field(default_factory=list)
    time_to_best: float | None = None
    diverged: bool = False
    nonfinite_steps: int = 0
    memory_method: str = ""
    train_peak: int = 0
    eval_peak: int = 0
    train_growth: int = 0
    eval_growth: int = 0
    train_s: float = 0.0
    train_joules: float | None = None


def _train(run: dict, run_dir: Path, built: _Built, feed: _Feed, recipe, device: torch.device, energy: EnergyMeter,
           progress: bool) -> _Trained:
    """The epochs, until early stopping, divergence, the time budget or the last epoch; rank 0 validates each and
    saves the best-on-validation checkpoint, and tells the other ranks when to stop."""
    from tqdm.auto import tqdm

    trained = _Trained(stopping=_EarlyStopping(run))
    stopping, model, scaler = trained.stopping, built.model, built.scaler
    epochs = tqdm(range(1, int(run["epochs"]) + 1), desc="epochs", leave=False, disable=not progress, unit="ep")
    synchronize(device)
    e_start = energy.read()
    start = time.perf_counter()
    for epoch in epochs:
        parallel.set_epoch(feed.train, epoch)
        t0 = time.perf_counter()
        with PeakMemory(device) as mem:
            train_loss, bad_steps = train_epoch(built.train_model, feed.train, built.optimizer, scaler, recipe,
                                                built.batches, feed.importance)
        train_loss = parallel.mean_over_ranks(train_loss)
        synchronize(device)
        if not parallel.is_main():  # rank 0 validates and decides; the other ranks only train
            if parallel.broadcast_stop(False):
                break
            continue
        t1 = time.perf_counter()
        with PeakMemory(device) as vmem:
            val_loss, val_p, val_y = predict(model, feed.val, recipe, built.batches)
        val_auc = roc_auc(val_y, val_p)
        trained.nonfinite_steps += bad_steps
        trained.memory_method = mem.method
        trained.train_peak = max(trained.train_peak, mem.peak_bytes)
        trained.eval_peak = max(trained.eval_peak, vmem.peak_bytes)
        trained.train_growth = max(trained.train_growth, mem.growth_bytes)
        trained.eval_growth = max(trained.eval_growth, vmem.growth_bytes)
        value = stopping.update(epoch, val_loss, val_auc)
        if value is not None:
            save_checkpoint(run_dir / CHECKPOINT_NAME, {"model": model.state_dict(), "epoch": epoch,
                                                        "config_hash": run["hash"], "monitor": run["monitor"],
                                                        "value": value})
            synchronize(device)
            trained.time_to_best = time.perf_counter() - start
        t2 = time.perf_counter()
        trained.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc,
                                "nonfinite_steps": bad_steps, "train_s": t1 - t0, "val_s": t2 - t1,
                                "loss_scale": scaler.get_scale() if recipe.loss_scaling else None})
        epochs.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}", val_auc=f"{val_auc:.3f}",
                           best=stopping.best_epoch)
        trained.diverged = not math.isfinite(val_loss) or not math.isfinite(train_loss)
        if parallel.broadcast_stop(trained.diverged or stopping.patience_spent(epoch)
                                   or subset_settings.out_of_time(recipe.setting, time.perf_counter() - start)):
            break
    synchronize(device)
    trained.train_s = time.perf_counter() - start
    e_train = energy.read()
    epochs.close()
    if energy.available:
        trained.train_joules = e_train - e_start
    return trained


def _first_batch(run: dict, data: TaskData) -> torch.Tensor:
    """One rank's batch of training inputs, for the memory breakdown's saved activations."""
    n = min(int(run["batch_size"]) // parallel.world_size(), len(data.train))
    return torch.stack([data.train[i][0] for i in range(n)])


def _test(run: dict, run_dir: Path, built: _Built, feed: _Feed, recipe, device: torch.device, trained: _Trained,
          data: TaskData) -> dict:
    """The record's ``metrics``: the best-on-validation checkpoint, read back from disk, gets its threshold on
    validation and is tested (the test pass's memory goes into ``trained``'s evaluation peak)."""
    model, batches = built.model, built.batches
    checkpoint = torch.load(run_dir / CHECKPOINT_NAME, map_location=device, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    val_loss, val_p, val_y = predict(model, feed.val, recipe, batches)
    threshold = THRESHOLD_RULES[run["threshold_rule"]](val_y, val_p)
    with PeakMemory(device) as tmem:
        test_loss, test_p, test_y = predict(model, feed.test, recipe, batches)
    trained.eval_peak = max(trained.eval_peak, tmem.peak_bytes)
    trained.eval_growth = max(trained.eval_growth, tmem.growth_bytes)
    val_metrics = {**binary_metrics(val_y, val_p, threshold), "loss": val_loss}
    test_metrics = {**binary_metrics(test_y, test_p, threshold), "loss": test_loss,
                    "accuracy_argmax": float(((test_p > 0.5) == test_y.astype(bool)).mean())}
    # Kept per image so that the report can resample patients over the seeds of a setting (bootstrap intervals).
    test_ids = [str(data.patient_ids[i]) for i in data.split["test"]]
    intervals = bootstrap_intervals([(test_y, test_p, test_ids, threshold)])
    test_metrics.update(auc_ci=intervals["auc"], balanced_accuracy_ci=intervals["balanced_accuracy"])
    predictions = {"patient_id": test_ids, "label": test_y.astype(int).tolist(), "score": test_p.tolist()}
    return {"threshold_rule": run["threshold_rule"], "threshold": threshold, "val": val_metrics, "test": test_metrics,
            "test_predictions": predictions}


@dataclass
class _Inference:
    median_s: float
    runs_s: list
    memory: PeakMemory
    joules: float | None
    samples: int


def _inference_timing(run: dict, built: _Built, feed: _Feed, recipe, device: torch.device,
                    energy: EnergyMeter) -> _Inference:
    """Inference of the tested model over the test set, batches loaded onto the device beforehand."""
    preloaded = [built.batches(x) for x, _ in feed.test]
    synchronize(device)
    median_s, runs_s, memory, joules = time_inference(built.model, preloaded, recipe, device,
                                                      int(run["inference_repeats"]), int(run["warmup_batches"]), energy)
    return _Inference(median_s=median_s, runs_s=runs_s, memory=memory, joules=joules,
                      samples=sum(len(x) for x in preloaded))


def _record(run: dict, data: TaskData, size: int | None, recipe, device: torch.device, built: _Built, feed: _Feed,
            trained: _Trained, metrics: dict, inference: _Inference, breakdown: dict, energy: EnergyMeter) -> dict:
    stopping, model = trained.stopping, built.model
    energy_record = energy.describe()
    if energy.available:
        energy_record.update(train_wh=trained.train_joules / 3600, inference_wh=inference.joules / 3600,
                             note="RAPL counts the whole CPU package" if energy.source.startswith("rapl") else None)
    return {
        "format": RECORD_FORMAT,
        "status": "done",
        "run_id": config_mod.run_name(run),
        "config_hash": run["hash"],
        "config": run,
        "setting": recipe.record(),
        "data": {"summary": data.summary, "train": len(data.train), "val": len(data.val), "test": len(data.test),
                 "image_size": size, "split_file": SPLIT_NAME},
        "model": {"name": run["model"], "params": built.params, "flops_forward_per_sample": built.flops,
                  "input_shape": built.input_shape,
                  "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())},
        "training": {"epochs_run": len(trained.history), "best_epoch": stopping.best_epoch, "monitor": run["monitor"],
                     "best_value": stopping.best_value(),
                     "stopped_early": len(trained.history) < int(run["epochs"]) and not trained.diverged,
                     "diverged": trained.diverged, "nonfinite_steps": trained.nonfinite_steps,
                     "history": trained.history, "checkpoint": CHECKPOINT_NAME},
        "metrics": metrics,
        "subsets": subset_settings.record(feed.selection, feed.importance, recipe.setting, trained.train_s),
        "resources": {
            "memory": {"method": trained.memory_method, "train_peak_bytes": trained.train_peak,
                       "eval_peak_bytes": trained.eval_peak, "inference_peak_bytes": inference.memory.peak_bytes,
                       "train_growth_bytes": trained.train_growth, "eval_growth_bytes": trained.eval_growth,
                       "inference_growth_bytes": inference.memory.growth_bytes,
                       "optimizer_state_bytes": optimizer_state_bytes(built.optimizer), "breakdown": breakdown,
                       "note": "peak: highest use in the phase; growth: peak minus use when the phase began"},
            "time": {"train_total_s": trained.train_s, "to_best_s": trained.time_to_best,
                     "inference_s": inference.median_s, "inference_runs_s": inference.runs_s,
                     "inference_per_sample_ms": 1e3 * inference.median_s / max(1, inference.samples),
                     "inference_batches": len(feed.test), "synchronised": True,
                     "note": "train time includes the validation pass of each epoch and checkpoint saving"},
            "energy": energy_record,
        },
        "parallel": parallel.describe(len(feed.train_set), int(run["batch_size"])),
        "environment": environment(device),
    }
