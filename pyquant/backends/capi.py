"""The one binding of pyquant's compiled libraries (csrc/include/pyquant/capi.h): loading, the ABI version,
every function's ctypes signature, the structures, and the checks every call makes first.

Both libraries (the C++ CPU library and the CUDA library) are loaded here and nowhere else. A library that is
missing makes pyquant fall back to the reference backend (with one warning); a library built from other
sources (another ABI version) is refused with a message that names the rebuild command, since passing it
descriptors it would misread could corrupt memory.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings
from pathlib import Path

import torch

from pyquant._contract import (
    ADEMAMIX_FIELDS, CONSTANT_FIELDS, DTYPE_CODES, FLOAT_DTYPES, ISA_NAMES, ONE_STATE_FIELDS, ONE_STATE_RULES, OPTIMIZER_BLOCK, blocks_of,
    FOURBIT_BLOCK, RANK1_MAX_DIMS,
)

ABI_VERSION = 12  # PQ_ABI_VERSION of capi.h, which everything below mirrors
INVALID_ARGUMENT = 2  # PQ_INVALID_ARGUMENT of capi.h
OUT_OF_MEMORY = 1  # what the low-rank convolution entry points return when a buffer cannot be allocated
REBUILD = "pip install -e ."  # what rebuilds the libraries of a checkout (README)


class AdamConstants(ctypes.Structure):
    """Mirror of pq_adam_constants (capi.h): one float per name of _contract.CONSTANT_FIELDS, in that order."""

    _fields_ = [(name, ctypes.c_float) for name in CONSTANT_FIELDS]


def _tensor_fields(pointers: tuple[str, ...], constants: type) -> list:
    """The fields of an optimizer's tensor descriptor (pq_adam_tensor, pq_one_state_tensor): its pointers, then the
    fields every descriptor has."""
    ints = [(name, ctypes.c_int32) for name in ("param_dtype", "grad_dtype", "state_bits", "reserved")]
    return [(name, ctypes.c_void_p) for name in pointers] + [("numel", ctypes.c_int64)] + ints + [("k", constants)]


class AdamTensor(ctypes.Structure):
    """Mirror of pq_adam_tensor (capi.h)."""

    _fields_ = _tensor_fields(("param", "grad", "state1", "state2", "absmax1", "absmax2"), AdamConstants)


class OneStateConstants(ctypes.Structure):
    """Mirror of pq_one_state_constants (capi.h): one float per name of _contract.ONE_STATE_FIELDS, in that order."""

    _fields_ = [(name, ctypes.c_float) for name in ONE_STATE_FIELDS]


class OneStateTensor(ctypes.Structure):
    """Mirror of pq_one_state_tensor (capi.h)."""

    _fields_ = _tensor_fields(("param", "grad", "state1", "absmax1"), OneStateConstants)


class AdemamixConstants(ctypes.Structure):
    """Mirror of pq_ademamix_constants (capi.h): one float per name of _contract.ADEMAMIX_FIELDS, in that order."""

    _fields_ = [(name, ctypes.c_float) for name in ADEMAMIX_FIELDS]


class AdemamixTensor(ctypes.Structure):
    """Mirror of pq_ademamix_tensor (capi.h): state1 and absmax1 hold the fast and slow EMAs back to back."""

    _fields_ = _tensor_fields(("param", "grad", "state1", "state2", "absmax1", "absmax2"), AdemamixConstants)


class Adam4bitTensor(ctypes.Structure):
    """Mirror of pq_adam4bit_tensor (capi.h): Adam's constants, the state layout (4 or 32 bits, rank-1 or not) and,
    for rank-1 tensors, the shape."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("param", "grad", "state1", "state2", "absmax1", "absmax2")] + [
        ("numel", ctypes.c_int64)] + [(name, ctypes.c_int32) for name in (
            "param_dtype", "grad_dtype", "state_bits", "rank1", "ndim", "reserved")] + [
        ("shape", ctypes.c_int64 * RANK1_MAX_DIMS), ("k", AdamConstants)]


