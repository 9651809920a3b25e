"""An exact float32 fused multiply-add (and torch's CPU sqrt) for Triton's interpreter.

Triton's interpreter (triton 3.8) evaluates `tl.fma(x, y, z)` as `x * y + z` in numpy: two float32
roundings where a GPU does one. pyquant's kernels use `tl.fma` exactly where docs/numerics.md asks for a
fused multiply-add, so under the interpreter the Adam moments would differ from the contract on a few
percent of elements. `exact_fma()` replaces the interpreter's fma with
`pyquant.backends.reference.optimizer.fma32` (exact product in float64, sum rounded to odd, one rounding to
float32) for float32 operands; other dtypes keep
the interpreter's own evaluation. It changes nothing when triton is compiled for a GPU.

`torch_cpu_sqrt()` makes the interpreter's `tl.sqrt_rn` compute `torch.sqrt` on the CPU. The square root
of the Adam step is "torch's sqrt on the tensors' device": IEEE sqrt on a GPU (what `tl.sqrt_rn` gives
there), but on a CPU torch 2.14.1 uses MKL's vsSqrt, up to 1 ulp from IEEE for about one float32 in six,
and the reference and cpu backends follow torch there. The interpreter runs the kernels on CPU tensors,
so to be compared with those backends its sqrt must be the CPU's. torch.sqrt is element-wise
deterministic (the same bits for a value wherever it sits in a tensor), so evaluating it per tile is exact.
`interpreter_as_device()` applies both patches.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from pyquant.backends.reference.optimizer import fma32


def _interpreter_builder_class():
    from triton.runtime import interpreter

    return interpreter.InterpreterBuilder, interpreter.TensorHandle


def _exact_create_fma(original):
    _, TensorHandle = _interpreter_builder_class()

    def create_fma(self, x, y, z):
        if not (x.data.dtype == y.data.dtype == z.data.dtype == np.float32):
            return original(self, x, y, z)
        # Operands may be scalars or broadcastable blocks; fma32 broadcasts, but from_numpy wants owned,
        # writable, contiguous arrays.
        a, b, c = (torch.from_numpy(np.array(h.data, dtype=np.float32, copy=True)) for h in (x, y, z))
        out = fma32(a, b, c).numpy()
        return TensorHandle(np.ascontiguousarray(out, dtype=np.float32), z.dtype.scalar)

    return create_fma


@contextlib.contextmanager
def exact_fma():
    """Within the block, the interpreter's `tl.fma` on float32 rounds once, as on a GPU."""
    builder, _ = _interpreter_builder_class()
    original = builder.create_fma
    builder.create_fma = _exact_create_fma(original)
    try:
        yield
    finally:
        builder.create_fma = original


def interpreter_fma_is_exact() -> bool:
    """True when the interpreter's fma currently rounds once (checked on a case where it matters)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr):
        a = tl.full([1], 1.0000001192092896, tl.float32)  # 1 + 2^-23
        b = tl.full([1], -1.0, tl.float32)
        tl.store(out_ptr + tl.arange(0, 1), tl.fma(a, a, b))  # exact: 2^-22 + 2^-46

    out = torch.zeros(1, dtype=torch.float32)
    _probe[(1,)](out)
    exact = fma32(torch.tensor(1.0000001192092896), torch.tensor(1.0000001192092896), torch.tensor(-1.0))
    return bool(out.view(torch.int32)[0] == exact.view(torch.int32))


def _torch_sqrt_create_precise_sqrt(original):
    _, TensorHandle = _interpreter_builder_class()

    def create_precise_sqrt(self, arg):
        if arg.data.dtype != np.float32:
            return original(self, arg)
        out = torch.sqrt(torch.from_numpy(np.array(arg.data, dtype=np.float32, copy=True))).numpy()
        return TensorHandle(np.ascontiguousarray(out, dtype=np.float32), arg.dtype.scalar)

    return create_precise_sqrt


@contextlib.contextmanager
def torch_cpu_sqrt():
    """Within the block, the interpreter's `tl.sqrt_rn` on float32 is torch.sqrt on the CPU."""
    builder, _ = _interpreter_builder_class()
    original = builder.create_precise_sqrt
    builder.create_precise_sqrt = _torch_sqrt_create_precise_sqrt(original)
    try:
        yield
    finally:
        builder.create_precise_sqrt = original


def torch_cpu_sqrt_is_ieee() -> bool:
    """Whether torch.sqrt on CPU float32 is correctly rounded here (then torch_cpu_sqrt changes nothing)."""
    probe = torch.rand(65536, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 65536)
    return torch.equal(torch.sqrt(probe), torch.sqrt(probe.double()).float())


@contextlib.contextmanager
def interpreter_as_device():
    """Both patches: the interpreter's fma rounds once and its sqrt_rn is torch's CPU sqrt."""
    with exact_fma(), torch_cpu_sqrt():
        yield
