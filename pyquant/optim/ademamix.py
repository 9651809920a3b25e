"""AdEMAMix (Pagliardini, Ablin & Grangier 2024) with 8-bit or float32 states: drop-ins for bitsandbytes 0.50.2's
AdEMAMix, AdEMAMix8bit and AdEMAMix32bit (same signatures and defaults, same bits on CPU, same `state_dict()` layout).

Adam's two moments plus a slow EMA of the gradient, mixed into the update with weight alpha:
    m1 = b1 m1 + (1 - b1) g;  m2 = b3 m2 + (1 - b3) g;  nu = b2 nu + (1 - b2) g^2
    p = p (1 - lr wd) - lr (m1 / (1 - b1^t) + alpha m2) / (sqrt(nu) / sqrt(1 - b2^t) + eps)
(decoupled weight decay, applied when wd > 0). As in bitsandbytes, state1 holds m1 and m2 stacked (shape
(2, *p.shape); 8-bit: codes of the signed dynamic map, scales absmax1 of shape (2, blocks)), state2 holds nu (the
unsigned map). `t_alpha` and `t_beta3` are bitsandbytes' schedulers (alpha rises linearly, beta3 rises from beta1;
None or 0: off). One library call per parameter group and device (op `pyquant::ademamix_step_`); the arithmetic is
bitsandbytes' CPU code op for op (docs/numerics.md, "AdEMAMix").

Refused rather than silently different: `is_paged=True` (bitsandbytes ignores it on CPU), betas that are not three
values in [0, 1), a negative or non-finite alpha, a negative t_alpha/t_beta3, and t_beta3 with beta1 or beta3 equal
to 0 (its schedule takes their logarithms; bitsandbytes fails at its first step). The keyword arguments
`master_weights` and `nonfinite` are Optimizer8bit's (pyquant/optim/_base.py).
"""

from __future__ import annotations

import math

import torch

from pyquant import functional as F
from pyquant._contract import OPTIMIZER_BLOCK, ademamix_constants
from pyquant.distributed import is_sharded, local_tensor
from pyquant.optim._base import QUANT_STATE_KEY, Optimizer8bit

__all__ = ["AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit"]


