"""The training loop's parts, shared by every setting, `pyquant profile` and the benchmarks: a batch's way to the
device, one training step, one epoch, prediction over a loader, and the timing of inference.
"""

from __future__ import annotations

import math
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pyquant.experiment.measure import EnergyMeter, PeakMemory, synchronize


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Batches:
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


def data_loader(dataset, batch_size: int, workers: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    # A last batch of one sample breaks batch norm in training mode: drop it then.
    drop_last = shuffle and len(dataset) % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      drop_last=drop_last, persistent_workers=workers > 0)
