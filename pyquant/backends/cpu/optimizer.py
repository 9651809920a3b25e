"""The C++ CPU library's fused optimizer steps (csrc/cpu): one call updates every tensor of a parameter group.

Adam (`adam_step`), the one-state rules (`one_state_step`: momentum, Lion, RMSprop, Adagrad), every rule in C++,
AdEMAMix (`ademamix_step`), Adam with 4-bit states (`adam4bit_step`), and the norm passes of LAMB's and LARS' trust ratios (`lamb_norms`, `lars_norms`)."""

from __future__ import annotations

import array
import ctypes
from itertools import chain
from operator import attrgetter

import torch
from torch import Tensor

from pyquant._contract import DTYPE_CODES
from pyquant._nvtx import kernel_range
from pyquant.backends import kernel
from pyquant.backends.capi import (
    AdamConstants, AdamTensor, AdemamixConstants, AdemamixTensor, OneStateConstants, OneStateTensor,
    check_adam4bit_operands, check_adam_operands, check_ademamix_operands, check_lars_norms_operands,
    check_nonfinite, check_one_state_operands, check_status, cpu_library, describe_adam4bit,
)
from pyquant.backends.code_tables import cached_code_table


_DTYPE, _IS_CPU = attrgetter("dtype"), attrgetter("is_cpu")
_GRAD_CODES = {dtype: code for dtype, code in DTYPE_CODES.items() if dtype is not torch.float64}  # the kernels' grads


def _fill(descriptors, params, grads, states: tuple, constants, row_type) -> None:
    """Write one descriptor per tensor: its pointers (params, grads, then each list of `states`, in the
    descriptor's pointer order), size, dtypes and constants row."""
    rows = constants.tolist()
    pointer_names = [name for name, kind in type(descriptors[0])._fields_ if kind is ctypes.c_void_p] if descriptors else []
    for i, (d, p, g, row) in enumerate(zip(descriptors, params, grads, rows)):
        pointers = (p.data_ptr(), g.data_ptr(), *(values[i].data_ptr() for values in states))
        for name, pointer in zip(pointer_names, pointers):
            setattr(d, name, pointer)
        d.numel = p.numel()
        d.param_dtype, d.grad_dtype = DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
        d.state_bits = 8 if states[0][i].dtype == torch.uint8 else 32
        d.k = row_type(*row)


def _adam_call(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2):
    """The descriptors of one adam_step call, the function that runs it over them, and the one that runs LAMB's
    norm pass over the same descriptors (into a float64 [count, 2] tensor; a status back)."""
    descriptors = (AdamTensor * len(params))()
    _fill(descriptors, params, grads, (state1, state2, absmax1, absmax2), constants, AdamConstants)
    table1, table2 = cached_code_table(code1), cached_code_table(code2)
    pointers = (code1.data_ptr(), code2.data_ptr(), table1.data_ptr(), table2.data_ptr())
    keep = (code1, code2, table1, table2)  # alive as long as the call is

    def run(nonfinite: int, descriptors=descriptors, keep=keep) -> int:
        return cpu_library().pq_adam_step(descriptors, len(descriptors), *pointers, nonfinite)

    def norms(nonfinite: int, sums: torch.Tensor, descriptors=descriptors, keep=keep) -> int:
        return cpu_library().pq_lamb_norms(descriptors, len(descriptors), *pointers, nonfinite, sums.data_ptr())

    return descriptors, run, norms


def _one_state_call(params, grads, state1, absmax1, constants, code1, rule):
    """_adam_call for the one-state rules; its norm pass is LARS' (it reads the parameters and gradients only)."""
    descriptors = (OneStateTensor * len(params))()
    _fill(descriptors, params, grads, (state1, absmax1), constants, OneStateConstants)
    table1 = cached_code_table(code1)
    keep = (code1, table1)

    def run(nonfinite: int, descriptors=descriptors, keep=keep) -> int:
        return cpu_library().pq_one_state_step(
            descriptors, len(descriptors), code1.data_ptr(), table1.data_ptr(), rule, nonfinite
        )

    def norms(nonfinite: int, sums: torch.Tensor, descriptors=descriptors) -> int:
        return cpu_library().pq_lars_norms(descriptors, len(descriptors), nonfinite, sums.data_ptr())

    return descriptors, run, norms


