"""Which implementation runs an op: the backend switch and the kernel registry.

Every op of pyquant is declared once, in pyquant._ops, as a `torch.library` custom op. Its implementations
live in sibling packages, one module per op family, and attach themselves with `@kernel(op, backend)`:

- ``reference`` (pyquant.backends.reference): plain torch, the executable specification (any device);
- ``cpu`` (pyquant.backends.cpu): the C++ library (CPU tensors);
- ``triton`` (pyquant.backends.triton): launchers of the Triton kernels in pyquant.kernels (CUDA tensors; CPU
  tensors only under ``TRITON_INTERPRET=1``, for tests);
- ``cuda`` (pyquant.backends.cuda): the CUDA library (CUDA tensors).

A backend's package is imported the first time it is selected. By default a CPU tensor goes to ``cpu``
(``reference`` when the library is missing) and a CUDA tensor to ``cuda`` (``triton`` when the CUDA library is
missing). ``PYQUANT_BACKEND=<name>`` in the environment, or ``with pyquant.use_backend("<name>"):`` in code,
forces one; the context manager wins over the variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Callable

BACKENDS = ("reference", "cpu", "triton", "cuda")
_KERNELS: dict[tuple[str, str], Callable] = {}  # (op, backend) -> kernel
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pyquant_backend", default=None)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown pyquant backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def kernel(op: str, backend: str):
    """Decorator: register the function as `backend`'s implementation of the op `op` (a name of pyquant._ops)."""
    _check_name(backend)

    def register(fn: Callable) -> Callable:
        if (op, backend) in _KERNELS:
            raise RuntimeError(f"pyquant: two {backend!r} kernels registered for the op {op!r}")
        _KERNELS[(op, backend)] = fn
        return fn

    return register


_loaded: set[str] = set()


def _load(backend: str) -> None:
    """Import the backend's package: its __init__ imports every op-family module, which registers the kernels.
    Once per backend: this sits on every op's path, where even a cached import costs half a microsecond."""
    if backend not in _loaded:
        importlib.import_module(f"pyquant.backends.{backend}")
        _loaded.add(backend)


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
    from pyquant.backends import capi

    if name == "reference":
        return True
    if device_type == "cpu":
        if name == "cpu":
            return capi.cpu_library() is not None
        return name == "triton" and triton_interpreted()
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return False
        if name == "cuda":
            return capi.cuda_library() is not None
        return name == "triton"
    return False


# The backends tried in turn for a device type when none is forced; the reference one runs everywhere.
_PREFERRED = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def select(device_type: str) -> str:
    """The backend that runs ops on tensors of `device_type` right now."""
    name = forced_backend()
    if name is not None:
        if not available(name, device_type):
            hint = " (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)" if name == "triton" else ""
            raise RuntimeError(f"pyquant backend {name!r} cannot run on {device_type} tensors here{hint}")
        return name
    # A plain loop: every op and every optimizer step asks, and the generator this replaced cost about 1.5 us a call.
    for name in _PREFERRED.get(device_type, ()):
        if available(name, device_type):
            return name
    return "reference"


def runs_eagerly(t) -> bool:
    """Whether an op on `t` may call its kernel directly instead of through its torch.library custom op: a plain
    tensor of a real device, outside torch.compile and any dispatch mode (fake tensors, tracing). The custom op's
    dispatch costs about a microsecond per tensor argument (0.2-0.5 ms over a model's few hundred tensors); the op
    stays the path for everything else, so torch.compile, meta tensors and fake tensors keep working."""
    import torch

    return (type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta  # is_meta: no torch.device object made
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0)


def lookup(op: str, backend: str) -> Callable | None:
    """`backend`'s kernel for `op`, or None when it has none (its package is imported first)."""
    _load(_check_name(backend))
    return _KERNELS.get((op, backend))


def kernels_of(backend: str) -> dict[str, Callable]:
    """Every kernel `backend` registered, by op name (tests call a backend's kernels directly)."""
    _load(_check_name(backend))
    return {op: fn for (op, name), fn in _KERNELS.items() if name == backend}


def implementation(op: str, device_type: str) -> Callable:
    """The kernel implementing `op` for tensors of `device_type` on the selected backend."""
    name = select(device_type)
    fn = lookup(op, name)
    if fn is None:
        raise NotImplementedError(f"pyquant op {op!r} has no {name!r} implementation")
    return fn


def matrix() -> dict[str, dict[str, bool]]:
    """{op: {backend: has a kernel}} over every registered kernel of every backend (`pyquant info`).

    A backend whose package cannot be imported here (Triton without the triton package) has no kernels."""
    for name in BACKENDS:
        try:
            _load(name)
        except ImportError:
            pass
    ops = sorted({op for op, _ in _KERNELS})
    return {op: {name: (op, name) in _KERNELS for name in BACKENDS} for op in ops}
