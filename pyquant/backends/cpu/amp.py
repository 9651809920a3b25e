"""The C++ CPU library's unscale-and-check (csrc/cpu/amp.cpp)."""

from __future__ import annotations

import array

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
    # What the C call trusts (dtype, device, layout) is checked over the whole list at once: list comprehensions
    # and array.array buffers, not a Python loop and ctypes arrays, since per-gradient Python is most of this
    # function's cost over a model's hundreds of gradients (bench/profile_unscale.py).
    try:
        codes = [DTYPE_CODES.get(g.dtype) for g in grads]
        on_cpu = [g.is_cpu for g in grads]
    except AttributeError:  # not a tensor
        codes, on_cpu = [None], [False]
    if None in codes or False in on_cpu:
        for i, g in enumerate(grads):
            check_grad(i, g, found_inf.device)  # raises, naming what is wrong with this gradient
    sizes = [g.numel() for g in grads]
    contiguous = [g.is_contiguous() for g in grads]
    others = []
    if 0 in sizes or False in contiguous:  # empty gradients need nothing; strided ones go to the reference
        others = [g for g, n, c in zip(grads, sizes, contiguous) if n and not c]
        kept = [(g, n, code) for g, n, c, code in zip(grads, sizes, contiguous, codes) if n and c]
        grads, sizes, codes = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
    if grads:
        pointers = array.array("q", [g.data_ptr() for g in grads])
        sizes, codes = array.array("q", sizes), array.array("i", codes)
        status = cpu_library().pq_unscale_(
            len(pointers), pointers.buffer_info()[0], sizes.buffer_info()[0], codes.buffer_info()[0],
            found_inf.data_ptr(), inv_scale.data_ptr(), threads, int(vector),
        )
        check_status(status, "unscale_")
    if others:
        unscale_reference(others, found_inf, inv_scale)
