"""Adam and AdamW with block-wise 8-bit states: drop-ins for torch.optim.Adam/AdamW and bitsandbytes' 8-bit ones.

The step is one fused pass per block of 256 elements (dequantise m and v, update them and the parameter,
requantise), and one library call per parameter group and device updates every tensor of the group.
Numerics, state layout and `state_dict()` are those of bitsandbytes 0.50.2 (docs/numerics.md), so a
checkpoint moves between the two libraries in either direction and training continues with the same bits.

Differences from torch.optim.Adam, on purpose:
- `weight_decay` is decoupled (p *= 1 - lr * wd before the update), as in bitsandbytes' Adam8bit; for
  Adam8bit and AdamW8bit alike.
- tensors with fewer than `min_8bit_size` elements keep float32 states (bitsandbytes' rule).
- non-finite gradient elements: see `nonfinite` below.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from copy import deepcopy
from itertools import chain

import torch

from pyquant import functional as F
from pyquant._contract import OPTIMIZER_BLOCK, adam_constants
from pyquant.distributed import (
    checked_sharded_state,
    is_sharded,
    local_tensor,
    refuse_sharded,
    sharded_state_entry,
)

__all__ = ["Adam8bit", "AdamW8bit", "from_torch", "to_torch"]

# bitsandbytes 0.50.2 keeps these state entries inside one nested dict in state_dict(), so that FSDP's
# gathering skips them; loading unwraps it. Same key, same layout, in both directions.
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
QUANT_STATE_FIELDS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2")
NONFINITE_POLICIES = {"skip": 0, "propagate": 1}


class Adam8bit(torch.optim.Optimizer):
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
    _step_supports_amp_scaling = True

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
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {sorted(NONFINITE_POLICIES)}, got {nonfinite!r}")
        # alpha, t_alpha and t_beta3 are bitsandbytes' AdEMAMix fields; kept so that param_groups match its layout.
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, alpha=0.0, t_alpha=None, t_beta3=None
        )
        self._check_options(dict(defaults, amsgrad=amsgrad))
        # Set before the groups are added, and kept by pickling (__getstate__), as torch keeps `defaults`.
        self.min_8bit_size = int(min_8bit_size)
        self.master_weights = bool(master_weights)
        self.nonfinite = nonfinite
        super().__init__(params, defaults)
        self._reset_run_attributes()

    # ---- options: checked for the constructor's defaults, every added group and every loaded group ----
    def _check_options(self, group: dict) -> None:
        name = type(self).__name__
        lr, eps, betas, weight_decay = group["lr"], group["eps"], group["betas"], group["weight_decay"]
        if not 0.0 <= float(lr) < math.inf:
            raise ValueError(f"{name}: invalid learning rate {lr}: need a finite value >= 0")
        if not 0.0 <= float(eps) < math.inf:
            raise ValueError(f"{name}: invalid epsilon value {eps}: need a finite value >= 0")
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"{name}: invalid betas {betas}: need two values in [0, 1)")
        if not 0.0 <= float(weight_decay) < math.inf:
            raise ValueError(f"{name}: invalid weight_decay value {weight_decay}: need a finite value >= 0")
        if group.get("amsgrad"):
            raise ValueError(f"{name} does not support amsgrad=True; use torch.optim.Adam for AMSGrad")

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
        self._codes: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- state ----
    def _codes_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._codes:
            self._codes[device] = (
                F.create_dynamic_map(signed=True).to(device),
                F.create_dynamic_map(signed=False).to(device),
            )
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
        for key in ("state1", "state2", "master"):
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
        if self._uses_8bit(p):  # decided on the whole parameter: the same on every rank and world size
            code1, code2 = self._codes_on(p.device)
            blocks = -(-shard.numel() // OPTIMIZER_BLOCK)
            state["state1"] = torch.zeros_like(shard, dtype=torch.uint8, memory_format=torch.contiguous_format)
            state["state2"] = torch.zeros_like(shard, dtype=torch.uint8, memory_format=torch.contiguous_format)
            state["qmap1"], state["qmap2"] = code1, code2
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            state["state1"] = torch.zeros_like(shard, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["state2"] = torch.zeros_like(shard, dtype=torch.float32, memory_format=torch.contiguous_format)
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
    @staticmethod
    def _check_param(p: torch.Tensor) -> None:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError("Adam8bit does not support sparse gradients; use torch.optim.SparseAdam")
        if p.is_complex() or g.is_complex():
            raise RuntimeError("Adam8bit does not support complex parameters; view them as real with torch.view_as_real")
        if p.dtype not in F.FLOAT_DTYPES or g.dtype not in F.FLOAT_DTYPES:
            raise TypeError(
                f"Adam8bit needs float32, float16 or bfloat16 parameters and gradients, got {p.dtype} / {g.dtype}"
            )
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
                code1, code2 = self._codes_on(device)
                empty = torch.empty(0, dtype=torch.float32, device=device)
                rows: dict[tuple[int, bool], list[float]] = {}  # a group's tensors mostly share their step
                for _, s in items:
                    key = (s["step"], s["state1"].dtype == torch.uint8)
                    if key not in rows:
                        rows[key] = adam_constants(group, *key, inv_grad_scale)
                constants = torch.tensor(
                    [rows[(s["step"], s["state1"].dtype == torch.uint8)] for _, s in items], dtype=torch.float32
                )
                # The kernel walks memory linearly: a parameter that is not contiguous (a view into a larger
                # tensor, channels_last) is stepped in a contiguous copy, copied back below into its own
                # storage and layout, as torch's Adam updates it in place. FSDP2: this rank's shards.
                targets = [local_tensor(p) for p, _ in items]
                stepped = [s["master"] if "master" in s else t.contiguous() for t, (_, s) in zip(targets, items)]
                counts.append(
                    F.adam_step_multi_tensor(
                        stepped,
                        [local_tensor(p.grad).contiguous() for p, _ in items],
                        [s["state1"] for _, s in items],
                        [s["state2"] for _, s in items],
                        [s.get("absmax1", empty) for _, s in items],
                        [s.get("absmax2", empty) for _, s in items],
                        constants,
                        code1,
                        code2,
                        policy,
                    )
                )
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
            return checked_sharded_state(self, p, saved, where)
        step = saved.get("step")
        if isinstance(step, torch.Tensor):
            step = step.item()
        if step is None or float(step) != int(step) or int(step) < 0:
            raise ValueError(f"{where}: 'step' must be a non-negative integer, got {saved.get('step')!r}")
        state = {"step": int(step)}
        for key in ("state1", "state2"):
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
        if state["state1"].dtype != state["state2"].dtype:
            raise ValueError(f"{where}: state1 is {state['state1'].dtype} but state2 is {state['state2'].dtype}")
        if state["state1"].dtype == torch.float32 and self.nonfinite == "skip":
            # under "skip" no NaN enters a moment (under "propagate", bitsandbytes' states may hold NaN)
            for key in ("state1", "state2"):
                self._refuse_values(where, key, state[key], torch.isnan(state[key]), "NaN")
        if state["state1"].dtype == torch.float32:
            self._refuse_values(where, "state2", state["state2"], state["state2"] < 0, "negative")
        if state["state1"].dtype == torch.uint8:
            blocks = -(-p.numel() // OPTIMIZER_BLOCK)
            for key in ("absmax1", "absmax2"):
                t = saved.get(key)
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != blocks:
                    raise ValueError(f"{where}: {key} must be float32 with {blocks} entries (blocks of {OPTIMIZER_BLOCK})")
                state[key] = t.to(p.device).reshape(-1).contiguous()
                # A block's absmax is a maximum of absolute values (inf allowed: v overflows): no step writes
                # a NaN or a negative one, and one would turn the block's parameters to NaN unnoticed.
                self._refuse_values(where, key, state[key], torch.isnan(state[key]) | (state[key] < 0), "NaN or negative")
            code1, code2 = self._codes_on(p.device)
            for key, expected in (("qmap1", code1), ("qmap2", code2)):
                t = saved.get(key)
                if t is not None and not torch.equal(t.to(p.device), expected):
                    raise ValueError(f"{where}: {key} is not the dynamic map these states were quantised with")
            state["qmap1"], state["qmap2"] = code1, code2
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

    # ---- switching with torch.optim.Adam / AdamW ----
    def load_torch_state_dict(self, torch_state_dict: dict) -> None:
        """Load the state of a torch.optim.Adam/AdamW (exp_avg, exp_avg_sq) over the same parameters."""
        refuse_sharded(self, "load_torch_state_dict (and from_torch)")
        converted = {"param_groups": [], "state": {}}
        for sg in torch_state_dict["param_groups"]:
            if sg.get("amsgrad"):
                raise ValueError("cannot convert an AMSGrad state: Adam8bit has no max_exp_avg_sq")
            if sg.get("maximize"):
                raise ValueError("cannot convert a maximize=True optimizer: Adam8bit minimises")
            group = {k: sg[k] for k in ("lr", "betas", "eps", "weight_decay", "params")}
            group.update(alpha=0.0, t_alpha=None, t_beta3=None)
            if sg["weight_decay"] > 0 and not sg.get("decoupled_weight_decay", False):
                warnings.warn(
                    "torch.optim.Adam applies weight_decay as an L2 term on the gradient; pyquant decouples it "
                    "(like AdamW), so training continues with decoupled weight decay",
                    RuntimeWarning,
                    stacklevel=2,
                )
            group.update({k: v for k, v in sg.items() if k not in group and k not in _TORCH_ONLY_KEYS})
            converted["param_groups"].append(group)
        self._check_saved_groups(torch_state_dict["param_groups"])  # before indexing our parameters with its ids
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        saved_ids = list(chain.from_iterable(g["params"] for g in torch_state_dict["param_groups"]))
        for key, s in torch_state_dict["state"].items():
            if key not in saved_ids:
                raise ValueError(f"loaded torch state dict has state for parameter index {key}, which no group lists")
            p = params[saved_ids.index(key)]
            for name in ("exp_avg", "exp_avg_sq"):
                t = s.get(name)
                if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                    raise ValueError(
                        f"torch state of parameter {key}: {name} has shape {tuple(getattr(t, 'shape', ()))} but the "
                        f"parameter has shape {tuple(p.shape)}; was it saved for another model?"
                    )
            state = {"step": int(float(s["step"]))}
            m, v = s["exp_avg"].float().to(p.device), s["exp_avg_sq"].float().to(p.device)
            if self._uses_8bit(p):
                code1, code2 = self._codes_on(p.device)
                state["state1"], state["absmax1"] = F.quantize_blockwise(m, code1, OPTIMIZER_BLOCK)
                state["state2"], state["absmax2"] = F.quantize_blockwise(v, code2, OPTIMIZER_BLOCK)
            else:
                state["state1"], state["state2"] = m.clone(), v.clone()
            converted["state"][key] = state
        self.load_state_dict(converted)

    def torch_state_dict(self) -> dict:
        """This optimizer's state in torch.optim.Adam/AdamW's format (moments dequantised to float32)."""
        refuse_sharded(self, "torch_state_dict (and to_torch)")
        sd = super().state_dict()
        out = {"param_groups": [], "state": {}}
        for group in sd["param_groups"]:
            torch_group = {k: v for k, v in group.items() if k not in ("alpha", "t_alpha", "t_beta3")}
            out["param_groups"].append(dict(torch_group, decoupled_weight_decay=True))
        for key, s in sd["state"].items():
            if s["state1"].dtype == torch.uint8:
                m = F.dequantize_blockwise(s["state1"], s["absmax1"], s["qmap1"], OPTIMIZER_BLOCK)
                v = F.dequantize_blockwise(s["state2"], s["absmax2"], s["qmap2"], OPTIMIZER_BLOCK)
            else:
                m, v = s["state1"].clone(), s["state2"].clone()
            out["state"][key] = {"step": torch.tensor(float(s["step"])), "exp_avg": m, "exp_avg_sq": v}
        return out


_TORCH_ONLY_KEYS = {"amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"}


class AdamW8bit(Adam8bit):
    """AdamW with 8-bit states: Adam8bit with decoupled weight decay defaulting to 0.01 (as torch and bitsandbytes)."""

    _default_weight_decay = 1e-2


def from_torch(optimizer: torch.optim.Adam, **kwargs) -> Adam8bit:
    """An Adam8bit (AdamW8bit for torch.optim.AdamW) over the same parameters, continuing from its state."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"from_torch converts torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    cls = AdamW8bit if isinstance(optimizer, torch.optim.AdamW) else Adam8bit
    groups = [{k: v for k, v in g.items() if k not in _TORCH_ONLY_KEYS} for g in optimizer.param_groups]
    new = cls(groups, **kwargs)
    new.load_torch_state_dict(optimizer.state_dict())
    return new


def to_torch(optimizer: Adam8bit) -> torch.optim.Adam:
    """A torch.optim.AdamW over the same parameters, continuing from this optimizer's (dequantised) state.

    AdamW, because pyquant's weight decay is decoupled; with weight_decay=0 it is plain Adam.
    """
    groups = [
        {k: v for k, v in g.items() if k not in ("alpha", "t_alpha", "t_beta3")} for g in optimizer.param_groups
    ]
    new = torch.optim.AdamW(groups)
    new.load_state_dict(optimizer.torch_state_dict())
    return new
