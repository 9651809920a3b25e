"""What every 8-bit optimizer of pyquant shares: `Optimizer8bit`, the base of Adam8bit/AdamW8bit (adam.py) and of
Lion8bit, SGD8bit, RMSprop8bit and Adagrad8bit (one_state.py).

Per parameter: the choice of 8-bit or float32 states (`min_8bit_size`, bitsandbytes' rule), their creation and
checks; the step's loop over groups and devices, non-contiguous parameters, master weights, the non-finite
gradient policy and GradScaler's fused unscale; `state_dict()` in bitsandbytes 0.50.2's layout and keys, and
loading either library's state dict with every entry checked. A subclass names its states (`_states`, with the
signedness of each one's dynamic map), checks its options (`_check_options`) and runs its fused op over one
group's tensors on one device (`_fused_step`).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from copy import deepcopy
from itertools import chain

import torch

from pyquant import functional as F
from pyquant._contract import OPTIMIZER_BLOCK
from pyquant.distributed import (
    checked_sharded_state,
    is_sharded,
    local_tensor,
    sharded_state_entry,
)


# bitsandbytes 0.50.2 keeps these state entries inside one nested dict in state_dict(), so that FSDP's
# gathering skips them; loading unwraps it. Same key, same layout, in both directions.
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
QUANT_STATE_FIELDS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2")
NONFINITE_POLICIES = {"skip": 0, "propagate": 1}


class Optimizer8bit(torch.optim.Optimizer):
    """The shared part of pyquant's 8-bit optimizers (see the module docstring); not used directly.

    Keyword arguments every subclass takes (its docstring lists its own):
        min_8bit_size: tensors with fewer elements keep float32 states (default 4096, as bitsandbytes).
        master_weights: for float16/bfloat16 parameters, keep a float32 copy (state "master") that the
            step updates; the parameter is that copy rounded to its dtype after every step (+4 bytes per
            such parameter element). Float32 parameters need none and get none.
        nonfinite: what a NaN or inf gradient element does.
            ``"skip"`` (default): that element's parameter and states are left unchanged; every other
            element, including the rest of its block, is updated as if it were absent (the block's scale
            is computed over the updated and kept states). `self.nonfinite_count` holds the number of skipped
            elements in the last step.
            ``"propagate"``: bitsandbytes' CPU behaviour, bit for bit: the NaN/inf flows into the parameter
            element and, through the block's scale, into the states of its whole block.
    """

    _states: tuple[str, ...] = ("state1", "state2")  # state names, in order
    _signed: tuple[bool, ...] = (True, False)  # per state: the signed or the unsigned dynamic map
    _nonnegative_states: tuple[str, ...] = ()  # float32 states no step makes negative (checked on load)
    _supports_sharded = False  # FSDP2 DTensor parameters (pyquant/distributed.py)
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, *, min_8bit_size: int, master_weights: bool, nonfinite: str):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {sorted(NONFINITE_POLICIES)}, got {nonfinite!r}")
        self._check_options(defaults)
        # Set before the groups are added, and kept by pickling (__getstate__), as torch keeps `defaults`.
        self.min_8bit_size = int(min_8bit_size)
        self.master_weights = bool(master_weights)
        self.nonfinite = nonfinite
        super().__init__(params, defaults)
        self._reset_run_attributes()

    def _check_options(self, group: dict) -> None:
        """Raise ValueError for options the update cannot take (subclasses; `check_common_options` helps)."""
        raise NotImplementedError

    def _fused_step(self, group: dict, items: list, stepped: list, grads: list, inv_grad_scale: float, policy: int):
        """Run the subclass's op over one group's tensors on one device; return the skipped count (a tensor)."""
        raise NotImplementedError

    # ---- options: checked for the constructor's defaults, every added group and every loaded group ----
    def check_common_options(self, group: dict) -> None:
        """lr, eps and weight_decay: finite and >= 0."""
        name = type(self).__name__
        for key, what in (("lr", "learning rate"), ("eps", "epsilon value"), ("weight_decay", "weight_decay value")):
            value = group[key]
            if not 0.0 <= float(value) < math.inf:
                raise ValueError(f"{name}: invalid {what} {value}: need a finite value >= 0")

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, with the constructor's checks of the options, and a parameter listed twice
        in the group refused (torch only warns: the step would update it twice, from two threads at once)."""
        if isinstance(param_group, dict) and "params" in param_group:
            params = param_group["params"]
            if isinstance(params, torch.Tensor):
                params = [params]
            elif not isinstance(params, set):  # torch refuses sets
                param_group["params"] = params = list(params)  # as torch does: a generator can be read only once
            self._check_options({**self.defaults, **param_group})
            seen = set()
            for i, p in enumerate(x[1] if isinstance(x, tuple) else x for x in params):  # (name, tensor) too
                if id(p) in seen:
                    raise ValueError(
                        f"{type(self).__name__}: parameter {i} of the group is listed twice; list each parameter once"
                    )
                seen.add(id(p))
        super().add_param_group(param_group)  # refuses a parameter in two groups, a set, a non-leaf tensor

    # ---- pickling, copy.deepcopy, torch.save(optimizer) ----
    def __getstate__(self) -> dict:
        options = {k: getattr(self, k) for k in ("min_8bit_size", "master_weights", "nonfinite")}
        return dict(super().__getstate__(), **options)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also what load_state_dict calls, with the state and groups only
        if "_codes" not in self.__dict__:  # unpickled or copied: the per-run attributes start afresh
            self._reset_run_attributes()

    def _reset_run_attributes(self) -> None:
        self.nonfinite_count: torch.Tensor | int = 0
        self._warned_nonfinite = False
        self._codes: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    # ---- state ----
    def _codes_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The dynamic map of each state (`_signed`), on `device`."""
        if device not in self._codes:
            self._codes[device] = tuple(F.create_dynamic_map(signed=sign).to(device) for sign in self._signed)
        return self._codes[device]

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return p.numel() >= self.min_8bit_size

    def _keeps_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype != torch.float32

    def _check_state(self, p: torch.Tensor) -> dict:
        """p's states, after checking that they still fit p: the kernel writes as many elements as p has into
        them (a parameter resized after its first step made it write outside them). torch's Adam raises too.
        state1 and master stand for the states made with them (the C binding checks every size again)."""
        state, shard = self.state[p], local_tensor(p)
        shape, device = shard.shape, shard.device
        master = state.get("master")
        s1 = state["state1"]
        if s1.shape == shape and s1.device == device and (master is None or master.shape == shape):
            return state
        for key in (*self._states, "master"):
            t = state.get(key)
            if t is not None and t.shape != shape:
                raise RuntimeError(
                    f"{type(self).__name__}: state {key!r} of parameter {self._index_of(p)} has {t.numel()} elements "
                    f"(shape {tuple(t.shape)}) but the parameter has {shard.numel()} (shape {tuple(shape)}); "
                    "the parameter changed size after its first step"
                )
        raise RuntimeError(
            f"{type(self).__name__}: state 'state1' of parameter {self._index_of(p)} is on {s1.device} but the "
            f"parameter is on {device}; the parameter moved after its first step (move the optimizer too: "
            "state_dict() then load_state_dict())"
        )

    def _index_of(self, p: torch.Tensor) -> int:
        """p's index in state_dict() (the groups' parameters in order)."""
        return next(i for i, q in enumerate(chain.from_iterable(g["params"] for g in self.param_groups)) if q is p)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = 0
        shard = local_tensor(p)  # under FSDP2 the states are this rank's shard's (pyquant/distributed.py)
        if self._keeps_master(p):
            state["master"] = shard.detach().float().contiguous()
        eight_bit = self._uses_8bit(p)  # decided on the whole parameter: the same on every rank and world size
        blocks = -(-shard.numel() // OPTIMIZER_BLOCK)
        for i, (key, code) in enumerate(zip(self._states, self._codes_on(p.device)), 1):
            dtype = torch.uint8 if eight_bit else torch.float32
            state[key] = torch.zeros_like(shard, dtype=dtype, memory_format=torch.contiguous_format)
            if eight_bit:
                state[f"qmap{i}"] = code
                state[f"absmax{i}"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        return state

    def state_bytes(self) -> int:
        """Bytes held by the optimizer states (moments, block scales, step counters' tensors)."""
        seen, total = set(), 0
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key not in ("qmap1", "qmap2"):
                    if value.data_ptr() not in seen:
                        seen.add(value.data_ptr())
                        total += value.numel() * value.element_size()
        return total

    # ---- the step ----
    def _check_param(self, p: torch.Tensor) -> None:
        g, name = p.grad, type(self).__name__
        if g.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients; use torch.optim.SparseAdam")
        if p.is_complex() or g.is_complex():
            raise RuntimeError(f"{name} does not support complex parameters; view them as real with torch.view_as_real")
        if p.dtype not in F.FLOAT_DTYPES or g.dtype not in F.FLOAT_DTYPES:
            raise TypeError(
                f"{name} needs float32, float16 or bfloat16 parameters and gradients, got {p.dtype} / {g.dtype}"
            )
        if is_sharded(p) and not self._supports_sharded:
            raise NotImplementedError(f"{name} does not support FSDP2 (DTensor) parameters yet; Adam8bit does")
        if g.shape != p.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} does not match parameter shape {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"gradient on {g.device} but parameter on {p.device}")

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        policy = NONFINITE_POLICIES[self.nonfinite]
        inv_grad_scale = self._fused_inv_grad_scale()
        if inv_grad_scale is None:  # GradScaler found an inf/NaN gradient: the whole step is skipped
            self.nonfinite_count = 0
            return loss
        counts = []
        for group in self.param_groups:
            by_device: dict[torch.device, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_param(p)
                state = self._check_state(p) if len(self.state[p]) else self._init_state(p)
                if self._keeps_master(p) and "master" not in state:  # e.g. loaded from a checkpoint without one
                    state["master"] = local_tensor(p).detach().float().contiguous()
                state["step"] += 1
                by_device[p.device].append((p, state))
            for device, items in by_device.items():
                # The kernel walks memory linearly: a parameter that is not contiguous (a view into a larger
                # tensor, channels_last) is stepped in a contiguous copy, copied back below into its own
                # storage and layout, as torch's optimizers update it in place. FSDP2: this rank's shards.
                targets = [local_tensor(p) for p, _ in items]
                stepped = [s["master"] if "master" in s else t.contiguous() for t, (_, s) in zip(targets, items)]
                grads = [local_tensor(p.grad).contiguous() for p, _ in items]
                counts.append(self._fused_step(group, items, stepped, grads, inv_grad_scale, policy))
                # The parameters the model computes with: master copies rounded once, and the copies above.
                back = [(t, x) for t, x in zip(targets, stepped) if x is not t]
                if back:
                    torch._foreach_copy_([t for t, _ in back], [x for _, x in back])
        self.nonfinite_count = sum(int(c) if c.device.type == "cpu" else c for c in counts) if counts else 0
        if isinstance(self.nonfinite_count, int) and self.nonfinite_count and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: {self.nonfinite_count} non-finite gradient elements were skipped "
                "(nonfinite='skip'); this warning is shown once",
                RuntimeWarning,
                stacklevel=2,
            )
        return loss

    def _fused_inv_grad_scale(self) -> float | None:
        """1/loss-scale for the kernel when a GradScaler fused its unscale into this step (1 otherwise), or
        None when its found-inf flag says the step is to be skipped (one host sync, as GradScaler.step's)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return None
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return 1.0
        # The reciprocal as GradScaler.unscale_ takes it: in float64, rounded once to float32.
        return float(torch.as_tensor(grad_scale).double().reciprocal().float())

    # ---- checkpoints: bitsandbytes' layout ----
    def state_dict(self) -> dict:
        sd = super().state_dict()
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))  # index -> parameter
        wrapped = {}
        for key, param_state in sd["state"].items():
            if is_sharded(params[key]):  # FSDP2: float32 moments as DTensors, which DCP can reshard
                wrapped[key] = sharded_state_entry(params[key], param_state)
                continue
            param_state = dict(param_state)
            quant = {k: param_state.pop(k) for k in QUANT_STATE_FIELDS if k in param_state}
            if quant:
                param_state[QUANT_STATE_KEY] = quant
            wrapped[key] = param_state
        sd["state"] = wrapped
        return sd

    def _checked_state(self, p: torch.Tensor, saved: dict, index) -> dict:
        """Validate one parameter's saved state against the parameter; return it on p's device."""
        saved = dict(saved)
        saved.update(saved.pop(QUANT_STATE_KEY, {}))
        where = f"state of parameter {index} (shape {tuple(p.shape)}, {p.dtype})"
        if is_sharded(p):
            if not self._supports_sharded:
                raise NotImplementedError(f"{where}: {type(self).__name__} does not support FSDP2 (DTensor) parameters")
            return checked_sharded_state(self, p, saved, where)
        step = saved.get("step")
        if isinstance(step, torch.Tensor):
            step = step.item()
        if step is None or float(step) != int(step) or int(step) < 0:
            raise ValueError(f"{where}: 'step' must be a non-negative integer, got {saved.get('step')!r}")
        state = {"step": int(step)}
        for key in self._states:
            t = saved.get(key)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{where}: missing tensor {key!r}")
            if t.shape != p.shape:
                raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            if t.dtype not in (torch.uint8, torch.float32):
                raise ValueError(f"{where}: {key} has dtype {t.dtype}, expected uint8 (8-bit) or float32")
            state[key] = t.to(p.device).contiguous()
        master = saved.get("master")
        if master is not None:  # only optimizers with master_weights=True write one; others ignore it
            if not isinstance(master, torch.Tensor) or master.dtype != torch.float32 or master.shape != p.shape:
                raise ValueError(f"{where}: master must be a float32 tensor of shape {tuple(p.shape)}")
            if self._keeps_master(p):
                state["master"] = master.to(p.device).contiguous()
        kinds = {state[key].dtype for key in self._states}
        if len(kinds) > 1:
            raise ValueError(f"{where}: its states mix dtypes {sorted(str(k) for k in kinds)}")
        if state["state1"].dtype == torch.float32:
            for key in self._states:
                if self.nonfinite == "skip":
                    # under "skip" no NaN enters a state (under "propagate", bitsandbytes' states may hold NaN)
                    self._refuse_values(where, key, state[key], torch.isnan(state[key]), "NaN")
                if key in self._nonnegative_states:
                    self._refuse_values(where, key, state[key], state[key] < 0, "negative")
        else:
            blocks = -(-p.numel() // OPTIMIZER_BLOCK)
            for i, expected in enumerate(self._codes_on(p.device), 1):
                key = f"absmax{i}"
                t = saved.get(key)
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != blocks:
                    raise ValueError(f"{where}: {key} must be float32 with {blocks} entries (blocks of {OPTIMIZER_BLOCK})")
                state[key] = t.to(p.device).reshape(-1).contiguous()
                # A block's absmax is a maximum of absolute values (inf allowed: v overflows): no step writes
                # a NaN or a negative one, and one would turn the block's parameters to NaN unnoticed.
                self._refuse_values(where, key, state[key], torch.isnan(state[key]) | (state[key] < 0), "NaN or negative")
                t = saved.get(f"qmap{i}")
                if t is not None and not torch.equal(t.to(p.device), expected):
                    raise ValueError(f"{where}: qmap{i} is not the dynamic map these states were quantised with")
                state[f"qmap{i}"] = expected
        return state

    def _check_saved_groups(self, saved_groups: list) -> None:
        """The loaded groups list as many parameters as ours, and options the constructor would accept."""
        groups = self.param_groups
        if len(groups) != len(saved_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(groups)}")
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"parameter group {i} has {len(g['params'])} parameters but the loaded one has {len(sg['params'])}"
                )
            try:
                self._check_options({**self.defaults, **sg})
            except ValueError as e:
                raise ValueError(f"loaded parameter group {i}: {e}") from None

    @staticmethod
    def _refuse_values(where: str, key: str, t: torch.Tensor, bad: torch.Tensor, what: str) -> None:
        count = int(bad.sum())
        if count:
            first = int(bad.reshape(-1).nonzero()[0])
            raise ValueError(
                f"{where}: {key} has {count} {what} entries (the first at flat index {first}: "
                f"{t.reshape(-1)[first].item()}); no step of this optimizer writes such a value"
            )

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a pyquant or bitsandbytes state dict; every entry is checked before anything changes."""
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        self._check_saved_groups(saved_groups)
        id_map = dict(
            zip(chain.from_iterable(g["params"] for g in saved_groups), chain.from_iterable(g["params"] for g in groups))
        )
        new_state = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"loaded state dict has state for parameter index {key}, which no group lists")
            p = id_map[key]
            new_state[p] = self._checked_state(p, saved, key)
        new_groups = []
        for g, sg in zip(groups, saved_groups):
            ng = deepcopy({k: v for k, v in sg.items() if k != "params"})
            ng["params"] = g["params"]
            new_groups.append(ng)
        self.__setstate__({"state": new_state, "param_groups": new_groups})

