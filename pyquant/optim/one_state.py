"""The 8-bit optimizers with one state: Lion8bit, SGD8bit (momentum), RMSprop8bit and Adagrad8bit, drop-ins for
bitsandbytes 0.50.2's (same signatures and defaults, same bits on CPU, same `state_dict()` layout).

Each keeps one state per parameter (Lion's and SGD's momentum, RMSprop's and Adagrad's squared-gradient
average or sum): 8-bit codes of the signed dynamic map with a float32 scale per block of 256 elements, or
float32 for tensors below `min_8bit_size`. One library call per parameter group and device updates every tensor
(op `pyquant::one_state_step_`); the arithmetic is bitsandbytes' CPU code op for op (docs/numerics.md section 5),
including where its 8-bit and 32-bit paths differ.

Options bitsandbytes accepts but ignores on its CPU paths are refused here rather than silently not applied:
SGD's `dampening` and `nesterov`, RMSprop's `momentum`. Those it refuses are refused too (SGD without momentum,
RMSprop's `centered` and alpha == 0, Adagrad's `lr_decay` and `initial_accumulator_value`). `args` (bnb's
override object) and `is_paged=True` are refused. The shared keyword arguments `min_8bit_size`,
`master_weights` and `nonfinite` are Optimizer8bit's (pyquant/optim/_base.py), and so are per-parameter overrides
(`pyquant.optim.override`, overrides.py) and the conversion with torch's float32 optimizer (`from_torch`,
`to_torch`): SGD8bit with torch.optim.SGD, RMSprop8bit with RMSprop, Adagrad8bit with Adagrad; torch has no Lion.
"""

from __future__ import annotations

import torch

from pyquant import functional as F
from pyquant._contract import ONE_STATE_RULES, one_state_constants
from pyquant.optim._base import Optimizer8bit

__all__ = ["Adagrad8bit", "Lion8bit", "RMSprop8bit", "SGD8bit"]


class _OneState8bit(Optimizer8bit):
    """An 8-bit optimizer whose rule `_rule` (a name of _contract.ONE_STATE_RULES) keeps one state, "state1"."""

    _states = ("state1",)
    _signed = (True,)  # bitsandbytes quantises every one-state optimizer's state with the signed map
    _rule = ""
    _supports_sharded = True

    def __init__(self, params, defaults: dict, args, is_paged: bool, **shared):
        name = type(self).__name__
        if args is not None:
            raise ValueError(f"{name}: bitsandbytes' `args` override object is not supported; pass the options")
        if is_paged:
            raise ValueError(f"{name}: is_paged=True (bitsandbytes' CUDA unified memory) is not supported")
        super().__init__(params, defaults, **shared)

    def _check_options(self, group: dict) -> None:
        self.check_common_options(group)
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"{type(self).__name__}: invalid betas {betas}: need two values in [0, 1)")
        self._check_rule_options(*(float(b) for b in betas))

    def _check_rule_options(self, beta1: float, beta2: float) -> None:
        """What the rule refuses in a group's betas (bitsandbytes stores its options there)."""

    def _constants_row(self, group, step, eight_bit, inv_grad_scale):
        return one_state_constants(group, step, eight_bit, inv_grad_scale)

    def _fused_step(self, group, items, stepped, grads, inv_grad_scale, policy):
        states, (code,) = self._operands(items, stepped[0].device)
        constants = self._constants(group, items, inv_grad_scale)
        return F.one_state_step_multi_tensor(stepped, grads, *states, constants, code, ONE_STATE_RULES[self._rule], policy)

    def _prepare_step(self, group, items, grads):
        states, (code,) = self._operands(items, grads[0].device)
        constants = self._constants(group, items, 1.0)
        return F.prepare_one_state_step([p for p, _ in items], grads, *states, constants, code, ONE_STATE_RULES[self._rule])


