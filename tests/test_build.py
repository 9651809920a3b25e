"""The build and the C ABI: the one C-ABI binding (pyquant/backends/capi.py) against the C header it mirrors, its
stale-library policy, and the CUDA sources' compile check (.ci/compile_cuda.sh: warnings as errors, and no
approximate, flush-to-zero or contracted float32 instruction in the PTX), which runs wherever nvcc exists."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyquant import _contract, backends
from pyquant.backends import capi

from conftest import needs_cpu_library

ROOT = Path(__file__).resolve().parents[1]
HEADER = (ROOT / "csrc" / "include" / "pyquant" / "capi.h").read_text()
COMPILE_SCRIPT = ROOT / ".ci" / "compile_cuda.sh"


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


@needs_cpu_library
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


# ---- the CUDA backend: it imports without CUDA, and its sources compile ----
def test_cuda_module_imports_without_cuda_work():
    # Importing the backend registers its kernels (no CUDA call): the ops of the cpu library, all of them.
    hand_written = {"code_table", "quantize_blockwise", "dequantize_blockwise", "adam_step", "one_state_step",
                    "ademamix_step", "unscale_"}
    assert hand_written <= set(backends.kernels_of("cuda")) and hand_written <= set(backends.kernels_of("cpu"))
    # The descriptors are copied as raw bytes followed by 8-byte aligned int64s (csrc/cuda/adam.cu, one_state.cu and
    # ademamix.cu static_assert this).
    for descriptor in (capi.AdamTensor, capi.OneStateTensor, capi.AdemamixTensor):
        assert ctypes.alignment(descriptor) == 8 and ctypes.sizeof(descriptor) % 8 == 0


def _run_compile_script(**env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(COMPILE_SCRIPT)], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_cuda_kernels_compile_with_exact_ieee_ptx():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    result = _run_compile_script()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CUDA compile check passed" in result.stdout


def test_compile_check_catches_fast_math():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    result = _run_compile_script(PYQUANT_CUDA_ARCHS="80", PYQUANT_NVCC_EXTRA_FLAGS="--use_fast_math")
    assert result.returncode != 0, result.stdout + result.stderr
    assert "FAILED" in result.stderr


def test_compile_script_skips_without_nvcc(tmp_path):
    # An empty PATH: the script decides with bash's builtin `command -v` before it needs any other tool.
    result = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(COMPILE_SCRIPT)], capture_output=True, text=True, timeout=60,
        env={"PATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nvcc not found: skipping the CUDA compile check" in result.stdout
