"""The short demo the README runs until the experiment harness lands.

Trains the same small network twice on the same synthetic task, once with torch.optim.Adam and once with
pyquant.Adam8bit, and prints the loss, the optimizer-state bytes and the median step time of each.
"""

from __future__ import annotations

import statistics
import time

import torch

import pyquant


def _task(seed: int = 0, n: int = 2048, features: int = 256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, 4, generator=g)
    y = (x @ w).argmax(1)
    return x, y


def _model(features: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(features, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 4)
    )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (shared tensors, like the code maps, counted once)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def train(make_optimizer, epochs: int = 30, batch: int = 256, lr: float = 1e-3) -> dict:
    x, y = _task()
    model = _model(x.shape[1])
    optimizer = make_optimizer(model.parameters(), lr)
    step_times = []
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            loss = torch.nn.functional.cross_entropy(model(x[i : i + batch]), y[i : i + batch])
            optimizer.zero_grad()
            loss.backward()
            start = time.perf_counter()
            optimizer.step()
            step_times.append(time.perf_counter() - start)
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(x), y).item()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return {
        "loss": final,
        "accuracy": accuracy,
        "state_bytes": optimizer_state_bytes(optimizer),
        "params": sum(p.numel() for p in model.parameters()),
        "step_ms": 1e3 * statistics.median(step_times[5:]),
    }


def main(epochs: int = 30) -> dict:
    runs = {
        "torch.optim.Adam": train(lambda p, lr: torch.optim.Adam(p, lr=lr), epochs),
        "pyquant.Adam8bit": train(lambda p, lr: pyquant.Adam8bit(p, lr=lr), epochs),
    }
    params = runs["torch.optim.Adam"]["params"]
    print(f"A {params:,}-parameter MLP, {epochs} epochs on a synthetic 4-class task (CPU, {torch.get_num_threads()} threads)")
    print(f"{'optimizer':<18} {'final loss':>10} {'accuracy':>9} {'state bytes':>12} {'bytes/param':>11} {'step ms':>8}")
    for name, r in runs.items():
        print(
            f"{name:<18} {r['loss']:>10.4f} {r['accuracy']:>9.3f} {r['state_bytes']:>12,} "
            f"{r['state_bytes'] / r['params']:>11.3f} {r['step_ms']:>8.2f}"
        )
    saving = 1 - runs["pyquant.Adam8bit"]["state_bytes"] / runs["torch.optim.Adam"]["state_bytes"]
    print(f"optimizer state: {100 * saving:.1f}% smaller with 8-bit states")
    return runs
