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


# ---- what every call into a compiled library checks first ----
# The C entry points can check sizes, dtype codes and pointers (they return PQ_INVALID_ARGUMENT), but not how
# large a buffer behind a pointer is: these checks compare every tensor with the sizes the call will use, so
# that no kernel reads or writes outside a tensor. They are a few attribute reads per tensor.
FLOAT_DTYPES = tuple(DTYPE_CODES)
INVALID_ARGUMENT = 2  # PQ_INVALID_ARGUMENT of csrc/include/pyquant/capi.h


def check_tensor(t, name: str, dtypes: tuple, device: torch.device, numel: int | None = None) -> None:
    """Raise unless `t` is a contiguous tensor of one of `dtypes` on `device` with `numel` elements (if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} is {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}); the kernel reads it linearly")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")


def check_code(code, name: str, device: torch.device) -> None:
    check_tensor(code, name, (torch.float32,), device, 256)


MAX_BLOCKSIZE = 2**63 - 1  # the C ABI's int64


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 0 < blocksize <= MAX_BLOCKSIZE:
        raise ValueError(f"blocksize must be a positive int below 2**63 (an int64), got {blocksize!r}")
    return blocksize


def blocks_of(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


OPTIMIZER_BLOCK = 256  # pq::kOptimizerBlock: elements per absmax entry of 8-bit states
STATE_DTYPES = (torch.uint8, torch.float32)  # 8-bit codes, or float32 moments
ABSMAX = (torch.float32,)


def check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite) -> None:
    """The operands of one adam_step call (one device): everything the kernel trusts without seeing.

    It runs every step for every tensor, so the common case is one expression per tensor without building
    messages (about 2 us); a tensor that does not fit goes through check_tensor, which says what is wrong."""
    count = len(params)
    lists = dict(grads=grads, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2)
    for name, values in lists.items():
        if len(values) != count:
            raise ValueError(f"adam_step: {count} params but {len(values)} {name}")
    if nonfinite not in (0, 1):
        raise ValueError(f"adam_step: nonfinite must be 0 (skip) or 1 (propagate), got {nonfinite!r}")
    if count == 0:
        return
    device = params[0].device
    rows = (count, len(AdamConstants._fields_))
    if not isinstance(constants, torch.Tensor) or tuple(constants.shape) != rows:
        raise ValueError(f"adam_step: constants must be a tensor of shape {rows}, got {getattr(constants, 'shape', constants)!r}")
    check_code(code1, "adam_step: code1", device)
    check_code(code2, "adam_step: code2", device)
    on_cpu = device.type == "cpu"

    def fits(t, dtypes, numel) -> bool:
        return (
            t.dtype in dtypes and (t.is_cpu if on_cpu else t.device == device) and t.is_contiguous()
            and (numel is None or t.numel() == numel)
        )

    for i, (p, g, s1, s2, a1, a2) in enumerate(zip(params, grads, state1, state2, absmax1, absmax2)):
        try:
            n = p.numel()
            blocks = blocks_of(n, OPTIMIZER_BLOCK) if s1.dtype == torch.uint8 else None
            if (fits(p, FLOAT_DTYPES, None) and fits(g, FLOAT_DTYPES, n) and fits(s1, STATE_DTYPES, n)
                    and fits(s2, (s1.dtype,), n) and (blocks is None or fits(a1, ABSMAX, blocks) and fits(a2, ABSMAX, blocks))):
                continue
        except AttributeError:  # not a tensor: check_tensor says which
            pass
        check_tensor(p, f"adam_step: param {i}", FLOAT_DTYPES, device)
        n = p.numel()
        check_tensor(g, f"adam_step: grad {i}", FLOAT_DTYPES, device, n)
        check_tensor(s1, f"adam_step: state1 {i}", STATE_DTYPES, device, n)
        check_tensor(s2, f"adam_step: state2 {i}", (s1.dtype,), device, n)
        if s1.dtype == torch.uint8:
            check_tensor(a1, f"adam_step: absmax1 {i}", ABSMAX, device, blocks_of(n, OPTIMIZER_BLOCK))
            check_tensor(a2, f"adam_step: absmax2 {i}", ABSMAX, device, blocks_of(n, OPTIMIZER_BLOCK))
        raise AssertionError("unreachable: check_tensor raises for what fits() refuses")


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


ABI_VERSION = 4  # PQ_ABI_VERSION of csrc/include/pyquant/capi.h, which these ctypes descriptions mirror


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
    lib.pq_quantize_blockwise.restype = I32
    lib.pq_dequantize_blockwise.argtypes = [P, P, P, I64, I64, P, I32]
    lib.pq_dequantize_blockwise.restype = I32
    lib.pq_adam_step.argtypes = [ctypes.POINTER(AdamTensor), I32, P, P, P, P, I32]
    lib.pq_adam_step.restype = I64
    lib.pq_set_cpu_sqrt.argtypes = [P]
    lib.pq_set_cpu_sqrt.restype = None
    lib.pq_set_cpu_sqrt(_torch_cpu_sqrt())
    # PYQUANT_CPU_ISA=scalar|avx2 caps the instruction set (.ci/asan.sh: AddressSanitizer does not see every
    # access of the AVX-512 kernels' masked loads and stores).
    cap = os.environ.get("PYQUANT_CPU_ISA")
    if cap:
        codes = {name: code for code, name in ISA_NAMES.items()}
        if cap not in codes:
            raise ValueError(f"PYQUANT_CPU_ISA must be one of {', '.join(codes)}, got {cap!r}")
        lib.pq_set_isa(codes[cap])
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