class Lion8bit(_OneState8bit):
    """Lion (sign of an interpolated momentum) with an 8-bit momentum: bitsandbytes' Lion8bit.

    p *= 1 - lr * wd (when wd > 0); p -= lr * sign(b1 * m + (1 - b1) * g); m = b2 * m + (1 - b2) * g.
    Groups hold bitsandbytes' keys: lr, betas, eps (0, unused), weight_decay. torch has no Lion optimizer, so there
    is no `from_torch` / `to_torch` for this one."""

    _rule = "lion"
    _override_keys = ("lr", "betas", "weight_decay")
    _sharded_names = ("exp_avg",)  # the name of Lion's authors' and lion-pytorch's momentum

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0, args=None,
                 min_8bit_size: int = 4096, is_paged: bool = False, *, master_weights: bool = False,
                 nonfinite: str = "skip"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=0.0, weight_decay=weight_decay)
        super().__init__(params, defaults, args, is_paged, min_8bit_size=min_8bit_size,
                         master_weights=master_weights, nonfinite=nonfinite)


class SGD8bit(_OneState8bit):
    """SGD with an 8-bit momentum buffer: bitsandbytes' SGD8bit.

    g += wd * p; m = g on the first step, else momentum * m + g; p -= lr * m (torch.optim.SGD's rule with
    dampening 0). `momentum` must be > 0 (bitsandbytes' rule); `dampening` != 0 and `nesterov=True` are refused:
    bitsandbytes accepts both and ignores them. Groups hold bitsandbytes' keys: lr, betas = (momentum,
    dampening), eps (0, unused), weight_decay.

    Converts with torch.optim.SGD (momentum_buffer; `from_torch`, `to_torch`). torch's SGD counts no steps: a
    converted state starts at step 1 (its buffer is past the first step, which copies the gradient into it)."""

    _rule = "momentum"
    _override_keys = ("lr", "betas", "weight_decay")
    _torch_class = torch.optim.SGD
    _torch_states = ("momentum_buffer",)
    _torch_step = False

    def _group_from_torch(self, sg: dict) -> dict:
        if sg.get("nesterov"):
            raise ValueError("cannot convert nesterov=True: SGD8bit has no Nesterov momentum")
        return dict(lr=sg["lr"], betas=(sg["momentum"], sg["dampening"]), eps=0.0, weight_decay=sg["weight_decay"])

    def _group_to_torch(self, group: dict) -> dict:
        momentum, dampening = group["betas"]
        return dict(lr=group["lr"], momentum=momentum, dampening=dampening, weight_decay=group["weight_decay"],
                    nesterov=False, maximize=False)

    def __init__(self, params, lr: float, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
                 nesterov: bool = False, args=None, min_8bit_size: int = 4096, *, master_weights: bool = False,
                 nonfinite: str = "skip"):
        if nesterov:
            raise ValueError("SGD8bit: nesterov=True is not supported (bitsandbytes accepts it and ignores it)")
        defaults = dict(lr=lr, betas=(momentum, dampening), eps=0.0, weight_decay=weight_decay)
        super().__init__(params, defaults, args, False, min_8bit_size=min_8bit_size,
                         master_weights=master_weights, nonfinite=nonfinite)

    def _check_rule_options(self, momentum: float, dampening: float) -> None:
        if momentum == 0.0:
            raise ValueError("SGD8bit: momentum must be > 0 (SGD without momentum has no state to keep; "
                             "bitsandbytes refuses it too): use torch.optim.SGD")
        if dampening != 0.0:
            raise ValueError(f"SGD8bit: dampening={dampening} is not supported (bitsandbytes ignores it); use 0")