def _skipped_count(bad: int, name: str) -> int:
    """The kernel's skipped count; a negative value is a status, raised as its error."""
    if bad < 0:
        check_status(-bad, name)
    return bad


def _skipped(bad: int, name: str) -> torch.Tensor:
    """_skipped_count as the ops return it (0-dim int64)."""
    return torch.tensor(_skipped_count(bad, name), dtype=torch.int64)


def _on_cpu(params, name: str) -> None:
    if params and params[0].device.type != "cpu":
        raise ValueError(f"{name}: the cpu backend got tensors on {params[0].device}")


@kernel("adam_step", "cpu")
def adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    _on_cpu(params, "adam_step")
    _, run, _ = _adam_call(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2)
    return _skipped(run(nonfinite), "adam_step")


@kernel("one_state_step", "cpu")
def one_state_step(params, grads, state1, absmax1, constants, code1, rule, nonfinite):
    check_one_state_operands(params, grads, state1, absmax1, constants, code1, rule, nonfinite)
    _on_cpu(params, "one_state_step")
    _, run, _ = _one_state_call(params, grads, state1, absmax1, constants, code1, rule)
    return _skipped(run(nonfinite), "one_state_step")


# ---- a step prepared once and run many times ----
class PreparedStep:
    """One fused step's descriptors, built and checked once for a fixed list of tensors, then run step after step.

    The optimizers keep one per parameter group (Optimizer8bit._step_plan) while the group's parameters, their
    gradients' presence and their states stay the same objects: per step only the gradients' pointers and dtypes
    and the constants change, and the library writes them into the descriptor array field by field
    (pq_write_field), instead of per-tensor ctypes writes and the full operand checks (about 5 us a tensor). What
    the kernel trusts and can still change between steps is checked on every call: each parameter still has
    the storage, size and dtype the descriptors were built with, there are as many parameters and gradients as
    descriptors, and each gradient is a contiguous CPU tensor of a float dtype with the parameter's size. When one
    is not, the call returns None before writing anything, and the caller takes the general path, which rebuilds
    the plan or says what is wrong. Constants rows of the wrong size and a bad `nonfinite` raise ValueError."""

    def __init__(self, name: str, descriptors, run, params, written, norms=None):
        self.name, self._descriptors, self._run, self._norms = name, descriptors, run, norms
        # Each tensor once: the float32-state tensors share one empty block-scale placeholder (Optimizer8bit._operands),
        # which listed per tensor made a quarter of the version bumps over DenseNet-121's list (486 of 1820).
        self._written = list({id(t): t for t in written}.values())
        self._pointers = [p.data_ptr() for p in params]
        self._numels = [p.numel() for p in params]
        self._dtypes = [p.dtype for p in params]
        self._grad_codes: list[int] | None = None
        self._grad_pointers: list[int] | None = None
        self._row_of: list[int] | None = None  # the last row indices given, as int32 for the library, and their bounds
        self._row_index, self._row_bounds = array.array("i"), (0, 0)
        self._width = descriptors._type_.k.size  # bytes of a constants row, float32 values
        self._floats = self._width // 4

    def __call__(self, params, grads, rows: list[list[float]], row_of: list[int] | None, nonfinite: int):
        """Run one step. `rows`: the distinct constants rows; `row_of`: each tensor's row (None: all rows[0]).
        Returns the skipped count (an int), or None when a tensor no longer fits the descriptors."""
        check_nonfinite(nonfinite, self.name)
        if not self.load(params, grads, rows, row_of):
            return None
        return self.run(nonfinite)

    def load(self, params, grads, rows: list[list[float]], row_of: list[int] | None) -> bool:
        """Write this step's gradients and constants into the descriptors; False (nothing written) when a tensor
        no longer fits them. Constants that do not fit the descriptors raise ValueError (nothing written)."""
        count = len(self._numels)
        if len(params) != count or len(grads) != count:
            return False  # one pointer would be broadcast to every descriptor below
        # Each check is one C-level map over the tensors (a Python loop per tensor cost 2-3x as much; bench/NOTES.md).
        # The lists compare equal element by element, so a mismatch anywhere fails the step before anything is written.
        codes = list(map(_GRAD_CODES.get, map(_DTYPE, grads)))
        if (list(map(Tensor.data_ptr, params)) != self._pointers or list(map(Tensor.numel, params)) != self._numels
                or list(map(_DTYPE, params)) != self._dtypes or None in codes or not all(map(_IS_CPU, grads))
                or list(map(Tensor.numel, grads)) != self._numels or not all(map(Tensor.is_contiguous, grads))):
            return False
        pointers = list(map(Tensor.data_ptr, grads))
        constants = self._constants_of(rows, row_of)
        # Written through the library rather than torch operations on views of the array: right after a kernel
        # that streamed its tensors through the caches, each distinct torch operation cost 15-90 us (bench/NOTES.md).
        row = self._descriptors._type_
        if pointers != self._grad_pointers:  # gradients kept between steps (zero_grad(set_to_none=False)) keep theirs
            self._write(row.grad.offset, 8, array.array("q", pointers))
            self._grad_pointers = pointers
        if codes != self._grad_codes:
            self._write(row.grad_dtype.offset, 4, array.array("i", codes))
            self._grad_codes = codes
        self._write(row.k.offset, self._width, *constants)
        return True

    def set_constants(self, rows: list[list[float]], row_of: list[int] | None) -> None:
        """Replace the loaded constants (LAMB's and LARS' rows with their ratios, between the norm pass and the step)."""
        self._write(self._descriptors._type_.k.offset, self._width, *self._constants_of(rows, row_of))

    def _write(self, offset: int, width: int, rows: array.array, row_of: array.array | None = None) -> None:
        """Each descriptor's field at `offset` (`width` bytes): row row_of[i] of `rows`, or row i, or the one row."""
        descriptors, indices = self._descriptors, None if row_of is None else row_of.buffer_info()[0]
        status = cpu_library().pq_write_field(
            ctypes.addressof(descriptors), len(descriptors), ctypes.sizeof(descriptors._type_), offset, width,
            rows.buffer_info()[0], len(rows) * rows.itemsize // width, indices)
        check_status(status, f"{self.name}'s descriptors")

    def _constants_of(self, rows, row_of) -> tuple[array.array, array.array | None]:
        """The constants rows as float32 (each value rounded once: array's C cast rounds as torch.tensor does) and
        each tensor's row as int32 (None: the first row for all), checked against the descriptors."""
        count, floats = len(self._numels), self._floats
        lengths = [len(r) for r in rows]
        if row_of is not None and row_of != self._row_of:  # an optimizer passes the same indices step after step
            self._row_of, self._row_index = list(row_of), array.array("i", row_of)
            self._row_bounds = (min(row_of), max(row_of)) if row_of else (0, 0)
        low, high = self._row_bounds
        if not rows or lengths.count(floats) != len(rows) or (row_of is not None and (
                len(row_of) != count or not 0 <= low <= high < len(rows))):
            shape = (len(rows), *sorted(set(lengths)))
            raise ValueError(f"{self.name}: constants must be rows of {floats} values and one row index per tensor "
                             f"({count}), got rows of shape {shape} and "
                             f"{'no' if row_of is None else len(row_of)} indices")
        if row_of is None:
            return array.array("f", rows[0]), None
        return array.array("f", chain.from_iterable(rows)), self._row_index

    def run(self, nonfinite: int) -> int:
        """The step over the loaded descriptors; the skipped count, an int: no tensor is made for it, since right
        after a kernel that streamed its tensors through the caches making one took about 50 us (bench/NOTES.md)."""
        check_nonfinite(nonfinite, self.name)
        with kernel_range(self.name):
            bad = self._run(nonfinite)
        torch.autograd.graph.increment_version(self._written)
        return _skipped_count(bad, self.name)

    def norm_sums(self, nonfinite: int) -> torch.Tensor:
        """LAMB's (Adam descriptors) or LARS' (one-state descriptors) norm pass over the loaded descriptors: the
        float64 sums of squares, [count, 2] (ops lamb_norms, lars_norms)."""
        check_nonfinite(nonfinite, self.name)
        sums = torch.empty((len(self._numels), 2), dtype=torch.float64)
        check_status(self._norms(nonfinite, sums), f"{self.name}'s norm pass")
        return sums


def prepare_adam_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2) -> PreparedStep:
    check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, 0)
    _on_cpu(params, "adam_step")
    descriptors, run, norms = _adam_call(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2)
    return PreparedStep("adam_step", descriptors, run, params, [*params, *state1, *state2, *absmax1, *absmax2], norms)