# ---- every exported function: name -> (argtypes, restype), as declared in capi.h ----
P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
DIMS = ctypes.POINTER(I64)
CPU_FUNCTIONS = {
    "pq_abi_version": ([], I32),
    "pq_isa": ([], I32),
    "pq_set_isa": ([I32], I32),
    "pq_streaming_bytes": ([], I64),
    "pq_set_streaming_bytes": ([I64], I64),
    "pq_set_cpu_sqrt": ([P], None),
    "pq_build_code_table": ([P, P], None),
    "pq_quantize_blockwise": ([P, I32, I64, I64, P, P, P], I32),
    "pq_dequantize_blockwise": ([P, P, P, I64, I64, P, I32], I32),
    "pq_write_field": ([P, I64, I64, I64, I64, P, I64, P], I32),
    "pq_adam_step": ([ctypes.POINTER(AdamTensor), I32, P, P, P, P, I32], I64),
    "pq_one_state_step": ([ctypes.POINTER(OneStateTensor), I32, P, P, I32, I32], I64),
    "pq_ademamix_step": ([ctypes.POINTER(AdemamixTensor), I32, P, P, P, P, I32], I64),
    "pq_adam4bit_step": ([ctypes.POINTER(Adam4bitTensor), I32, P, P, I32], I64),
    "pq_lamb_norms": ([ctypes.POINTER(AdamTensor), I32, P, P, P, P, I32, P], I32),
    "pq_lars_norms": ([ctypes.POINTER(OneStateTensor), I32, I32, P], I32),
    "pq_unscale_": ([I32, P, P, P, P, P, I32, I32], I32),
    "pq_matmul": ([I32, P, P, I32, P, P, I32, P, P, I32, I64, I32, P, I32, P, I64, I64, I64, I32, I32], None),
    "pq_matmul_im2col": ([P, I32, P, P, P, I32, P, I32, P, I64, P, I32, I64, I32, P, I32, P, I32, I32], None),
    "pq_lowrank_conv2d": ([P, P, P, P, P, P, I32, DIMS, I32, P, I32], I32),
    "pq_lowrank_packed_floats": ([I32, DIMS], I64),
    "pq_lowrank_conv2d_wgrad": ([P, P, P, I32, DIMS, I32], I32),
    "pq_lowrank_set_bf16_dot": ([I32], I32),
}
CUDA_FUNCTIONS = {
    "pq_abi_version": ([], I32),
    "pq_cuda_quantize_blockwise": ([P, I32, I64, I64, P, P, P, P], I32),
    "pq_cuda_dequantize_blockwise": ([P, P, P, I64, I64, P, I32, P], I32),
    "pq_cuda_adam_step": ([P, P, I32, I64, P, P, P, P, I32, P, P], I32),
    "pq_cuda_one_state_step": ([P, P, I32, I64, P, P, I32, I32, P, P], I32),
    "pq_cuda_ademamix_step": ([P, P, I32, I64, P, P, P, P, I32, P, P], I32),
    "pq_cuda_adam4bit_step": ([P, P, I32, I64, P, P, P, P, I32, I32, P, P], I32),
    "pq_cuda_lamb_norms": ([P, P, I32, I64, P, P, I32, P, P], I32),
    "pq_cuda_lars_norms": ([P, P, I32, I64, I32, P, P], I32),
    "pq_cuda_unscale_": ([P, I32, I64, P, P, P], I32),
    "pq_cuda_error_string": ([I32], ctypes.c_char_p),
}


def int64_array(values) -> ctypes.Array:
    """A C int64 array of `values` (at least one element, so that the pointer is never NULL)."""
    return (ctypes.c_int64 * max(len(values), 1))(*values)


def check_status(status: int, op: str) -> None:
    """Turn a CPU entry point's return code into the exception it means (0: success)."""
    if status == 0:
        return
    if status == OUT_OF_MEMORY:
        raise MemoryError(f"pyquant {op}: the CPU kernel could not allocate its buffers")
    # Unreachable after the Python checks, unless they and the C ones disagree.
    raise ValueError(f"pyquant: the CPU library refused {op}: invalid arguments (status {status})")


# ---- what every call into a compiled library checks first ----
# The C entry points can check sizes, dtype codes and pointers (they return PQ_INVALID_ARGUMENT), but not how
# large a buffer behind a pointer is: these checks compare every tensor with the sizes the call will use, so
# that no kernel reads or writes outside a tensor. They are a few attribute reads per tensor.


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


