import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. The variable must be set
# before triton decorates pyquant's kernels, so it is set here, before any test module imports pyquant.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import contextlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def nvtx_names(monkeypatch):
    """The (message, domain) of every NVTX range pyquant opens while the test runs."""
    from pyquant import _nvtx

    names = []

    class Recorder:
        @staticmethod
        def annotate(message, domain):
            names.append((message, domain))
            return contextlib.nullcontext()

    monkeypatch.setattr(_nvtx, "_nvtx", Recorder)
    return names


@pytest.fixture
def outputs_by_thread_count():
    """Run a Python script under OMP_NUM_THREADS=1, 2 and 3; return the set of its last printed lines."""

    def run(script: str) -> set[str]:
        lines = set()
        for threads in ("1", "2", "3"):
            env = dict(os.environ, OMP_NUM_THREADS=threads)
            out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            lines.add(out.stdout.strip().splitlines()[-1])
        return lines

    return run