class RMSprop8bit(_OneState8bit):
    """RMSprop with an 8-bit average of squared gradients: bitsandbytes' RMSprop8bit.

    g += wd * p; v = alpha * v + (1 - alpha) * g^2; p -= lr * g / (sqrt(v) + eps). `alpha` must be in (0, 1);
    `centered=True` is refused (as bitsandbytes does) and so is `momentum` != 0 (bitsandbytes ignores it).
    Groups hold bitsandbytes' keys: lr, betas = (alpha, momentum), eps, weight_decay.

    Converts with torch.optim.RMSprop (square_avg, step; `from_torch`, `to_torch`)."""

    _rule = "rmsprop"
    _nonnegative_states = ("state1",)
    _torch_class = torch.optim.RMSprop
    _torch_states = ("square_avg",)

    def _group_from_torch(self, sg: dict) -> dict:
        if sg.get("centered"):
            raise ValueError("cannot convert centered=True: RMSprop8bit has no grad_avg")
        return dict(lr=sg["lr"], betas=(sg["alpha"], sg["momentum"]), eps=sg["eps"], weight_decay=sg["weight_decay"])

    def _group_to_torch(self, group: dict) -> dict:
        alpha, momentum = group["betas"]
        return dict(lr=group["lr"], alpha=alpha, eps=group["eps"], weight_decay=group["weight_decay"],
                    momentum=momentum, centered=False, maximize=False)

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0,
                 momentum: float = 0, centered: bool = False, args=None, min_8bit_size: int = 4096, *,
                 master_weights: bool = False, nonfinite: str = "skip"):
        if centered:
            raise ValueError("RMSprop8bit: centered=True is not supported (bitsandbytes refuses it too)")
        defaults = dict(lr=lr, betas=(alpha, momentum), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, args, False, min_8bit_size=min_8bit_size,
                         master_weights=master_weights, nonfinite=nonfinite)

    def _check_rule_options(self, alpha: float, momentum: float) -> None:
        if alpha == 0.0:
            raise ValueError("RMSprop8bit: alpha must be > 0 (bitsandbytes refuses alpha == 0 too)")
        if momentum != 0.0:
            raise ValueError(f"RMSprop8bit: momentum={momentum} is not supported (bitsandbytes ignores it); use 0")


class Adagrad8bit(_OneState8bit):
    """Adagrad with an 8-bit sum of squared gradients: bitsandbytes' Adagrad8bit.

    g += wd * p; s += g^2; p -= lr * g / (sqrt(s) + eps). `lr_decay` and `initial_accumulator_value` must be 0
    (bitsandbytes refuses others too). Groups hold bitsandbytes' keys: lr, betas (0, 0), eps, weight_decay.

    Converts with torch.optim.Adagrad (sum, step; `from_torch`, `to_torch`), with lr_decay 0 and an accumulator
    that started at 0."""

    _rule = "adagrad"
    _nonnegative_states = ("state1",)
    _override_keys = ("lr", "eps", "weight_decay")
    _torch_class = torch.optim.Adagrad
    _torch_states = ("sum",)

    def _group_from_torch(self, sg: dict) -> dict:
        for key in ("lr_decay", "initial_accumulator_value"):
            if sg.get(key, 0.0) != 0.0:
                raise ValueError(f"cannot convert {key}={sg[key]}: Adagrad8bit takes 0 only")
        return dict(lr=sg["lr"], betas=(0.0, 0.0), eps=sg["eps"], weight_decay=sg["weight_decay"])

    def _group_to_torch(self, group: dict) -> dict:
        return dict(lr=group["lr"], lr_decay=0.0, weight_decay=group["weight_decay"], initial_accumulator_value=0.0,
                    eps=group["eps"], maximize=False)

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, args=None, min_8bit_size: int = 4096, *,
                 master_weights: bool = False, nonfinite: str = "skip"):
        if initial_accumulator_value != 0.0:
            raise ValueError("Adagrad8bit: initial_accumulator_value must be 0 (bitsandbytes refuses others too)")
        if lr_decay != 0.0:
            raise ValueError("Adagrad8bit: lr_decay must be 0 (bitsandbytes refuses others too)")
        defaults = dict(lr=lr, betas=(0.0, 0.0), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, args, False, min_8bit_size=min_8bit_size,
                         master_weights=master_weights, nonfinite=nonfinite)
