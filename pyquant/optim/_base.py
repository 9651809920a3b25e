"""What every 8-bit optimizer of pyquant shares: `Optimizer8bit`, the base of Adam8bit/AdamW8bit (adam.py), of
Lion8bit, SGD8bit, RMSprop8bit and Adagrad8bit (one_state.py), of the AdEMAMix classes (ademamix.py) and of the
LAMB and LARS classes (trust_ratio.py).

Per parameter: the choice of 8-bit or float32 states (`min_8bit_size`, bitsandbytes' rule, and `optim_bits`, from
a parameter group or from `pyquant.optim.override`, overrides.py, which may also set the hyperparameters), their
creation and checks; the step's loop over groups and devices, non-contiguous parameters, master weights, the
non-finite gradient policy and GradScaler's fused unscale; `state_dict()` in bitsandbytes 0.50.2's layout and keys,
and loading either library's state dict with every entry checked; `from_torch` / `to_torch`, the switch with the
float32 torch optimizer of the same algorithm. A subclass names its states (`_states`, with the signedness of each
one's dynamic map), checks its options (`_check_options`), runs its fused op over one group's tensors on one device
(`_fused_step`), names the keys an override may set (`_override_keys`) and its torch optimizer, if any
(`_torch_class`, `_torch_states`, `_group_from_torch`, `_group_to_torch`).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import defaultdict
from copy import deepcopy
from itertools import chain, repeat
from operator import attrgetter, is_, is_not, itemgetter

import torch

from pyquant import functional as F
from pyquant._contract import OPTIMIZER_BLOCK
from pyquant.distributed import (
    checked_sharded_state,
    is_sharded,
    local_tensor,
    quantize_moment,
    refuse_sharded,
    sharded_state_entry,
)
from pyquant.optim.overrides import ATTRIBUTE, PRECISION_KEYS, check_precision_options


# bitsandbytes 0.50.2 keeps these state entries inside one nested dict in state_dict(), so that FSDP's
# gathering skips them; loading unwraps it. Same key, same layout, in both directions.
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
QUANT_STATE_FIELDS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "unorm_vec")
NONFINITE_POLICIES = {"skip": 0, "propagate": 1}
_GRAD, _STEP = attrgetter("grad"), itemgetter("step")


class _StepPlan:
    """A group's PreparedStep and what it was built from (Optimizer8bit._plan). Each state tensor is kept as three
    flat columns (its state dict, its key, the tensor itself), so that the per-step check that every entry is
    still the same tensor runs as one C-level map over them instead of a Python loop per parameter."""

    __slots__ = ("group", "params", "states", "state_dicts", "state_keys", "state_tensors", "eight_bit",
                 "precisions", "row_of_precision", "prepared")

    def __init__(self, group, params, states, eight_bit, prepared):
        self.group, self.params, self.states = group, params, states
        entries = [(s, k, v) for s in states for k, v in s.items() if isinstance(v, torch.Tensor)]
        self.state_dicts = [s for s, _, _ in entries]
        self.state_keys = [k for _, k, _ in entries]
        self.state_tensors = [v for _, _, v in entries]
        self.eight_bit, self.prepared = eight_bit, prepared
        # The constants rows when every tensor is at the same step: one per precision (8-bit or float32 states),
        # in order of first appearance, and each tensor's row (None: one row for all).
        self.precisions = list(dict.fromkeys(eight_bit))
        self.row_of_precision = [self.precisions.index(b) for b in eight_bit] if len(self.precisions) > 1 else None


class Optimizer8bit(torch.optim.Optimizer):
    """The shared part of pyquant's 8-bit optimizers (see the module docstring); not used directly.

    Keyword arguments every subclass takes (its docstring lists its own):
        min_8bit_size: tensors with fewer elements keep float32 states (default 4096, as bitsandbytes). A
            parameter group may hold its own `min_8bit_size` and `optim_bits` (8 or 32; 32: float32 states);
            `pyquant.optim.override(param, ...)` sets them, and the hyperparameters, for one tensor.
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
    # The group keys the update reads, which pyquant.optim.override may set per parameter (besides the precision).
    _override_keys: tuple[str, ...] = ("lr", "betas", "eps", "weight_decay")
    # The float32 torch optimizer of the same algorithm (from_torch, to_torch), or None, and its state names in
    # the order of `_states`. `_torch_step`: whether its state counts steps (torch.optim.SGD's does not).
    _torch_class: type | None = None
    _torch_states: tuple[str, ...] = ()
    _sharded_names: tuple[str, ...] = ()  # the moments' names under FSDP2 where torch has no such optimizer
    _whole_tensor_states: tuple[str, ...] = ()  # per-parameter values of the whole tensor, kept as they are by FSDP2
    _torch_step = True
    _to_torch_class: type | None = None  # to_torch's class, where it is not _torch_class
    # Group keys of the subclass that bitsandbytes' groups lack (LAMB's max_unorm, ...): a loaded group without one
    # keeps this optimizer's value, as it keeps its precision keys.
    _own_group_keys: tuple[str, ...] = ()

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

    def _operands(self, items, device):
        """The op's state operands (each state in `_states` order, then their block scales; an empty tensor where a
        tensor has float32 states) and codes for `items` on `device`."""
        empty = torch.empty(0, dtype=torch.float32, device=device)
        states = [[s[k] for _, s in items] for k in self._states]
        absmax = [[s.get(f"absmax{i}", empty) for _, s in items] for i in range(1, len(self._states) + 1)]
        return (*states, *absmax), self._codes_on(device)

    def _moment_slots(self) -> list[tuple[str, str, int | None]]:
        """How the states of a sharded (FSDP2) parameter appear in state_dict() (pyquant/distributed.py): per
        moment, its float32 name there (torch's, where torch has the optimizer), the state holding it, and its
        index where that state stacks several moments (AdEMAMix's state1), else None."""
        return [(name, key, None) for name, key in zip(self._sharded_names or self._torch_states, self._states)]

    def _prepare_step(self, group: dict, items: list, grads: list):
        """The subclass's op over one group's CPU tensors as a PreparedStep (functional.prepare_*_step), or None
        where it has none (the group then always takes the general path)."""
        return None

    def _constants_row(self, group: dict, step: int, eight_bit: bool, inv_grad_scale: float) -> list[float]:
        """The subclass's constants row (pyquant._contract) for a tensor of `group` at `step`."""
        raise NotImplementedError

    def _constants(self, group: dict, items: list, inv_grad_scale: float) -> torch.Tensor:
        """The constants rows of `items` (parameter, state) at their current steps, one float32 row per tensor."""
        rows: dict[tuple[int, bool], list[float]] = {}  # a group's tensors mostly share their step
        keys = [(s["step"], s["state1"].dtype == torch.uint8) for _, s in items]
        for key in keys:
            if key not in rows:
                rows[key] = self._constants_row(group, *key, inv_grad_scale)
        return torch.tensor([rows[key] for key in keys], dtype=torch.float32)

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
            group = {**self.defaults, **param_group}
            self._check_options(group)
            check_precision_options(group, type(self).__name__)
            seen = set()
            for i, p in enumerate(x[1] if isinstance(x, tuple) else x for x in params):  # (name, tensor) too
                if id(p) in seen:
                    raise ValueError(
                        f"{type(self).__name__}: parameter {i} of the group is listed twice; list each parameter once"
                    )
                seen.add(id(p))
                if isinstance(p, torch.Tensor):  # an override set before the optimizer: refused now, not at step 1
                    self._options(p, group, f"parameter {i} of the added group")
        super().add_param_group(param_group)  # refuses a parameter in two groups, a set, a non-leaf tensor

    # ---- pickling, copy.deepcopy, torch.save(optimizer) ----
    def __getstate__(self) -> dict:
        options = {k: getattr(self, k) for k in ("min_8bit_size", "master_weights", "nonfinite")}
        return dict(super().__getstate__(), **options)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also what load_state_dict calls, with the state and groups only
        if "_codes" not in self.__dict__:  # unpickled or copied: the per-run attributes start afresh
            self._reset_run_attributes()
        self._plans = {}  # loaded states and groups are new objects

    def _reset_run_attributes(self) -> None:
        self.nonfinite_count: torch.Tensor | int = 0
        self._warned_nonfinite = False
        self._codes: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._plans: dict[int, _StepPlan] = {}  # id(group) -> the group's plan (see _planned_step)

    # ---- state ----
    def _codes_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The dynamic map of each state (`_signed`), on `device`."""
        if device not in self._codes:
            self._codes[device] = tuple(F.create_dynamic_map(signed=sign).to(device) for sign in self._signed)
        return self._codes[device]

    def _options(self, p: torch.Tensor, group: dict, where: str | None = None) -> dict:
        """p's options: `group`, with p's override (pyquant.optim.override) on top, checked (it may have been set
        after the optimizer was created). The group itself when p has none."""
        override = getattr(p, ATTRIBUTE, None)
        if not override:
            return group
        name = type(self).__name__
        where = where or f"parameter {self._index_of(p)}"
        for key in override:
            if key not in PRECISION_KEYS and key not in self._override_keys:
                raise ValueError(
                    f"{name}: {where} has an override of {key!r}, an option {name} does not have; it takes "
                    f"{', '.join(PRECISION_KEYS + self._override_keys)}"
                )
        options = {**group, **override}
        try:
            self._check_options(options)
        except ValueError as e:
            raise ValueError(f"override of {where}: {e}") from None
        return options

    def _group_of(self, p: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _uses_8bit(self, p: torch.Tensor, options: dict | None = None) -> bool:
        """bitsandbytes' rule: optim_bits 8 and at least min_8bit_size elements (the override's, the group's,
        else the optimizer's); `options` are p's (`_options`), found when not given."""
        options = self._options(p, self._group_of(p)) if options is None else options
        if options.get("optim_bits", 8) == 32:
            return False
        return p.numel() >= options.get("min_8bit_size", self.min_8bit_size)

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

    def _init_state(self, p: torch.Tensor, options: dict | None = None) -> dict:
        state = self.state[p]
        state["step"] = 0
        shard = local_tensor(p)  # under FSDP2 the states are this rank's shard's (pyquant/distributed.py)
        if self._keeps_master(p):
            state["master"] = shard.detach().float().contiguous()
        eight_bit = self._uses_8bit(p, options)  # on the whole parameter: the same on every rank and world size
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
            raise NotImplementedError(f"{name} does not support FSDP2 (DTensor) parameters yet; the 8-bit optimizers do")
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
            count = self._planned_step(group, inv_grad_scale, policy)
            if count is not None:
                counts.append(count)
                continue
            # One op call per device and options: a tensor with an override gets a call of its own, with its
            # options as the group (the op's constants are per tensor anyway; overrides are few).
            calls: dict[tuple, tuple[dict, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_param(p)
                options = self._options(p, group)
                state = self._check_state(p) if len(self.state[p]) else self._init_state(p, options)
                if options.get("optim_bits") == 32 and state["state1"].dtype == torch.uint8:
                    raise ValueError(
                        f"{type(self).__name__}: parameter {self._index_of(p)} has optim_bits=32 but already has "
                        "8-bit states (made before the override, or loaded); set it before the first step"
                    )
                if self._keeps_master(p) and "master" not in state:  # e.g. loaded from a checkpoint without one
                    state["master"] = local_tensor(p).detach().float().contiguous()
                state["step"] += 1
                calls.setdefault((p.device, id(options)), (options, []))[1].append((p, state))
            for options, items in calls.values():
                # The kernel walks memory linearly: a parameter that is not contiguous (a view into a larger
                # tensor, channels_last) is stepped in a contiguous copy, copied back below into its own
                # storage and layout, as torch's optimizers update it in place. FSDP2: this rank's shards.
                targets = [local_tensor(p) for p, _ in items]
                stepped = [s["master"] if "master" in s else t.contiguous() for t, (_, s) in zip(targets, items)]
                grads = [local_tensor(p.grad).contiguous() for p, _ in items]
                counts.append(self._fused_step(options, items, stepped, grads, inv_grad_scale, policy))
                # The parameters the model computes with: master copies rounded once, and the copies above.
                back = [(t, x) for t, x in zip(targets, stepped) if x is not t]
                if back:
                    torch._foreach_copy_([t for t, _ in back], [x for _, x in back])
            self._plan(group, calls)
        # Counts are ints (a group's plan), 0-dim tensors on the CPU (read here) or on a GPU (summed, not synced).
        self.nonfinite_count = sum(
            c if isinstance(c, int) else int(c) if c.device.type == "cpu" else c for c in counts
        ) if counts else 0
        if isinstance(self.nonfinite_count, int) and self.nonfinite_count and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: {self.nonfinite_count} non-finite gradient elements were skipped "
                "(nonfinite='skip'); this warning is shown once",
                RuntimeWarning,
                stacklevel=2,
            )
        return loss

    # ---- the step's fast path: a plan per group, kept while the group stays the same ----
    # The general path above checks every parameter and state and describes every tensor to the C library: 12-19 us
    # a tensor in Python (4.4-7 ms a step over DenseNet-121's 364 tensors, as long as the 8-bit step itself on an
    # AVX-512 CPU; bench/NOTES.md). After a general step over a group whose tensors the C++ library steps in place
    # (CPU tensors, contiguous, no master weights, not sharded, no overrides), the group keeps a plan: a
    # PreparedStep over the tensors that had gradients, and the state dicts and state tensors it was built from.
    # The next steps run through it while the same parameters have gradients and their states are the same
    # tensors; anything else (a gradient appearing or vanishing, a loaded state dict, a replaced state tensor, an
    # override set, another backend, a parameter's storage changed, a gradient that does not fit) goes back to the
    # general path, which rebuilds the plan or raises.
    def _plan(self, group: dict, calls: dict) -> None:
        self._plans.pop(id(group), None)
        if len(calls) != 1:
            return
        ((options, items),) = calls.values()
        if options is not group:  # a parameter with an override: its options are read every step
            return
        params = [p for p, _ in items]
        if not F.runs_prepared_steps(params[0]) or any(
            is_sharded(p) or "master" in s or not p.is_contiguous() for p, s in items
        ):
            return
        grads = [p.grad for p in params]
        if not all(g.is_contiguous() for g in grads):
            return
        states = [s for _, s in items]
        eight_bit = [s["state1"].dtype == torch.uint8 for s in states]
        prepared = self._prepare_step(group, items, grads)
        if prepared is None:
            return
        self._plans[id(group)] = _StepPlan(group, params, states, eight_bit, prepared)

    def _planned_step(self, group: dict, inv_grad_scale: float, policy: int):
        """Step `group` through its plan; the skipped count, or None when the general path must run."""
        plan = self._plans.get(id(group))
        if plan is None or plan.group is not group:
            return None
        # Per parameter only C-level maps run here (no Python loop): over DenseNet-121's 364 tensors the loop
        # this replaces cost about 0.4 ms a step, with the caches cold from the kernel before (bench/NOTES.md).
        params = group["params"]
        grads = list(map(_GRAD, params))
        if not all(map(is_not, grads, repeat(None))):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if len(params) != len(plan.params) or not F.runs_prepared_steps(params[0]):
            return None
        if group.get("optim_bits") == 32 and any(plan.eight_bit):  # the general path says what is wrong
            return None
        # A parameter's storage, size or dtype changed is the PreparedStep's to see (its load returns False).
        if not (all(map(is_, params, plan.params))
                and all(map(is_, map(self.state.get, params), plan.states))
                and not any(map(getattr, params, repeat(ATTRIBUTE), repeat(None)))
                and all(map(is_, map(dict.get, plan.state_dicts, plan.state_keys), plan.state_tensors))):
            return None
        count = self._run_plan(plan, group, params, grads, inv_grad_scale, policy)
        if count is not None:
            for s in plan.states:
                s["step"] += 1
        return count

    def _run_plan(self, plan: _StepPlan, group: dict, params: list, grads: list, inv_grad_scale: float, policy: int):
        """One step through `plan`'s PreparedStep (the tensors checked by _planned_step); the skipped count, or
        None when a tensor no longer fits it."""
        return plan.prepared(params, grads, *self._plan_rows(plan, group, inv_grad_scale), policy)

    def _plan_rows(self, plan: _StepPlan, group: dict, inv_grad_scale: float) -> tuple[list, list | None]:
        """This step's constants for `plan`'s tensors: each distinct row once (by step and precision), and each
        tensor's row (None: all the first)."""
        steps = list(map(_STEP, plan.states))
        step = steps[0]
        if type(step) is int and steps.count(step) == len(steps):  # the usual case, without a loop per tensor
            rows = [self._constants_row(group, step + 1, eight_bit, inv_grad_scale) for eight_bit in plan.precisions]
            return rows, plan.row_of_precision
        rows, row_of, index = [], [], {}
        for s, eight_bit in zip(plan.states, plan.eight_bit):
            key = (s["step"] + 1, eight_bit)
            i = index.get(key)
            if i is None:
                i = index[key] = len(rows)
                rows.append(self._constants_row(group, key[0], eight_bit, inv_grad_scale))
            row_of.append(i)
        return rows, row_of if len(rows) > 1 else None

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
                wrapped[key] = sharded_state_entry(self, params[key], param_state)
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
                check_precision_options(sg, type(self).__name__)
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

    # ---- switching with the float32 torch optimizer (`_torch_class`): from_torch, to_torch ----
    def _group_from_torch(self, torch_group: dict) -> dict:
        """This class's hyperparameters for a torch group; ValueError for what it cannot represent."""
        raise NotImplementedError

    def _group_to_torch(self, group: dict) -> dict:
        """The torch class's hyperparameters for one of our groups."""
        raise NotImplementedError

    def _refuse_without_torch_class(self, what: str) -> None:
        refuse_sharded(self, f"{what} (and from_torch/to_torch)")
        if self._torch_class is None:
            raise TypeError(f"{type(self).__name__} has no float32 torch optimizer to convert with: torch has none")

    def load_torch_state_dict(self, torch_state_dict: dict) -> None:
        """Load the state of the torch optimizer `_torch_class` (e.g. torch.optim.SGD's momentum_buffer) over the
        same parameters: its groups' hyperparameters, and its states quantised as this optimizer keeps them."""
        self._refuse_without_torch_class("load_torch_state_dict")
        torch_keys = set(_torch_option_defaults(self._torch_class))
        converted = {"param_groups": [], "state": {}}
        for sg in torch_state_dict["param_groups"]:
            if sg.get("maximize"):
                raise ValueError(f"cannot convert a maximize=True optimizer: {type(self).__name__} minimises")
            group = dict(self._group_from_torch(sg), params=sg["params"])
            # Keys torch does not know (a scheduler's initial_lr, a user's name) are carried over.
            group.update({k: v for k, v in sg.items() if k not in group and k not in torch_keys})
            converted["param_groups"].append(group)
        self._check_saved_groups(converted["param_groups"])  # before indexing our parameters with its ids
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        saved_ids = list(chain.from_iterable(g["params"] for g in torch_state_dict["param_groups"]))
        group_of = {i: {**self.defaults, **g} for g in converted["param_groups"] for i in g["params"]}
        for key, s in torch_state_dict["state"].items():
            if key not in saved_ids:
                raise ValueError(f"loaded torch state dict has state for parameter index {key}, which no group lists")
            p = params[saved_ids.index(key)]
            for name in self._torch_states:
                t = s.get(name)
                if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                    raise ValueError(
                        f"torch state of parameter {key}: {name} has shape {tuple(getattr(t, 'shape', ()))} but the "
                        f"parameter has shape {tuple(p.shape)}; was it saved for another model?"
                    )
            # torch.optim.SGD counts no steps: a momentum buffer exists from its first step on, and our step
            # count only tells the first step (which copies the gradient into it) from the others.
            state = {"step": int(float(s["step"])) if self._torch_step else 1}
            eight_bit = self._uses_8bit(p, self._options(p, group_of[key]))
            state.update(self._states_from_float(p, [s[name].float().to(p.device) for name in self._torch_states],
                                                 eight_bit))
            converted["state"][key] = state
        self.load_state_dict(converted)

    def torch_state_dict(self) -> dict:
        """This optimizer's state in its torch optimizer's format (the one to_torch makes; states dequantised to
        float32, step counts as tensors where torch keeps them)."""
        self._refuse_without_torch_class("torch_state_dict")
        sd = torch.optim.Optimizer.state_dict(self)  # unwrapped: the plain entries
        out = {"param_groups": [], "state": {}}
        # torch's execution flags (foreach, fused, ...) are not kept here: its constructor's defaults.
        flags = _torch_option_defaults(self._to_torch_class or self._torch_class)
        for group in sd["param_groups"]:
            # Our hyperparameters in torch's names; other keys (params, precision, a scheduler's) as they are.
            rest = {k: v for k, v in group.items() if k not in self.defaults}
            out["param_groups"].append({**flags, **rest, **self._group_to_torch(group)})
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for key, s in sd["state"].items():
            entry = {"step": torch.tensor(float(s["step"]))} if self._torch_step else {}
            entry.update(zip(self._torch_states, self._states_to_float(params[key], s)))
            out["state"][key] = entry
        return out

    def _states_from_float(self, p: torch.Tensor, values: list, quantized: bool) -> dict:
        """The state entries (`_states` and their scales) holding float32 `values` (one per state, p's shape), as
        this optimizer keeps them: quantised when `quantized`, else float32 copies."""
        out = {}
        for i, (ours, x, code) in enumerate(zip(self._states, values, self._codes_on(p.device)), 1):
            if quantized:
                out[ours], out[f"absmax{i}"] = F.quantize_blockwise(x, code, OPTIMIZER_BLOCK)
            else:
                out[ours] = x.clone()
        return out

    def _states_to_float(self, p: torch.Tensor, s: dict) -> list:
        """The float32 values of p's states `s` (one tensor per `_states`, p's shape)."""
        out = []
        for i, ours in enumerate(self._states, 1):
            if s[ours].dtype == torch.uint8:
                out.append(F.dequantize_blockwise(s[ours], s[f"absmax{i}"], s[f"qmap{i}"], OPTIMIZER_BLOCK))
            else:
                out.append(s[ours].clone())
        return out

    # ---- one quantised moment of an FSDP2 shard, as DCP sees it (pyquant/distributed.py) ----
    def _dequantized_moment(self, shard: torch.Tensor, number: int, values, absmax, state: dict) -> torch.Tensor:
        """The float32 values (shard's shape) of state `number` (1, 2, ...) of `shard`, stored as `values`/`absmax`."""
        return F.dequantize_blockwise(values, absmax, state[f"qmap{number}"], OPTIMIZER_BLOCK)

    def _quantized_moment(self, x: torch.Tensor, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, absmax) storing the float32 moment `x` (a shard's) as state `number`; a dequantised state
        comes back bit for bit in value (distributed.quantize_moment)."""
        return quantize_moment(x, self._codes_on(x.device)[number - 1])

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
            for key in PRECISION_KEYS + self._own_group_keys:  # not in bitsandbytes' groups: ours stay
                if key in g and key not in ng:
                    ng[key] = g[key]
            new_groups.append(ng)
        self.__setstate__({"state": new_state, "param_groups": new_groups})


def _torch_option_defaults(torch_class: type) -> dict:
    """The group keys of a torch optimizer, its constructor's arguments, with their defaults."""
    parameters = inspect.signature(torch_class.__init__).parameters
    return {k: p.default for k, p in parameters.items() if k not in ("self", "params")}


def _pyquant_class_for(torch_optimizer: torch.optim.Optimizer) -> type:
    """The Optimizer8bit subclass whose `_torch_class` is the optimizer's class (or its nearest base)."""
    classes = {}
    todo = list(Optimizer8bit.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__dict__.get("_torch_class") is not None:
            classes[cls._torch_class] = cls
    for base in type(torch_optimizer).__mro__:
        if base in classes:
            return classes[base]
    names = ", ".join(sorted(c.__name__ for c in classes))
    raise TypeError(f"from_torch converts torch.optim {names}; got {type(torch_optimizer).__name__}")


def from_torch(optimizer: torch.optim.Optimizer, *, into: type | None = None, **kwargs) -> Optimizer8bit:
    """A pyquant 8-bit optimizer over the same parameters, continuing from a float32 torch optimizer's state:
    Adam -> Adam8bit, AdamW -> AdamW8bit, SGD -> SGD8bit, RMSprop -> RMSprop8bit, Adagrad -> Adagrad8bit.
    `into` picks another pyquant class of the same algorithm (pyquant.Adam4bit / AdamW4bit for Adam / AdamW).
    `kwargs` are the 8-bit class's own (min_8bit_size, master_weights, nonfinite). Options the 8-bit class
    cannot represent (SGD's nesterov, RMSprop's centered, ...) are refused with its error."""
    cls = _pyquant_class_for(optimizer)
    if into is not None:
        if not (isinstance(into, type) and issubclass(into, Optimizer8bit) and into._torch_class is not None
                and isinstance(optimizer, into._torch_class)):
            raise TypeError(f"from_torch: cannot convert {type(optimizer).__name__} into "
                            f"{getattr(into, '__name__', into)!r}, a pyquant optimizer of another algorithm")
        cls = into
    arguments = set(inspect.signature(cls.__init__).parameters)
    # The torch defaults the 8-bit constructor shares by name (lr, momentum, nesterov, alpha, centered, ...): its
    # checks refuse what it cannot represent. Each group's own values come with the state (load_torch_state_dict).
    defaults = {k: v for k, v in optimizer.defaults.items() if k in arguments and k != "params"}
    new = cls([{"params": g["params"]} for g in optimizer.param_groups], **defaults, **kwargs)
    new.load_torch_state_dict(optimizer.state_dict())
    return new


def to_torch(optimizer: Optimizer8bit) -> torch.optim.Optimizer:
    """The float32 torch optimizer over the same parameters, continuing from this optimizer's dequantised state:
    SGD8bit -> torch.optim.SGD, RMSprop8bit -> RMSprop, Adagrad8bit -> Adagrad, Adam8bit and AdamW8bit -> AdamW
    (pyquant's weight decay is decoupled; with weight_decay=0 that is Adam). Lion8bit has none (TypeError)."""
    sd = optimizer.torch_state_dict()
    groups = [dict(g, params=pg["params"]) for g, pg in zip(sd["param_groups"], optimizer.param_groups)]
    new = (optimizer._to_torch_class or optimizer._torch_class)(groups)
    new.load_state_dict(sd)
    return new
