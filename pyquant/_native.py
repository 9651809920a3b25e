"""Loads pyquant's compiled libraries with ctypes and describes their C ABI (csrc/include/pyquant/capi.h)."""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}


class AdamConstants(ctypes.Structure):
    """Mirror of pq::AdamConstants (csrc/include/pyquant/blockwise.h)."""

    _fields_ = [
        ("beta1", ctypes.c_float),
        ("one_minus_beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("one_minus_beta2", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("eps_c2", ctypes.c_float),
        ("c2", ctypes.c_float),
        ("step_size", ctypes.c_float),
        ("decay", ctypes.c_float),
        ("inv_grad_scale", ctypes.c_float),
    ]


class AdamTensor(ctypes.Structure):
    """Mirror of pq_adam_tensor (csrc/include/pyquant/capi.h)."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("state1", ctypes.c_void_p),
        ("state2", ctypes.c_void_p),
        ("absmax1", ctypes.c_void_p),
        ("absmax2", ctypes.c_void_p),
        ("numel", ctypes.c_int64),
        ("param_dtype", ctypes.c_int32),
        ("grad_dtype", ctypes.c_int32),
        ("state_bits", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("k", AdamConstants),
    ]


def _candidate_dirs() -> list[Path]:
    import pyquant

    dirs = []
    if os.environ.get("PYQUANT_LIB_DIR"):
        dirs.append(Path(os.environ["PYQUANT_LIB_DIR"]))
    # An editable install puts the compiled files in site-packages/pyquant/_lib, which is on pyquant.__path__.
    dirs += [Path(p) / "_lib" for p in pyquant.__path__]
    return dirs


def _find(name: str) -> Path | None:
    for d in _candidate_dirs():
        if (d / name).is_file():
            return d / name
    return None


ABI_VERSION = 3  # PQ_ABI_VERSION of csrc/include/pyquant/capi.h, which these ctypes descriptions mirror


def _checked(lib: ctypes.CDLL, path: Path) -> ctypes.CDLL | None:
    """`lib`, or None (with a warning) when it was built from sources with another C ABI."""
    version = lib.pq_abi_version() if hasattr(lib, "pq_abi_version") else 1
    if version == ABI_VERSION:
        return lib
    warnings.warn(
        f"pyquant: {path} was built from other sources (C ABI {version}, this pyquant needs {ABI_VERSION}); "
        "rebuild it with `pip install -e .`; until then the reference implementation runs",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


@functools.cache
def cpu_library() -> ctypes.CDLL | None:
    """The C++ CPU library, or None (with one warning) when it was not built."""
    # PYQUANT_NO_LIB=1 pretends the library is missing (tests of the fallback).
    path = None if os.environ.get("PYQUANT_NO_LIB") == "1" else _find("libpyquant_cpu.so")
    if path is None:
        warnings.warn(
            "pyquant: the compiled CPU library was not found (build it with `pip install -e .`); "
            "falling back to the reference implementation in torch, which is much slower",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    lib = _checked(ctypes.CDLL(str(path)), path)
    if lib is None:
        return None
    P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.pq_isa.restype = I32
    lib.pq_set_isa.argtypes = [I32]
    lib.pq_set_isa.restype = I32
    lib.pq_build_code_table.argtypes = [P, P]
    lib.pq_build_code_table.restype = None
    lib.pq_quantize_blockwise.argtypes = [P, I32, I64, I64, P, P, P]
    lib.pq_quantize_blockwise.restype = None
    lib.pq_dequantize_blockwise.argtypes = [P, P, P, I64, I64, P, I32]
    lib.pq_dequantize_blockwise.restype = None
    lib.pq_adam_step.argtypes = [ctypes.POINTER(AdamTensor), I32, P, P, P, P, I32]
    lib.pq_adam_step.restype = I64
    lib.pq_set_cpu_sqrt.argtypes = [P]
    lib.pq_set_cpu_sqrt.restype = None
    lib.pq_set_cpu_sqrt(_torch_cpu_sqrt())
    return lib


def _torch_cpu_sqrt() -> int | None:
    """The address of the vsSqrt that torch.sqrt uses on CPU float32, or None when torch's sqrt is IEEE.

    Adam's denominator has a square root; bitsandbytes computes it with torch.sqrt, and torch 2.14.1's CPU
    builds compute that with MKL's vsSqrt, which is up to 1 ulp away from IEEE sqrtf for about one value
    in six. The CPU library calls the same routine so that its bits equal torch's and bitsandbytes'.
    """
    probe = torch.rand(65536, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 65536)
    torch_sqrt = torch.sqrt(probe)
    if torch.equal(torch_sqrt, torch.sqrt(probe.double()).float()):
        return None
    try:
        libtorch = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        vssqrt = libtorch.VSSQRT_
    except (OSError, AttributeError):
        vssqrt = None
    if vssqrt is not None:
        out = torch.empty_like(probe)
        vssqrt(ctypes.byref(ctypes.c_int(probe.numel())), ctypes.c_void_p(probe.data_ptr()), ctypes.c_void_p(out.data_ptr()))
        if torch.equal(out, torch_sqrt):
            return ctypes.cast(vssqrt, ctypes.c_void_p).value
    warnings.warn(
        "pyquant: torch's CPU sqrt is not IEEE sqrt and pyquant could not find the routine it uses; the cpu "
        "backend's Adam steps may differ from bitsandbytes' and the reference backend in the last bit",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


@functools.cache
def cuda_library() -> ctypes.CDLL | None:
    """The CUDA library, or None when it was not built or there is no CUDA device."""
    if not torch.cuda.is_available():
        return None
    path = _find("libpyquant_cuda.so")
    if path is None:
        return None
    return _checked(ctypes.CDLL(str(path)), path)


def cpu_isa() -> str:
    lib = cpu_library()
    return "none" if lib is None else ISA_NAMES[lib.pq_isa()]
