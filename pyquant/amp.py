"""Dynamic loss scaling: `pyquant.amp.GradScaler`, a drop-in for `torch.amp.GradScaler`.

Same constructor, methods, state dict and pickling rules, and bit-identical results to torch's for
float32, bfloat16 (and float64) gradients: the same scale after every update, the same skipped steps,
the same unscaled gradient bits (tests/test_amp.py runs both side by side). One addition: float16
gradients are accepted (torch raises "Attempting to unscale FP16 gradients."), so a model kept wholly
in float16 trains with dynamic loss scaling.

The loop, as torch's::

    scaler = pyquant.amp.GradScaler("cuda")
    for x, y in data:
        optimizer.zero_grad()
        scaler.scale(loss_fn(model(x), y)).backward()
        scaler.step(optimizer)      # unscale_ (unless done), then optimizer.step() unless inf/NaN was found
        scaler.update()             # x backoff_factor after an overflow, x growth_factor after
                                    # growth_interval clean steps in a row

The unscale-and-check of all gradients of one device is one custom op, `pyquant::unscale_`.
"""

from __future__ import annotations

import math
import warnings
from collections import abc, defaultdict
from typing import Any

import torch
from torch.amp.grad_scaler import OptState  # the stage values, shared with torch for code that reads them

from pyquant import _ops, backends
from pyquant.backends.capi import GRAD_DTYPES, check_unscale_operands

__all__ = ["GradScaler", "OptState", "half", "unscale_"]


