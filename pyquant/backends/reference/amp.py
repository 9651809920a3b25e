"""Reference kernel of GradScaler's unscale-and-check (`pyquant::unscale_`)."""

from __future__ import annotations

import torch

from pyquant.backends import kernel
from pyquant.backends.capi import check_unscale_operands


@kernel("unscale_", "reference")
def unscale_(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """Plain torch, any device, no host sync. Per element torch's `_amp_foreach_non_finite_check_and_unscale_`:

    v = grad widened to float32 (float64 stays float64); if v is inf or NaN, found_inf = 1.0;
    grad = (v if inv_scale == 1.0 else v * inv_scale) rounded back to grad's dtype.
    """
    check_unscale_operands(grads, found_inf, inv_scale)
    unit = inv_scale == 1.0
    for g in grads:
        v = g.double() if g.dtype == torch.float64 else g.float()  # .float() of a float32 grad is the grad itself
        found_inf.masked_fill_(~torch.isfinite(v).all(), 1.0)
        g.copy_(torch.where(unit, v, v * inv_scale))
