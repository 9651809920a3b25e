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


def _on_float32(original, torch_fn):
    """An interpreter builder method that computes `torch_fn` when every operand is float32 and calls `original`
    otherwise. Operands may be scalars or broadcastable blocks; torch_fn broadcasts, but from_numpy wants owned,
    writable, contiguous arrays."""
    _, TensorHandle = _interpreter_builder_class()

    def method(self, *handles):
        if any(h.data.dtype != np.float32 for h in handles):
            return original(self, *handles)
        out = torch_fn(*(torch.from_numpy(np.array(h.data, dtype=np.float32, copy=True)) for h in handles)).numpy()
        return TensorHandle(np.ascontiguousarray(out, dtype=np.float32), handles[-1].dtype.scalar)

    return method


@contextlib.contextmanager
def _builder_method(name: str, torch_fn):
    """Within the block, the interpreter builder's method `name` computes `torch_fn` on float32 operands."""
    builder, _ = _interpreter_builder_class()
    original = getattr(builder, name)
    setattr(builder, name, _on_float32(original, torch_fn))
    try:
        yield
    finally:
        setattr(builder, name, original)


def exact_fma():
    """Within the block, the interpreter's `tl.fma` on float32 rounds once, as on a GPU."""
    return _builder_method("create_fma", fma32)


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


def torch_cpu_sqrt():
    """Within the block, the interpreter's `tl.sqrt_rn` on float32 is torch.sqrt on the CPU."""
    return _builder_method("create_precise_sqrt", torch.sqrt)


def torch_cpu_sqrt_is_ieee() -> bool:
    """Whether torch.sqrt on CPU float32 is correctly rounded here (then torch_cpu_sqrt changes nothing)."""
    probe = torch.rand(65536, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 65536)
    return torch.equal(torch.sqrt(probe), torch.sqrt(probe.double()).float())


@contextlib.contextmanager
def interpreter_as_device():
    """Both patches: the interpreter's fma rounds once and its sqrt_rn is torch's CPU sqrt."""
    with exact_fma(), torch_cpu_sqrt():
        yield