def check_nonfinite(nonfinite, op: str) -> None:
    """The kernels' `nonfinite` policy: the int 0 (skip) or 1 (propagate). ctypes refuses a float (1.0 == 1 passed
    `in (0, 1)`) with its own ArgumentError, and truncates a large int to 32 bits (2**32 would become 0)."""
    if isinstance(nonfinite, float) or nonfinite not in (0, 1):
        raise ValueError(f"{op}: nonfinite must be 0 (skip) or 1 (propagate), got {nonfinite!r}")


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
    check_nonfinite(nonfinite, "adam_step")
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


def check_one_state_operands(params, grads, state1, absmax1, constants, code1, rule, nonfinite) -> None:
    """The operands of one one_state_step call (one device), as check_adam_operands checks Adam's."""
    count = len(params)
    for name, values in dict(grads=grads, state1=state1, absmax1=absmax1).items():
        if len(values) != count:
            raise ValueError(f"one_state_step: {count} params but {len(values)} {name}")
    check_nonfinite(nonfinite, "one_state_step")
    if rule not in ONE_STATE_RULES.values():
        raise ValueError(f"one_state_step: rule must be one of {ONE_STATE_RULES}, got {rule!r}")
    if count == 0:
        return
    device = params[0].device
    rows = (count, len(ONE_STATE_FIELDS))
    if not isinstance(constants, torch.Tensor) or tuple(constants.shape) != rows:
        raise ValueError(f"one_state_step: constants must be a tensor of shape {rows}, got {getattr(constants, 'shape', constants)!r}")
    check_code(code1, "one_state_step: code1", device)
    for i, (p, g, s1, a1) in enumerate(zip(params, grads, state1, absmax1)):
        check_tensor(p, f"one_state_step: param {i}", FLOAT_DTYPES, device)
        n = p.numel()
        check_tensor(g, f"one_state_step: grad {i}", FLOAT_DTYPES, device, n)
        check_tensor(s1, f"one_state_step: state1 {i}", STATE_DTYPES, device, n)
        if s1.dtype == torch.uint8:
            check_tensor(a1, f"one_state_step: absmax1 {i}", ABSMAX, device, blocks_of(n, OPTIMIZER_BLOCK))


def check_ademamix_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2,
                            nonfinite) -> None:
    """The operands of one ademamix_step call (one device), as check_adam_operands checks Adam's: state1 holds
    2 x numel values (the fast and slow EMAs), absmax1 2 x blocks for 8-bit states."""
    count = len(params)
    lists = dict(grads=grads, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2)
    for name, values in lists.items():
        if len(values) != count:
            raise ValueError(f"ademamix_step: {count} params but {len(values)} {name}")
    check_nonfinite(nonfinite, "ademamix_step")
    if count == 0:
        return
    device = params[0].device
    rows = (count, len(ADEMAMIX_FIELDS))
    if not isinstance(constants, torch.Tensor) or tuple(constants.shape) != rows:
        raise ValueError(f"ademamix_step: constants must be a tensor of shape {rows}, got {getattr(constants, 'shape', constants)!r}")
    check_code(code1, "ademamix_step: code1", device)
    check_code(code2, "ademamix_step: code2", device)
    for i, (p, g, s1, s2, a1, a2) in enumerate(zip(params, grads, state1, state2, absmax1, absmax2)):
        check_tensor(p, f"ademamix_step: param {i}", FLOAT_DTYPES, device)
        n = p.numel()
        check_tensor(g, f"ademamix_step: grad {i}", FLOAT_DTYPES, device, n)
        check_tensor(s1, f"ademamix_step: state1 {i}", STATE_DTYPES, device, 2 * n)
        check_tensor(s2, f"ademamix_step: state2 {i}", (s1.dtype,), device, n)
        if s1.dtype == torch.uint8:
            blocks = blocks_of(n, OPTIMIZER_BLOCK)
            check_tensor(a1, f"ademamix_step: absmax1 {i}", ABSMAX, device, 2 * blocks)
            check_tensor(a2, f"ademamix_step: absmax2 {i}", ABSMAX, device, blocks)