def unscale_(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """In place over `grads` (dense, all on found_inf's device, any mix of float32/float16/bfloat16/float64):
    multiply by `inv_scale` (float32, one element) and set `found_inf` (float32, one element) to 1.0 if any
    element is inf or NaN. Every grad is processed even after a non-finite value is seen."""
    if not grads:
        check_unscale_operands(grads, found_inf, inv_scale, inv_scale_on_device=False)
        return
    inv_scale = inv_scale.to(found_inf.device)
    grads = list(grads)
    # Each backend's kernel checks the operands; the op path checks them here first, so that the error is the
    # same under torch.compile and fake tensors.
    if not backends.runs_eagerly(found_inf):
        check_unscale_operands(grads, found_inf, inv_scale)
    _ops.call_eagerly(_ops.unscale_, "unscale_", found_inf, (grads, found_inf, inv_scale), [*grads, found_inf])


# ---- the scaler ----
def _fresh_optimizer_state() -> dict[str, Any]:
    # A module-level function (not a lambda) so that the defaultdict below pickles.
    return {"stage": OptState.READY, "found_inf_per_device": {}}


class _PerDevice:
    """Copies of one tensor on the devices that ask for it, made once each."""

    def __init__(self, master: torch.Tensor) -> None:
        self.master = master
        self.copies: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Tensor:
        if device not in self.copies:
            self.copies[device] = self.master.to(device=device, non_blocking=True, copy=True)
        return self.copies[device]


def _check_factor(name: str, value, ok, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def _check_scale(name: str, value) -> float:
    """A loss scale must be a finite positive float32: 0 (or one that rounds to 0 in float32) makes every
    gradient 0 and its unscaling 0 * inf = NaN, so every step is skipped; inf or NaN make the gradients NaN;
    a negative one flips the sign of the scaled loss and gradients (no loss scale). torch accepts all of these."""
    try:
        as_float32 = torch.tensor(float(value), dtype=torch.float32).item()
    except (TypeError, ValueError, OverflowError):
        as_float32 = math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < as_float32 < math.inf:
        raise ValueError(f"{name} must be a finite positive number (in float32), got {value!r}: a scale of 0 skips "
                         "every step, inf or NaN make the gradients NaN, a negative one flips the scaled gradients")
    return value


def _check_interval(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"growth_interval must be a positive int, got {value!r}")
    return value


class GradScaler:
    """Scales the loss so that small gradients survive low precision, unscales before the step.

    Arguments, methods and results are torch.amp.GradScaler's:

    * ``scale(outputs)`` multiplies a tensor (or nested lists/tuples of tensors) by the current scale;
    * ``unscale_(optimizer)`` multiplies the optimizer's gradients by 1/scale in place and records
      whether any is inf/NaN (optional: ``step`` does it when it was not done);
    * ``step(optimizer, *args, **kwargs)`` runs ``optimizer.step(*args, **kwargs)`` unless inf/NaN was
      found, and returns its result (None when skipped);
    * ``update(new_scale=None)`` multiplies the scale by ``backoff_factor`` if any step of this
      iteration found inf/NaN, by ``growth_factor`` after ``growth_interval`` clean iterations in a
      row, or sets it to ``new_scale``.

    Args:
        device: "cuda" or "cpu" (a "cuda" scaler without CUDA disables itself with a warning).
        init_scale: first scale (float32).  growth_factor: > 1.  backoff_factor: < 1.
        growth_interval: a positive int.  enabled: False makes every method a no-op and ``step`` a
            plain ``optimizer.step``.

    Differences from torch: float16 gradients are unscaled instead of rejected; invalid factors raise
    ValueError (torch: AssertionError); a closure passed positionally to ``step`` is rejected too.
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ) -> None:
        self._device = device
        self._enabled = enabled
        if device == "cuda" and enabled and not torch.cuda.is_available():
            warnings.warn("GradScaler is enabled for cuda, but CUDA is not available.  Disabling.", stacklevel=2)
            self._enabled = False
        if self._enabled:
            self._init_scale = _check_scale("init_scale", init_scale)
            self._warned_scale = False  # warn once when the scale underflows to 0
            self._growth_factor = _check_factor("growth_factor", growth_factor, lambda f: f > 1.0, "> 1.0")
            self._backoff_factor = _check_factor("backoff_factor", backoff_factor, lambda f: 0.0 < f < 1.0, "in (0, 1)")
            self._growth_interval = _check_interval(growth_interval)
            self._init_growth_tracker = 0
            # Both made on the device of the first tensor passed to scale().
            self._scale: torch.Tensor | None = None
            self._growth_tracker: torch.Tensor | None = None
            self._per_optimizer_states: dict[int, dict[str, Any]] = defaultdict(_fresh_optimizer_state)

    # ---- scaling ----
    def _scale_tensors(self, funcname: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scale is None or self._growth_tracker is None:
            raise RuntimeError(
                f"GradScaler.{funcname}() was called before any scale(): call scaler.scale(loss) "
                "(and backward on the result) earlier in the iteration."
            )
        return self._scale, self._growth_tracker

    def _lazy_init(self, device: torch.device) -> torch.Tensor:
        if self._scale is None:
            self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=device)
            self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=device)
        return self._scale

    def scale(self, outputs):
        """`outputs` times the scale: a tensor, or (nested) lists/tuples/iterables of tensors."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            return outputs * self._lazy_init(outputs.device).to(device=outputs.device, non_blocking=True)
        copies: list[_PerDevice] = []  # made at the first tensor met, so the scale lives on its device

        def apply(value):
            if isinstance(value, torch.Tensor):
                if not copies:
                    copies.append(_PerDevice(self._lazy_init(value.device)))
                return value * copies[0].get(value.device)
            if isinstance(value, abc.Iterable):
                scaled = map(apply, value)
                return type(value)(scaled) if isinstance(value, (list, tuple)) else scaled
            raise ValueError("outputs must be a Tensor or an iterable of Tensors")

        return apply(outputs)

    # ---- unscaling ----
    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor
    ) -> dict[torch.device, torch.Tensor]:
        """One `pyquant::unscale_` per device over all of the optimizer's grads; {device: found_inf}."""
        with torch.no_grad():
            grads = self._dense_cpu_grads(optimizer)
            per_device = {torch.device("cpu"): grads} if grads is not None else self._grads_by_device(optimizer)
            inv_scales, found_infs = _PerDevice(inv_scale), _PerDevice(found_inf)
            for device, grads in per_device.items():
                unscale_(grads, found_infs.get(device), inv_scales.get(device))
        return found_infs.copies

    @staticmethod
    def _grads_by_device(optimizer: torch.optim.Optimizer) -> dict[torch.device, list[torch.Tensor]]:
        """The optimizer's gradients on each device, checked one by one; a sparse one as its (coalesced) values."""
        per_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not isinstance(param, torch.Tensor):
                    raise TypeError(f"optimizer parameters must be tensors, got {type(param).__name__}")
                grad = param.grad
                if grad is None:
                    continue
                if grad.dtype not in GRAD_DTYPES:
                    raise TypeError(
                        f"cannot unscale a {grad.dtype} gradient (parameter of shape {tuple(param.shape)}): "
                        "gradients must be float32, float16, bfloat16 or float64"
                    )
                if grad.is_sparse:
                    # Duplicate indices are summed by coalesce(); in float16 that sum may overflow,
                    # so the coalesced values are the ones to check (as torch does).
                    if grad.dtype == torch.float16:
                        param.grad = grad = grad.coalesce()
                    grad = grad._values()
                per_device[grad.device].append(grad)
        return per_device

    @staticmethod
    def _dense_cpu_grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | None:
        """The common case, checked over whole lists (per-gradient Python is most of unscale_'s cost over a
        model's hundreds of gradients): every gradient a dense CPU tensor of a float dtype. None otherwise, and
        the general loop sorts them by device and says what is wrong."""
        try:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
            grads = [g for g in grads if g is not None]
            fits = {(g.dtype, g.is_cpu, g.is_sparse) for g in grads}
        except AttributeError:  # a parameter that is not a tensor
            return None
        ok = grads and all(dtype in GRAD_DTYPES and cpu and not sparse for dtype, cpu, sparse in fits)
        return grads if ok else None

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Multiply the optimizer's gradients by 1/scale, in place, once per iteration (e.g. before
        clipping); records whether any was inf/NaN for `step` and `update`. No host sync."""
        if not self._enabled:
            return
        scale, _ = self._scale_tensors("unscale_")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        # The reciprocal is taken in float64 and rounded once (MPS has no float64).
        inv_scale = scale.reciprocal() if scale.device.type == "mps" else scale.double().reciprocal().float()
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        state["found_inf_per_device"] = self._unscale_grads_(optimizer, inv_scale, found_inf)
        state["stage"] = OptState.UNSCALED

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
        """Check the grads for inf/NaN without unscaling them (for optimizers that unscale themselves)."""
        scale, _ = self._scale_tensors("_check_inf_per_device")
        one = torch.ones((), dtype=torch.float32, device=scale.device)
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        state = self._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = self._unscale_grads_(optimizer, one, found_inf)
        return state["found_inf_per_device"]

    def _found_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
        return self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]

    # ---- stepping ----
    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """`optimizer.step(*args, **kwargs)` on unscaled gradients, skipped (returning None) if any was
        inf/NaN. Unscales first unless `unscale_` was called this iteration. Closures are not supported."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs or (args and callable(args[0])):
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._scale_tensors("step")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            result = self._fused_step(optimizer, state, args, kwargs)
        else:
            if state["stage"] is OptState.READY:
                self.unscale_(optimizer)
            found = state["found_inf_per_device"]
            if not found:
                name = type(optimizer).__name__
                raise RuntimeError(f"no gradients to check: none of the {name}'s parameters has a .grad")
            result = None
            if not sum(f.item() for f in found.values()):  # the only host sync of a clean iteration
                result = optimizer.step(*args, **kwargs)
            else:  # skipped: a scale that underflowed to 0 would skip every step from now on
                self._check_scale_alive(self._scale.item())
        state["stage"] = OptState.STEPPED
        return result

    def _fused_step(self, optimizer, state, args, kwargs):
        """Optimizers that unscale and skip inside their own kernel (torch's fused Adam/AdamW/SGD) get
        the scale and the found_inf flag as attributes `grad_scale` and `found_inf` for one step (or,
        the older contract, this scaler as a `grad_scaler=` keyword when their step() takes one)."""
        import inspect

        if "grad_scaler" in inspect.signature(optimizer.step).parameters:
            warnings.warn(
                "GradScaler is going to stop passing itself as a keyword argument to the passed optimizer. "
                "In the near future GradScaler registers `grad_scale: Tensor` and `found_inf: Tensor` to the "
                "passed optimizer and let the optimizer use them directly.",
                FutureWarning,
                stacklevel=3,
            )
            kwargs.update(grad_scaler=self)
            return optimizer.step(*args, **kwargs)
        if state["stage"] is OptState.READY:
            self._check_inf_per_device(optimizer)
        scale = self._scale
        found_inf = sum(f.to(scale.device, non_blocking=True) for f in state["found_inf_per_device"].values())
        if state["stage"] is not OptState.UNSCALED:  # after unscale_ the grads are already unscaled
            optimizer.grad_scale = scale * getattr(optimizer, "grad_scale", 1)
        optimizer.found_inf = found_inf
        try:
            return optimizer.step(*args, **kwargs)
        finally:
            if hasattr(optimizer, "grad_scale"):
                del optimizer.grad_scale
            del optimizer.found_inf

    # ---- the scale's update ----
    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """End the iteration: set the scale to `new_scale`, or else back off (any step this iteration
        found inf/NaN) or grow (growth_interval clean iterations in a row). No host sync."""
        if not self._enabled:
            return
        scale, tracker = self._scale_tensors("update")
        if new_scale is not None:
            if isinstance(new_scale, (int, float)) and not isinstance(new_scale, bool):
                scale.fill_(new_scale)
            elif isinstance(new_scale, torch.Tensor):
                if new_scale.numel() != 1 or new_scale.requires_grad or new_scale.device.type != self._device:
                    raise ValueError(
                        f"new_scale must be a float or a one-element {self._device} tensor with requires_grad=False"
                    )
                scale.copy_(new_scale.reshape(()))
            else:
                raise TypeError(f"new_scale must be a float or a tensor, got {type(new_scale).__name__}")
        else:
            found = [
                f.to(scale.device, non_blocking=True)
                for state in self._per_optimizer_states.values()
                for f in state["found_inf_per_device"].values()
            ]
            if not found:
                raise RuntimeError("update() found no inf checks: call scaler.step(optimizer) (or unscale_) first.")
            total = found[0]
            for f in found[1:]:
                total += f  # float32 sum, as torch
            self._update_scale_(scale, tracker, total)
            if scale.device.type == "cpu":  # free to read here; elsewhere at the next skipped step or get_scale()
                self._check_scale_alive(scale.item())
        self._per_optimizer_states = defaultdict(_fresh_optimizer_state)

    def _check_scale_alive(self, value: float) -> None:
        if value == 0.0 and not getattr(self, "_warned_scale", False):  # getattr: scalers pickled before it
            self._warned_scale = True
            warnings.warn(
                "GradScaler: the loss scale has underflowed to 0 after inf/NaN gradients at every scale tried: "
                "every later step will be skipped. The gradients are not finite even unscaled: check the model, "
                "the data and the learning rate.", RuntimeWarning, stacklevel=3)

    def _update_scale_(self, scale: torch.Tensor, tracker: torch.Tensor, found_inf: torch.Tensor) -> None:
        """torch's `_amp_update_scale_` in tensor ops: the factors multiply in float64, rounded once to
        float32; a grown scale that would be inf is not taken (the tracker still restarts)."""
        overflow = found_inf != 0
        clean = tracker + 1
        at_interval = clean == self._growth_interval
        grown = (scale.double() * self._growth_factor).float()
        backed_off = (scale.double() * self._backoff_factor).float()
        keep_or_grow = torch.where(at_interval & torch.isfinite(grown), grown, scale)
        scale.copy_(torch.where(overflow, backed_off, keep_or_grow))
        tracker.copy_(torch.where(overflow | at_interval, torch.zeros_like(tracker), clean))

    # ---- getters, setters, state ----
    def _get_scale_async(self) -> torch.Tensor | None:
        return self._scale

    def get_scale(self) -> float:
        """The current scale as a Python float (init_scale before the first scale(); 1.0 when disabled)."""
        if not self._enabled:
            return 1.0
        if self._scale is None:
            return self._init_scale
        value = self._scale.item()
        self._check_scale_alive(value)
        return value

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        self._growth_factor = _check_factor("growth_factor", new_factor, lambda f: f > 1.0, "> 1.0")

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        self._backoff_factor = _check_factor("backoff_factor", new_factor, lambda f: 0.0 < f < 1.0, "in (0, 1)")

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        self._growth_interval = _check_interval(new_interval)

    def _get_growth_tracker(self) -> int:
        if not self._enabled:
            return 0
        return self._init_growth_tracker if self._growth_tracker is None else int(self._growth_tracker.item())

    def is_enabled(self) -> bool:
        return self._enabled

    def state_dict(self) -> dict[str, Any]:
        """torch's format: scale, growth_factor, backoff_factor, growth_interval, _growth_tracker
        ({} when disabled). Take it after update()."""
        if not self._enabled:
            return {}
        return {
            "scale": self.get_scale(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._get_growth_tracker(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of torch.amp.GradScaler (a no-op when disabled)."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError(
                "The source state dict is empty, possibly because it was saved from a disabled instance of GradScaler."
            )
        missing = [k for k in ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
                   if k not in state_dict]
        if missing:
            raise KeyError(f"not a GradScaler state dict: it lacks {', '.join(missing)}")
        # everything is checked before anything is set: a refused state dict leaves the scaler as it was
        scale = _check_scale("the state dict's scale", state_dict["scale"])
        tracker = state_dict["_growth_tracker"]
        if isinstance(tracker, bool) or not isinstance(tracker, int) or tracker < 0:
            raise ValueError(f"the state dict's _growth_tracker must be an int >= 0, got {tracker!r}")
        factors = (_check_factor("growth_factor", state_dict["growth_factor"], lambda f: f > 1.0, "> 1.0"),
                   _check_factor("backoff_factor", state_dict["backoff_factor"], lambda f: 0.0 < f < 1.0, "in (0, 1)"),
                   _check_interval(state_dict["growth_interval"]))
        self._init_scale, self._init_growth_tracker = scale, tracker
        self._growth_factor, self._backoff_factor, self._growth_interval = factors
        if self._scale is not None:
            self._scale.fill_(state_dict["scale"])
            self._growth_tracker.fill_(state_dict["_growth_tracker"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._enabled:
            if len(self._per_optimizer_states) != 0:
                raise RuntimeError(
                    "A GradScaler instance may only be pickled at the beginning of an iteration, "
                    "or at the end after scaler.update()."
                )
            # The tensors are not pickled: the copy re-creates them from these at its first scale().
            state["_init_scale"] = self.get_scale()
            state["_init_growth_tracker"] = self._get_growth_tracker()
            state["_scale"] = None
            state["_growth_tracker"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def half(model: torch.nn.Module, dtype: torch.dtype = torch.float16, keep_norm_fp32: bool = True, **kwargs):
    """Cast `model` for the "half" setting (see `pyquant.nn.half_precision.half`, imported on first use)."""
    from pyquant.nn.half_precision import half as cast

    return cast(model, dtype, keep_norm_fp32=keep_norm_fp32, **kwargs)
