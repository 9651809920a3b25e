"""The C++ CPU library's unscale-and-check (csrc/cpu/amp.cpp)."""

from __future__ import annotations

import ctypes

import torch

from pyquant._contract import DTYPE_CODES
from pyquant.backends import kernel
from pyquant.backends.capi import check_grad, check_status, check_unscale_operands, cpu_library
from pyquant.backends.reference.amp import unscale_ as unscale_reference


@kernel("unscale_", "cpu")
def unscale_(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor, *,
             threads: int = 0, vector: bool = True) -> None:
    """One call for all contiguous grads, OpenMP over chunks of all of them; a non-contiguous grad goes to the
    reference. Same bits as the reference for any thread count (`threads` <= 0: OpenMP's default);
    `vector=False` forces the element-by-element code (tests)."""
    check_unscale_operands((), found_inf, inv_scale)
    if found_inf.device.type != "cpu":
        raise ValueError(f"the cpu unscale_ got tensors on {found_inf.device}")
    # One pass checks each gradient (what the C call trusts: dtype, device, layout) and collects the C call's
    # arrays: per-gradient Python is most of this function's cost over a model's hundreds of gradients.
    pointers, sizes, codes, others = [], [], [], []
    for i, g in enumerate(grads):
        code = DTYPE_CODES.get(g.dtype) if isinstance(g, torch.Tensor) else None
        if code is None or not g.is_cpu:
            check_grad(i, g, found_inf.device)  # raises, naming what is wrong with this gradient
        n = g.numel()
        if n == 0:
            continue
        if not g.is_contiguous():
            others.append(g)
            continue
        pointers.append(g.data_ptr())
        sizes.append(n)
        codes.append(code)
    if pointers:
        count = len(pointers)
        status = cpu_library().pq_unscale_(
            count,
            (ctypes.c_void_p * count)(*pointers),
            (ctypes.c_int64 * count)(*sizes),
            (ctypes.c_int32 * count)(*codes),
            found_inf.data_ptr(),
            inv_scale.data_ptr(),
            threads,
            int(vector),
        )
        check_status(status, "unscale_")
    if others:
        unscale_reference(others, found_inf, inv_scale)