def check_adam4bit_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1,
                            nonfinite) -> None:
    """The operands of one adam4bit_step call (one device): 4-bit states hold ceil(n / 2) bytes, absmax1
    ceil(n / 128) scales, absmax2 sum(shape) maxima (rank1) or ceil(n / 128) scales; float32 states n values."""
    count = len(params)
    lists = dict(grads=grads, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2, rank1=rank1)
    for name, values in lists.items():
        if len(values) != count:
            raise ValueError(f"adam4bit_step: {count} params but {len(values)} {name}")
    check_nonfinite(nonfinite, "adam4bit_step")
    if count == 0:
        return
    device = params[0].device
    rows = (count, len(CONSTANT_FIELDS))
    if not isinstance(constants, torch.Tensor) or tuple(constants.shape) != rows:
        raise ValueError(f"adam4bit_step: constants must be a tensor of shape {rows}, got {getattr(constants, 'shape', constants)!r}")
    check_tensor(code1, "adam4bit_step: code1", (torch.float32,), device, 16)
    check_tensor(code2, "adam4bit_step: code2", (torch.float32,), device, 16)
    for name, code in (("code1", code1), ("code2", code2)):
        # the CPU kernel binary-searches the midpoints (checked here where it costs no device sync; the C entry
        # point refuses an unsorted map too)
        if device.type == "cpu" and not bool((code[1:] >= code[:-1]).all()):
            raise ValueError(f"adam4bit_step: {name} must hold 16 codes sorted ascending, got {code.tolist()}")
    for i, (p, g, s1, s2, a1, a2, r) in enumerate(zip(params, grads, state1, state2, absmax1, absmax2, rank1)):
        check_tensor(p, f"adam4bit_step: param {i}", FLOAT_DTYPES, device)
        n = p.numel()
        check_tensor(g, f"adam4bit_step: grad {i}", FLOAT_DTYPES, device, n)
        if not isinstance(s1, torch.Tensor) or s1.dtype != torch.uint8:
            check_tensor(s1, f"adam4bit_step: state1 {i}", (torch.float32,), device, n)
            check_tensor(s2, f"adam4bit_step: state2 {i}", (torch.float32,), device, n)
            if r:
                raise ValueError(f"adam4bit_step: tensor {i} has float32 states: rank1 must be False")
            continue
        check_tensor(s1, f"adam4bit_step: state1 {i}", (torch.uint8,), device, (n + 1) // 2)
        check_tensor(s2, f"adam4bit_step: state2 {i}", (torch.uint8,), device, (n + 1) // 2)
        check_tensor(a1, f"adam4bit_step: absmax1 {i}", ABSMAX, device, blocks_of(n, FOURBIT_BLOCK))
        if r and not 2 <= p.dim() <= RANK1_MAX_DIMS:
            raise ValueError(f"adam4bit_step: rank-1 scales need 2 to {RANK1_MAX_DIMS} dimensions; param {i} has "
                             f"shape {tuple(p.shape)}")
        check_tensor(a2, f"adam4bit_step: absmax2 {i}", ABSMAX, device, sum(p.shape) if r else blocks_of(n, FOURBIT_BLOCK))


def describe_adam4bit(params, grads, state1, state2, absmax1, absmax2, constants, rank1) -> ctypes.Array:
    """The pq_adam4bit_tensor descriptors of checked operands (the cpu and cuda backends' calls)."""
    descriptors = (Adam4bitTensor * len(params))()
    for d, p, g, s1, s2, a1, a2, r, row in zip(descriptors, params, grads, state1, state2, absmax1, absmax2, rank1,
                                               constants.tolist()):
        d.param, d.grad, d.state1, d.state2 = p.data_ptr(), g.data_ptr(), s1.data_ptr(), s2.data_ptr()
        d.absmax1, d.absmax2 = a1.data_ptr(), a2.data_ptr()
        d.numel = p.numel()
        d.param_dtype, d.grad_dtype = DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
        d.state_bits = 4 if s1.dtype == torch.uint8 else 32
        d.rank1 = int(bool(r))
        if r:
            d.ndim = p.dim()
            d.shape[:p.dim()] = list(p.shape)
        d.k = AdamConstants(*row)
    return descriptors
def check_lars_norms_operands(params, grads, constants, nonfinite) -> None:
    """The operands of one lars_norms call (one device): parameters and gradients of the same sizes, one row of
    ONE_STATE_FIELDS per tensor."""
    count = len(params)
    if len(grads) != count:
        raise ValueError(f"lars_norms: {count} params but {len(grads)} grads")
    check_nonfinite(nonfinite, "lars_norms")
    if count == 0:
        return
    device = params[0].device
    rows = (count, len(ONE_STATE_FIELDS))
    if not isinstance(constants, torch.Tensor) or tuple(constants.shape) != rows:
        raise ValueError(f"lars_norms: constants must be a tensor of shape {rows}, got {getattr(constants, 'shape', constants)!r}")
    for i, (p, g) in enumerate(zip(params, grads)):
        check_tensor(p, f"lars_norms: param {i}", FLOAT_DTYPES, device)
        check_tensor(g, f"lars_norms: grad {i}", FLOAT_DTYPES, device, p.numel())


GRAD_DTYPES = tuple(DTYPE_CODES)  # what GradScaler unscales: float32, float16, bfloat16, float64


def check_unscale_operands(grads, found_inf, inv_scale, *, inv_scale_on_device: bool = True) -> None:
    """What unscale_ and every kernel of it need (the kernels read found_inf and inv_scale through pointers)."""
    for name, t in (("found_inf", found_inf), ("inv_scale", inv_scale)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != 1:
            raise TypeError(f"{name} must be a float32 tensor with one element")
    if inv_scale_on_device and inv_scale.device != found_inf.device:
        raise ValueError(f"inv_scale is on {inv_scale.device} but found_inf is on {found_inf.device}")
    for i, g in enumerate(grads):
        check_grad(i, g, found_inf.device)


def check_grad(i: int, g, device: torch.device) -> None:
    if not isinstance(g, torch.Tensor) or g.dtype not in GRAD_DTYPES:
        what = getattr(g, "dtype", type(g).__name__)
        raise TypeError(f"gradient {i} is {what}: only floating-point gradients can be unscaled")
    if g.device != device:
        raise ValueError(f"gradient {i} is on {g.device} but found_inf is on {device}")


def check_product_operands(tensors: dict, bias, bias_len: int) -> None:
    """What the C matmul kernels read through raw pointers and their own strides: CPU tensors of a dtype they
    know, and a bias of the `bias_len` values the product adds (its length is not passed to them)."""
    for name, t in {**tensors, "bias": bias}.items():
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"the cpu kernel needs float32/float16/bfloat16 CPU tensors; {name} is {t.dtype} on {t.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != bias_len):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, the product adds {bias_len} values")


def _candidate_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("PYQUANT_LIB_DIR"):
        dirs.append(Path(os.environ["PYQUANT_LIB_DIR"]))
    # A wheel has the compiled files in site-packages/pyquant/_lib; an editable install too, and its
    # pyquant.__path__ is [site-packages/pyquant, <checkout>/pyquant] (pyproject.toml). The package is read from
    # sys.modules (always there once a submodule imports): `import pyquant` would make this module depend on the
    # package root, which imports everything.
    dirs += [Path(p) / "_lib" for p in sys.modules["pyquant"].__path__]
    return dirs


def _find(name: str) -> Path | None:
    for d in _candidate_dirs():
        if (d / name).is_file():
            return d / name
    return None


def _load(path: Path, functions: dict) -> ctypes.CDLL:
    """The library at `path` with every function's signature set; refused when built from other sources."""
    lib = ctypes.CDLL(str(path))
    version = lib.pq_abi_version() if hasattr(lib, "pq_abi_version") else None
    missing = [name for name in functions if not hasattr(lib, name)]
    if version != ABI_VERSION or missing:
        raise RuntimeError(
            f"pyquant: {path} was built from other sources (C ABI {version}, this pyquant needs {ABI_VERSION}"
            + (f"; it lacks {', '.join(missing)}" if missing else "")
            + f"); rebuild it with `{REBUILD}` in the checkout, or set PYQUANT_BACKEND=reference"
        )
    for name, (argtypes, restype) in functions.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@functools.cache
def cpu_library() -> ctypes.CDLL | None:
    """The C++ CPU library, or None (with one warning) when it was not built."""
    # PYQUANT_NO_LIB=1 pretends the library is missing (tests of the fallback).
    path = None if os.environ.get("PYQUANT_NO_LIB") == "1" else _find("libpyquant_cpu.so")
    if path is None:
        warnings.warn(
            f"pyquant: the compiled CPU library was not found (build it with `{REBUILD}`); "
            "falling back to the reference implementation in torch, which is much slower",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    lib = _load(path, CPU_FUNCTIONS)
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
    return None if path is None else _load(path, CUDA_FUNCTIONS)


def cpu_isa() -> str:
    lib = cpu_library()
    return "none" if lib is None else ISA_NAMES[lib.pq_isa()]
