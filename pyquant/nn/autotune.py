"""Which implementation runs a half-precision layer (Linear16, Conv2d16): pyquant's kernels or torch's.

The rule (docs/low_precision.md has the measurements behind it; bench/test_matmul.py and bench/test_half_step.py
measure it on a machine):

1. float16 on a CPU without native FP16 arithmetic (no AVX512-FP16 / AMX-FP16): pyquant's. torch computes such
   products element by element through float32 conversions, orders of magnitude slower than its float32
   products, which pyquant's float16 products beat.
2. Otherwise (bfloat16, where torch uses the CPU's bf16 dot-product instructions through oneDNN; a CPU with
   native FP16; CUDA): measured. The first forward of a layer for a given input shape times both
   implementations on a random input of that shape (best of 3 after a warm-up, no autograd) and keeps pyquant's
   only if it is at least SPEEDUP_TO_SWITCH faster; the choice is cached per key (layer kind, shapes, dtype,
   device, threads) for the whole process. `decisions()` lists them.
"""

from __future__ import annotations

import functools
import math
import time

import torch

__all__ = ["native_fp16_cpu", "default_impl", "decisions", "choose", "SPEEDUP_TO_SWITCH"]

SPEEDUP_TO_SWITCH = 1.10  # pyquant must be this much faster to replace torch's bfloat16 / native kernels
_decisions: dict[tuple, str] = {}


@functools.cache
def native_fp16_cpu() -> bool:
    """Whether this CPU has native FP16 arithmetic (AVX512-FP16 or AMX-FP16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_fp16", "amx_fp16"})
    except OSError:
        pass
    return False


def default_impl(device: torch.device | str, dtype: torch.dtype) -> str:
    """Rule 1 of the module docstring ("pyquant"), else "auto" (measure per shape)."""
    if torch.device(device).type == "cpu" and dtype == torch.float16 and not native_fp16_cpu():
        return "pyquant"
    return "auto"


def decisions() -> dict[tuple, str]:
    """The measured choices so far: key (layer kind, shapes, dtype, device, threads) -> "pyquant" | "torch"."""
    return dict(_decisions)


def _best_time(fn, reps: int = 3, budget: float | None = None) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        if budget is not None and best > budget:
            break
    return best


def choose(key: tuple, make_runs) -> str:
    """The cached choice for `key`, measured first if needed: make_runs() -> (run_pyquant, run_torch)."""
    hit = _decisions.get(key)
    if hit is None:
        with torch.no_grad():
            run_pyquant, run_torch = make_runs()
            t_pq = _best_time(run_pyquant)
            # torch's side stops early once it is clearly slower
            t_torch = _best_time(run_torch, budget=SPEEDUP_TO_SWITCH * t_pq)
        hit = "pyquant" if t_pq * SPEEDUP_TO_SWITCH <= t_torch else "torch"
        _decisions[key] = hit
    return hit
