"""Adam and AdamW with block-wise 8-bit states: drop-ins for torch.optim.Adam/AdamW and bitsandbytes' 8-bit ones.

The step is one fused pass per block of 256 elements (dequantise m and v, update them and the parameter,
requantise), and one library call per parameter group and device updates every tensor of the group.
Numerics, state layout and `state_dict()` are those of bitsandbytes 0.50.2 (docs/numerics.md), so a
checkpoint moves between the two libraries in either direction and training continues with the same bits.

Differences from torch.optim.Adam, on purpose:
- `weight_decay` is decoupled (p *= 1 - lr * wd before the update), as in bitsandbytes' Adam8bit; for
  Adam8bit and AdamW8bit alike.
- tensors with fewer than `min_8bit_size` elements keep float32 states (bitsandbytes' rule); per tensor,
  `pyquant.optim.override(param, optim_bits=32)` keeps them float32 whatever the size (overrides.py).
- non-finite gradient elements: see `nonfinite` below.

Switching with torch mid-training: `pyquant.optim.from_torch(torch_adam)` / `to_torch(adam8bit)` (the shared code is
in _base.py; this class names torch's states and maps the groups).
"""

from __future__ import annotations

import warnings
import torch

from pyquant import functional as F
from pyquant._contract import adam_constants
from pyquant.optim._base import Optimizer8bit, from_torch, to_torch

__all__ = ["Adam8bit", "AdamW8bit", "from_torch", "to_torch"]


class Adam8bit(Optimizer8bit):
    """Adam with 8-bit block-wise quantised moments (75% less optimizer-state memory than float32 Adam).

    Args:
        params: parameters or parameter groups, as for torch.optim.Adam.
        lr, betas, eps: as for torch.optim.Adam.
        weight_decay: decoupled weight decay (p *= 1 - lr * wd), as bitsandbytes' Adam8bit does.
        amsgrad: must be False (not supported; bitsandbytes ignores it, pyquant says so).
        min_8bit_size: tensors with fewer elements keep float32 states (default 4096, as bitsandbytes).
        master_weights: for float16/bfloat16 parameters, keep a float32 copy (state "master") that the
            step updates; the parameter is that copy rounded to its dtype after every step, so updates
            smaller than half a unit in the last place of a float16 weight are not lost (+4 bytes per
            such parameter element). Float32 parameters need none and get none.
        nonfinite: what a NaN or inf gradient element does.
            ``"skip"`` (default): that element's parameter and moments are left unchanged; every other
            element, including the rest of its block, is updated as if it were absent (the block's scale
            is computed over finite moments only). `self.nonfinite_count` holds the number of skipped
            elements in the last step.
            ``"propagate"``: bitsandbytes' CPU behaviour, bit for bit: the NaN/inf flows into the parameter
            element and, through the block's scale, into the states of its whole block.

    With a GradScaler (pyquant.amp's or torch.amp's), the unscale is fused into the step: the scaler
    hands over the loss scale and the found-inf flag (attributes ``grad_scale`` and ``found_inf``, set for
    one step), the kernel multiplies each gradient by 1/scale as it reads it (rounded to the gradient's
    dtype, as ``unscale_`` would store it), and a step with an inf/NaN gradient anywhere is skipped whole.
    Same bits as unscale-then-step, without the pass that writes unscaled gradients back.
    """

    _default_weight_decay = 0.0
    _nonnegative_states = ("state2",)
    _supports_sharded = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        *,
        min_8bit_size: int = 4096,
        master_weights: bool = False,
        nonfinite: str = "skip",
    ):
        weight_decay = self._default_weight_decay if weight_decay is None else weight_decay
        # alpha, t_alpha and t_beta3 are bitsandbytes' AdEMAMix fields; kept so that param_groups match its layout.
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, alpha=0.0, t_alpha=None, t_beta3=None
        )
        if amsgrad:
            self._check_options(dict(defaults, amsgrad=amsgrad))
        super().__init__(
            params, defaults, min_8bit_size=min_8bit_size, master_weights=master_weights, nonfinite=nonfinite
        )

    # ---- options: checked for the constructor's defaults, every added group and every loaded group ----
    def _check_options(self, group: dict) -> None:
        name, betas = type(self).__name__, group["betas"]
        self.check_common_options(group)
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"{name}: invalid betas {betas}: need two values in [0, 1)")
        if group.get("amsgrad"):
            raise ValueError(f"{name} does not support amsgrad=True; use torch.optim.Adam for AMSGrad")


    def _constants_row(self, group, step, eight_bit, inv_grad_scale):
        return adam_constants(group, step, eight_bit, inv_grad_scale)

    def _fused_step(self, group, items, stepped, grads, inv_grad_scale, policy):
        states, codes = self._operands(items, stepped[0].device)
        constants = self._constants(group, items, inv_grad_scale)
        return F.adam_step_multi_tensor(stepped, grads, *states, constants, *codes, policy)

    def _prepare_step(self, group, items, grads):
        states, codes = self._operands(items, grads[0].device)
        return F.prepare_adam_step([p for p, _ in items], grads, *states, self._constants(group, items, 1.0), *codes)

    # ---- switching with torch.optim.Adam / AdamW (Optimizer8bit.load_torch_state_dict, from_torch, to_torch) ----
    _torch_class = torch.optim.Adam
    _torch_states = ("exp_avg", "exp_avg_sq")
    _to_torch_class = torch.optim.AdamW  # pyquant's weight decay is decoupled; with weight_decay=0 it is Adam

    def _group_from_torch(self, sg: dict) -> dict:
        if sg.get("amsgrad"):
            raise ValueError(f"cannot convert an AMSGrad state: {type(self).__name__} has no max_exp_avg_sq")
        if sg["weight_decay"] > 0 and not sg.get("decoupled_weight_decay", False):
            warnings.warn(
                "torch.optim.Adam applies weight_decay as an L2 term on the gradient; pyquant decouples it "
                "(like AdamW), so training continues with decoupled weight decay",
                RuntimeWarning,
                stacklevel=3,
            )
        return dict(lr=sg["lr"], betas=sg["betas"], eps=sg["eps"], weight_decay=sg["weight_decay"], alpha=0.0,
                    t_alpha=None, t_beta3=None)

    def _group_to_torch(self, group: dict) -> dict:
        return dict(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                    decoupled_weight_decay=True)


class AdamW8bit(Adam8bit):
    """AdamW with 8-bit states: Adam8bit with decoupled weight decay defaulting to 0.01 (as torch and bitsandbytes)."""

    _default_weight_decay = 1e-2
    _torch_class = torch.optim.AdamW
