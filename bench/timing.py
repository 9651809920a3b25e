"""Interleaved best-of timing for the comparison scripts: on a machine shared with other jobs a burst of load slows
every function of a round alike, and the minimum over the rounds keeps the rounds it spared."""

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