class AdEMAMix(Optimizer8bit):
    """AdEMAMix with `optim_bits` 32 (float32 states, the default, as bitsandbytes) or 8 (8-bit states for tensors
    of at least `min_8bit_size` elements): bitsandbytes' AdEMAMix. See the module docstring for the update."""

    _nonnegative_states = ("state2",)
    _supports_sharded = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999, 0.9999), alpha: float = 5.0,
                 t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8, weight_decay: float = 1e-2,
                 optim_bits: int = 32, min_8bit_size: int = 4096, is_paged: bool = False, *,
                 master_weights: bool = False, nonfinite: str = "skip"):
        name = type(self).__name__
        if optim_bits not in (8, 32):
            raise ValueError(f"{name}: optim_bits must be 8 or 32, got {optim_bits!r}")
        if is_paged:
            raise ValueError(f"{name}: is_paged=True (bitsandbytes' CUDA unified memory) is not supported")
        self.optim_bits = optim_bits
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, alpha=alpha, t_alpha=t_alpha,
                        t_beta3=t_beta3)
        super().__init__(params, defaults, min_8bit_size=min_8bit_size, master_weights=master_weights,
                         nonfinite=nonfinite)

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), optim_bits=self.optim_bits)

    # ---- options: checked for the constructor's defaults, every added group and every loaded group ----
    def _check_options(self, group: dict) -> None:
        name, betas = type(self).__name__, group["betas"]
        self.check_common_options(group)
        if len(betas) != 3 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"{name}: invalid betas {betas}: need three values (beta1, beta2, beta3) in [0, 1)")
        if not 0.0 <= float(group["alpha"]) < math.inf:
            raise ValueError(f"{name}: invalid alpha {group['alpha']}: need a finite value >= 0")
        for key in ("t_alpha", "t_beta3"):
            t = group[key]
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf):
                raise ValueError(f"{name}: invalid {key} {t!r}: need None or a number of steps >= 0 (0: no scheduler)")
        if group["t_beta3"] and (float(betas[0]) == 0.0 or float(betas[2]) == 0.0):
            raise ValueError(f"{name}: t_beta3 needs beta1 > 0 and beta3 > 0 (its schedule takes their logarithms), "
                             f"got betas {betas}")

    # ---- state: state1 is m1 and m2 stacked, (2, *p.shape), as in bitsandbytes ----
    def _uses_8bit(self, p: torch.Tensor, options: dict | None = None) -> bool:
        # the class's optim_bits, then the base rule: overrides and group keys (optim_bits, min_8bit_size)
        return self.optim_bits == 8 and super()._uses_8bit(p, options)

    def _init_state(self, p: torch.Tensor, options: dict | None = None) -> dict:
        state = self.state[p]
        state["step"] = 0
        shard = local_tensor(p)  # under FSDP2 the states are this rank's shard's (pyquant/distributed.py)
        if self._keeps_master(p):
            state["master"] = shard.detach().float().contiguous()
        eight_bit = self._uses_8bit(p, options)  # on the whole parameter: the same on every rank and world size
        dtype = torch.uint8 if eight_bit else torch.float32
        state["state1"] = torch.zeros((2, *shard.shape), dtype=dtype, device=p.device)
        state["state2"] = torch.zeros(shard.shape, dtype=dtype, device=p.device)
        if eight_bit:
            blocks = -(-shard.numel() // OPTIMIZER_BLOCK)
            state["qmap1"], state["qmap2"] = self._codes_on(p.device)
            state["absmax1"] = torch.zeros((2, blocks), dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        return state

    def _check_state(self, p: torch.Tensor) -> dict:
        """p's states, after checking that they still fit p (the kernel writes as many elements as p has, twice
        into state1)."""
        state, shape = self.state[p], local_tensor(p).shape
        shapes = {"state1": (2, *shape), "state2": shape, "master": shape}
        if state["state1"].device == p.device and all(
                state[key].shape == shape for key, shape in shapes.items() if key in state):
            return state
        for key, shape in shapes.items():
            t = state.get(key)
            if t is not None and t.shape != shape:
                raise RuntimeError(
                    f"{type(self).__name__}: state {key!r} of parameter {self._index_of(p)} has shape {tuple(t.shape)}, "
                    f"expected {tuple(shape)} for the parameter's shape {tuple(p.shape)}; the parameter changed size "
                    "after its first step"
                )
        raise RuntimeError(
            f"{type(self).__name__}: state 'state1' of parameter {self._index_of(p)} is on {state['state1'].device} "
            f"but the parameter is on {p.device}; the parameter moved after its first step (move the optimizer too: "
            "state_dict() then load_state_dict())"
        )

    def _moment_slots(self):
        # under FSDP2 each EMA is a float32 DTensor laid out like the parameter, which the stacked state1 is not
        return [("exp_avg_fast", "state1", 0), ("exp_avg_slow", "state1", 1), ("exp_avg_sq", "state2", None)]

    def _checked_state(self, p: torch.Tensor, saved: dict, index) -> dict:
        """Optimizer8bit's checks, run on each of the stacked EMAs (with its scales) beside state2."""
        if is_sharded(p):  # the moments by name, as _moment_slots says (pyquant/distributed.py)
            return super()._checked_state(p, saved, index)
        saved = dict(saved)
        saved.update(saved.pop(QUANT_STATE_KEY, {}))
        where = f"state of parameter {index} (shape {tuple(p.shape)}, {p.dtype})"
        stacked, scales = saved.get("state1"), saved.get("absmax1")
        if not isinstance(stacked, torch.Tensor) or stacked.shape != (2, *p.shape):
            raise ValueError(f"{where}: state1 must be the fast and slow EMAs stacked, a tensor of shape "
                             f"{(2, *p.shape)}; got {getattr(stacked, 'shape', type(stacked).__name__)}")
        if stacked.dtype == torch.uint8:
            blocks = -(-p.numel() // OPTIMIZER_BLOCK)
            if not isinstance(scales, torch.Tensor) or scales.numel() != 2 * blocks:
                raise ValueError(f"{where}: absmax1 must hold 2 x {blocks} block scales (shape (2, {blocks}))")
            scales = scales.reshape(2, blocks)
        halves = []
        for i, what in enumerate(("", " (in the slow EMA: state1[1], absmax1[1])")):
            half = dict(saved, state1=stacked[i], absmax1=scales[i] if stacked.dtype == torch.uint8 else None)
            try:
                halves.append(super()._checked_state(p, half, index))
            except ValueError as e:
                raise ValueError(f"{e}{what}") from None
        state = halves[0]
        state["state1"] = torch.stack([h["state1"] for h in halves])
        if "absmax1" in state:
            state["absmax1"] = torch.stack([h["absmax1"] for h in halves])
        return state

    # ---- the step ----
    def _constants_row(self, group: dict, step: int, eight_bit: bool, inv_grad_scale: float) -> list[float]:
        try:  # the same row for 8-bit and float32 states
            return ademamix_constants(group, step, inv_grad_scale)
        except (ArithmeticError, ValueError) as e:  # the beta3 schedule's formula can divide by 0 or overflow
            raise ValueError(f"{type(self).__name__}: the beta3 schedule (bitsandbytes' formula) is undefined at step "
                             f"{step} for betas {group['betas']} and t_beta3 {group['t_beta3']}: {e}") from None

    def _fused_step(self, group, items, stepped, grads, inv_grad_scale, policy):
        states, codes = self._operands(items, stepped[0].device)
        constants = self._constants(group, items, inv_grad_scale)
        return F.ademamix_step_multi_tensor(stepped, grads, *states, constants, *codes, policy)

    def _prepare_step(self, group, items, grads):
        states, codes = self._operands(items, grads[0].device)
        return F.prepare_ademamix_step([p for p, _ in items], grads, *states, self._constants(group, items, 1.0), *codes)


class AdEMAMix8bit(AdEMAMix):
    """AdEMAMix with 8-bit states (float32 for tensors below `min_8bit_size`): bitsandbytes' AdEMAMix8bit."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999, 0.9999), alpha: float = 5.0,
                 t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8, weight_decay: float = 1e-2,
                 min_8bit_size: int = 4096, is_paged: bool = False, *, master_weights: bool = False,
                 nonfinite: str = "skip"):
        super().__init__(params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay, 8, min_8bit_size, is_paged,
                         master_weights=master_weights, nonfinite=nonfinite)


class AdEMAMix32bit(AdEMAMix):
    """AdEMAMix with float32 states: bitsandbytes' AdEMAMix32bit."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999, 0.9999), alpha: float = 5.0,
                 t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8, weight_decay: float = 1e-2,
                 min_8bit_size: int = 4096, is_paged: bool = False, *, master_weights: bool = False,
                 nonfinite: str = "skip"):
        super().__init__(params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay, 32, min_8bit_size, is_paged,
                         master_weights=master_weights, nonfinite=nonfinite)