def prepare_one_state_step(params, grads, state1, absmax1, constants, code1, rule) -> PreparedStep:
    check_one_state_operands(params, grads, state1, absmax1, constants, code1, rule, 0)
    _on_cpu(params, "one_state_step")
    descriptors, run, norms = _one_state_call(params, grads, state1, absmax1, constants, code1, rule)
    return PreparedStep("one_state_step", descriptors, run, params, [*params, *state1, *absmax1], norms)


def _ademamix_call(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2):
    descriptors = (AdemamixTensor * len(params))()
    _fill(descriptors, params, grads, (state1, state2, absmax1, absmax2), constants, AdemamixConstants)
    table1, table2 = cached_code_table(code1), cached_code_table(code2)
    pointers = (code1.data_ptr(), code2.data_ptr(), table1.data_ptr(), table2.data_ptr())
    keep = (code1, code2, table1, table2)

    def run(nonfinite: int, descriptors=descriptors, keep=keep) -> int:
        return cpu_library().pq_ademamix_step(descriptors, len(descriptors), *pointers, nonfinite)

    return descriptors, run


@kernel("ademamix_step", "cpu")
def ademamix_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    check_ademamix_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    _on_cpu(params, "ademamix_step")
    _, run = _ademamix_call(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2)
    return _skipped(run(nonfinite), "ademamix_step")


