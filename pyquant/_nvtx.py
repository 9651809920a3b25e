"""NVTX ranges around every kernel launch, so Nsight Systems shows pyquant's ops by name; while torch.profiler
records, the same name is also a `record_function` range, so its traces show pyquant's ops too.

The `nvtx` package's ranges cost next to nothing when no profiler is attached; the torch.profiler range is only
opened while that profiler is on (one global flag read per launch).
"""

from __future__ import annotations

import contextlib
import functools

import torch.autograd.profiler as _torch_profiler

try:
    import nvtx as _nvtx
except ImportError:  # nvtx is a dependency, but a missing profiler hook must never break training
    _nvtx = None


@functools.lru_cache(maxsize=None)
def _nvtx_range(name: str) -> tuple[str, contextlib.AbstractContextManager]:
    """The label and the NVTX range of kernel `name`, made once: an annotate object can be entered again and again,
    and making one per launch took 11.5 us with cold caches where entering a made one takes 7.7-8.1 (bench/NOTES.md)."""
    label = f"pyquant::{name}"
    return label, contextlib.nullcontext() if _nvtx is None else _nvtx.annotate(label, domain="pyquant")


def kernel_range(name: str):
    """A context manager marking one kernel launch named `pyquant::<name>`."""
    label, nvtx_range = _nvtx_range(name)
    if not _torch_profiler._is_profiler_enabled:
        return nvtx_range
    return _with_torch_range(nvtx_range, label)


@contextlib.contextmanager
def _with_torch_range(nvtx_range, label: str):
    with nvtx_range, _torch_profiler.record_function(label):
        yield
