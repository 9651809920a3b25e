"""NVTX ranges around every kernel launch, so Nsight Systems shows pyquant's ops by name.

The `nvtx` package's ranges cost next to nothing when no profiler is attached.
"""

from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx
except ImportError:  # nvtx is a dependency, but a missing profiler hook must never break training
    _nvtx = None


def kernel_range(name: str):
    """A context manager marking one kernel launch named `pyquant::<name>`."""
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(f"pyquant::{name}", domain="pyquant")