def prepare_ademamix_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2) -> PreparedStep:
    check_ademamix_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, 0)
    _on_cpu(params, "ademamix_step")
    descriptors, run = _ademamix_call(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2)
    return PreparedStep("ademamix_step", descriptors, run, params, [*params, *state1, *state2, *absmax1, *absmax2])


def _adam4bit_call(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1):
    """The descriptors of one adam4bit_step call, and the function that runs it over them (-1 from the library:
    its rank-1 maxima could not be allocated, which _skipped turns into MemoryError)."""
    descriptors = describe_adam4bit(params, grads, state1, state2, absmax1, absmax2, constants, rank1)
    keep = (code1, code2)

    def run(nonfinite: int, descriptors=descriptors, keep=keep) -> int:
        return cpu_library().pq_adam4bit_step(descriptors, len(descriptors), code1.data_ptr(), code2.data_ptr(),
                                              nonfinite)

    return descriptors, run


@kernel("adam4bit_step", "cpu")
def adam4bit_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite):
    check_adam4bit_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, nonfinite)
    _on_cpu(params, "adam4bit_step")
    _, run = _adam4bit_call(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1)
    return _skipped(run(nonfinite), "adam4bit_step")


def prepare_adam4bit_step(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1):
    check_adam4bit_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1, 0)
    _on_cpu(params, "adam4bit_step")
    descriptors, run = _adam4bit_call(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, rank1)
    return PreparedStep("adam4bit_step", descriptors, run, params, [*params, *state1, *state2, *absmax1, *absmax2])


@kernel("lamb_norms", "cpu")
def lamb_norms(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite):
    check_adam_operands(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2, nonfinite)
    _on_cpu(params, "lamb_norms")
    _, _, norms = _adam_call(params, grads, state1, state2, absmax1, absmax2, constants, code1, code2)
    sums = torch.empty((len(params), 2), dtype=torch.float64)
    check_status(norms(nonfinite, sums), "lamb_norms")
    return sums


@kernel("lars_norms", "cpu")
def lars_norms(params, grads, constants, nonfinite):
    check_lars_norms_operands(params, grads, constants, nonfinite)
    _on_cpu(params, "lars_norms")
    descriptors = (OneStateTensor * len(params))()
    for d, p, g, row in zip(descriptors, params, grads, constants.tolist()):  # no states: the pass reads p and g
        d.param, d.grad, d.numel = p.data_ptr(), g.data_ptr(), p.numel()
        d.param_dtype, d.grad_dtype = DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
        d.state_bits = 32
        d.k = OneStateConstants(*row)
    sums = torch.empty((len(params), 2), dtype=torch.float64)
    check_status(cpu_library().pq_lars_norms(descriptors, len(params), nonfinite, sums.data_ptr()), "lars_norms")
    return sums
