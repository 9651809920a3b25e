"""Which implementation runs an op: the backend switch.

Every kernel-level op has up to four implementations:

- ``reference``: plain torch, the executable specification (any device);
- ``cpu``: the C++ library (CPU tensors);
- ``triton``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for tests);
- ``cuda``: the CUDA library (CUDA tensors).

By default a CPU tensor goes to ``cpu`` (``reference`` when the library is missing) and a CUDA tensor to
``cuda`` (``triton`` when the CUDA library is missing). ``PYQUANT_BACKEND=<name>`` in the environment, or
``with pyquant.use_backend("<name>"):`` in code, forces one; the context manager wins over the variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os

BACKENDS = ("reference", "cpu", "triton", "cuda")
_MODULES = {
    "reference": "pyquant._reference",
    "cpu": "pyquant._cpu",
    "triton": "pyquant.kernels",
    "cuda": "pyquant._cuda",
}
# Ops added by other modules (pyquant.ops, pyquant.amp, ...): (op, backend) -> function.
_registered: dict[tuple[str, str], object] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pyquant_backend", default=None)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown pyquant backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend `name` (one of BACKENDS)."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    name = _forced.get()
    if name is None and os.environ.get("PYQUANT_BACKEND"):
        name = _check_name(os.environ["PYQUANT_BACKEND"])
    return name


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(name: str, device_type: str) -> bool:
    from pyquant import _native

    if name == "reference":
        return True
    if device_type == "cpu":
        if name == "cpu":
            return _native.cpu_library() is not None
        return name == "triton" and triton_interpreted()
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return False
        if name == "cuda":
            return _native.cuda_library() is not None
        return name == "triton"
    return False


def select(device_type: str) -> str:
    """The backend that runs ops on tensors of `device_type` right now."""
    name = forced_backend()
    if name is not None:
        if not available(name, device_type):
            hint = " (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)" if name == "triton" else ""
            raise RuntimeError(f"pyquant backend {name!r} cannot run on {device_type} tensors here{hint}")
        return name
    preferred = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}.get(device_type, ("reference",))
    return next(n for n in preferred if available(n, device_type))


def runs_eagerly(t) -> bool:
    """Whether an op on `t` may call its kernel directly instead of through its torch.library custom op: a plain
    tensor of a real device, outside torch.compile and any dispatch mode (fake tensors, tracing). The custom op's
    dispatch costs about a microsecond per tensor argument (0.2-0.5 ms over a model's few hundred tensors); the op
    stays the path for everything else, so torch.compile, meta tensors and fake tensors keep working."""
    import torch

    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta"
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0)


def register(op: str, backend: str, fn) -> None:
    """Add the `backend` implementation of `op` from outside the backend modules' OPS tables."""
    _registered[(op, _check_name(backend))] = fn


def ops(device_type: str) -> dict:
    """The ops of the backend selected for tensors of `device_type` (name -> function)."""
    name = select(device_type)
    table = dict(importlib.import_module(_MODULES[name]).OPS)
    table.update({op: fn for (op, backend), fn in _registered.items() if backend == name})
    return table


def implementation(op: str, device_type: str):
    """The function implementing `op` for tensors of `device_type` on the selected backend."""
    name = select(device_type)
    fn = _registered.get((op, name)) or importlib.import_module(_MODULES[name]).OPS.get(op)
    if fn is None:
        raise NotImplementedError(f"pyquant op {op!r} has no {name!r} implementation")
    return fn
