"""The one C-ABI binding (pyquant/backends/capi.py) against the C header it mirrors, and its stale-library policy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyquant import _contract, backends
from pyquant.backends import capi

HEADER = (Path(__file__).resolve().parents[1] / "csrc" / "include" / "pyquant" / "capi.h").read_text()


def _enum(prefix: str) -> dict[str, int]:
    return {name.lower(): int(value) for name, value in re.findall(rf"\b{prefix}_(\w+)\s*=\s*(\d+)", HEADER)}


def _declarations() -> dict[str, int]:
    """Every function declared in capi.h: name -> number of parameters."""
    code = re.sub(r"//[^\n]*", "", HEADER)
    found = {}
    for name, params in re.findall(r"\b(pq_\w+)\s*\(([^()]*)\)\s*;", code):
        params = params.strip()
        found[name] = 0 if params in ("", "void") else params.count(",") + 1
    return found


def test_dtype_and_isa_codes_are_the_headers():
    dtypes = _enum("PQ_DTYPE")
    assert dtypes, "capi.h declares no PQ_DTYPE_* codes"
    assert {getattr(torch, name): code for name, code in dtypes.items()} == _contract.DTYPE_CODES
    assert {code: name for name, code in _enum("PQ_ISA").items()} == _contract.ISA_NAMES


def test_abi_version_is_the_headers():
    assert int(re.search(r"#define PQ_ABI_VERSION (\d+)", HEADER).group(1)) == capi.ABI_VERSION


def test_every_bound_function_is_declared_with_its_arity():
    declared = _declarations()
    bound = {**capi.CPU_FUNCTIONS, **capi.CUDA_FUNCTIONS}
    assert set(bound) == set(declared), (
        f"bound, not declared: {sorted(set(bound) - set(declared))}; declared, not bound: {sorted(set(declared) - set(bound))}"
    )
    wrong = {name: (len(bound[name][0]), arity) for name, arity in declared.items() if len(bound[name][0]) != arity}
    assert not wrong, f"argtypes vs parameters in capi.h: {wrong}"


@pytest.mark.skipif(not backends.available("cpu", "cpu"), reason="the CPU library is not built")
def test_a_library_from_other_sources_is_refused_with_the_rebuild_command():
    script = (
        "import torch, pyquant.functional as F\n"
        "from pyquant.backends import capi\n"
        "capi.ABI_VERSION += 1\n"
        "try:\n"
        "    F.quantize_blockwise(torch.randn(10))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYQUANT_BACKEND"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    assert "built from other sources" in out and f"`{capi.REBUILD}`" in out, out
