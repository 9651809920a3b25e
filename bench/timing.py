"""Timers shared by the benchmarks and comparison scripts.

Interleaved best-of timing for the comparison scripts: on a machine shared with other jobs a burst of load slows
every function of a round alike, and the minimum over the rounds keeps the rounds it spared. The median of a few
runs for the reference figures a benchmark compares its entry against (the dense model when its entry did not run
first)."""

from __future__ import annotations

import time


def interleaved_minimum(fns: dict, rounds: int, warmup: int = 2) -> dict:
    """Seconds: the minimum per function over `rounds` rounds, each calling every function once in turn, after
    `warmup` calls of each (buffers, oneDNN primitives)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def median_time(fn, rounds: int) -> float:
    """Seconds: the median of `rounds` calls of `fn`, after one call (warm-up)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
