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

import warnings
from itertools import chain

import torch

from pyquant import functional as F
from pyquant._contract import OPTIMIZER_BLOCK, adam_constants
from pyquant.distributed import refuse_sharded
from pyquant.optim._base import Optimizer8bit

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


    def _fused_step(self, group, items, stepped, grads, inv_grad_scale, policy):
        device = stepped[0].device
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
        return F.adam_step_multi_tensor(
            stepped,
            grads,
            [s["state1"] for _, s in items],
            [s["state2"] for _, s in items],
            [s.get("absmax1", empty) for _, s in items],
            [s.get("absmax2", empty) for _, s in items],
            constants,
            code1,
            code2,
            policy,
        )

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
        sd = torch.optim.Optimizer.state_dict(self)  # unwrapped: the plain entries
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
