"""LAMB and LARS with 8-bit or float32 states and real layer-wise trust ratios: drop-ins for bitsandbytes 0.50.2's
LAMB, LAMB8bit, LAMB32bit, LARS, LARS8bit and LARS32bit (same signatures and defaults, same `state_dict()` layout),
which in bitsandbytes' 8-bit classes are AdamW8bit and SGD8bit under other names (its block-wise kernels never apply
a trust ratio).

Per tensor ("layer") and step, with r the tensor's direction:
    LAMB (You et al. 2020, Algorithm 2):  r = m_hat / (sqrt(v_hat) + eps) + wd * p;    p -= lr * ratio * r
    LARS (You et al. 2017, with momentum): d = g + wd * p;  m = momentum * m + ratio * d;  p -= lr * m
    ratio = max_unorm * ||p|| / ||r||  (LARS: ||d||),  1 when max_unorm == 0 or either norm is 0
`max_unorm` keeps bitsandbytes' meaning, the norm of the update relative to the parameter's norm: with the published
ratio the update's norm is exactly max_unorm * ||p|| (LAMB's trust coefficient 1, the default 1.0; LARS' eta, the
default 0.02); `trust_clip=True` makes it a ceiling instead (ratio at most 1: bitsandbytes' 32-bit rule
update_scale = min(1, max_unorm ||p|| / ||u||)). docs/numerics.md, "LAMB and LARS", has the arithmetic and the
differences from bitsandbytes.

The norms are over the whole tensor and a fused pass cannot apply a ratio that depends on its own result, so a
step is two library calls per parameter group and device: a norm pass (ops pyquant::lamb_norms, pyquant::lars_norms:
it reads the parameters, gradients and states, recomputes the new moments in registers and writes only two float64
sums per tensor, summed in a fixed order: the same bits for any thread count), then Adam's fused step
(pyquant::adam_step_) with lr * ratio in its constants (LAMB), or the momentum rule of pyquant::one_state_step_
with the ratio in its constants (LARS). No float32 copy of the update is kept across the tensor. After a group's first
step both calls run over descriptors built once (the group's plan, Optimizer8bit._planned_step; _run_plan here).

Under FSDP2 each rank's norm pass sums its shard, and the sums are summed over the ranks (one all-reduce per
group and step) before the ratios: the norms of whole tensors, as without sharding (to the order of a float64 sum).

Refused rather than silently different: LAMB's amsgrad=True and adam_w_mode=False (L2 weight decay in the moments),
LARS' momentum 0, dampening != 0 and nesterov=True, bitsandbytes' `args` object, a negative or non-finite
max_unorm. The keyword arguments `master_weights`
and `nonfinite` are Optimizer8bit's (pyquant/optim/_base.py), and so are overrides (pyquant.optim.override, which
may also set max_unorm). torch has no LAMB or LARS: there is no from_torch / to_torch for these.
"""

from __future__ import annotations

import math

import torch

from pyquant import functional as F
from pyquant._contract import ONE_STATE_RULES, lamb_constants, one_state_constants, trust_ratio
from pyquant.distributed import sum_over_shards
from pyquant.optim._base import QUANT_STATE_KEY, Optimizer8bit

__all__ = ["LAMB", "LAMB8bit", "LAMB32bit", "LARS", "LARS8bit", "LARS32bit"]


class _TrustRatio(Optimizer8bit):
    """What LAMB and LARS share: the class's optim_bits (as AdEMAMix), the options max_unorm and trust_clip, the
    state `unorm_vec` (bitsandbytes' key: here the last step's ||direction||), and the ratios from a norm pass."""

    _own_group_keys = ("max_unorm", "trust_clip")  # bitsandbytes' groups lack them: a loaded group keeps ours
    _supports_sharded = True  # FSDP2: the norm sums are summed over the shards (distributed.sum_over_shards)
    _whole_tensor_states = ("unorm_vec",)

    def _setup(self, args, optim_bits: int) -> None:
        name = type(self).__name__
        if args is not None:
            raise ValueError(f"{name}: bitsandbytes' `args` override object is not supported; pass the options")
        if optim_bits not in (8, 32):
            raise ValueError(f"{name}: optim_bits must be 8 or 32, got {optim_bits!r}")
        self.optim_bits = optim_bits

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), optim_bits=self.optim_bits)

    def _check_trust_options(self, group: dict) -> None:
        name, max_unorm = type(self).__name__, group["max_unorm"]
        if isinstance(max_unorm, bool) or not isinstance(max_unorm, (int, float)) or not 0.0 <= max_unorm < math.inf:
            raise ValueError(f"{name}: invalid max_unorm {max_unorm!r}: need a finite value >= 0 (0: no trust ratio)")
        if not isinstance(group["trust_clip"], bool):
            raise ValueError(f"{name}: trust_clip must be True or False, got {group['trust_clip']!r}")

    def _uses_8bit(self, p: torch.Tensor, options: dict | None = None) -> bool:
        # the class's optim_bits, then the base rule: overrides and group keys (optim_bits, min_8bit_size)
        return self.optim_bits == 8 and super()._uses_8bit(p, options)

    def _init_state(self, p: torch.Tensor, options: dict | None = None) -> dict:
        options = self._options(p, self._group_of(p)) if options is None else options
        state = super()._init_state(p, options)
        if float(options["max_unorm"]) > 0.0:  # as bitsandbytes: the state has unorm_vec when max_unorm > 0
            state["unorm_vec"] = torch.zeros(1, dtype=torch.float32, device=p.device)
        return state

    def _checked_state(self, p: torch.Tensor, saved: dict, index) -> dict:
        state = super()._checked_state(p, saved, index)
        unorm = dict(saved, **saved.get(QUANT_STATE_KEY, {})).get("unorm_vec")
        if unorm is not None:  # bitsandbytes writes none with max_unorm == 0; _ratios makes one when needed
            if not isinstance(unorm, torch.Tensor) or unorm.dtype != torch.float32 or unorm.numel() != 1:
                raise ValueError(f"state of parameter {index}: unorm_vec must be a float32 tensor of one element")
            state["unorm_vec"] = unorm.reshape(1).to(p.device).clone()
        return state

    def _ratios(self, group: dict, items: list, sums: torch.Tensor) -> list[float]:
        """Each tensor's trust ratio from its norm pass's sums; records ||direction|| in its unorm_vec (the norm
        of the update before the ratio, what bitsandbytes' 32-bit CPU path records there). Under FSDP2 the
        sums are this rank's shard's until they are summed over the ranks here: the norms are the whole tensor's."""
        rows = sum_over_shards([p for p, _ in items], sums).tolist()
        for (p, state), (_, direction) in zip(items, rows):
            if "unorm_vec" not in state:  # max_unorm was 0 when the state was made or saved
                state["unorm_vec"] = torch.zeros(1, dtype=torch.float32, device=p.device)
            state["unorm_vec"].fill_(math.sqrt(direction))
        clip, max_unorm = group["trust_clip"], float(group["max_unorm"])
        return [trust_ratio(param, direction, max_unorm, clip) for param, direction in rows]

    def _ratio_constants(self, group: dict, items: list, steps: list, sums: torch.Tensor, inv_grad_scale: float):
        """Each tensor's constants row at its step in `steps`, with its trust ratio (from its norm pass's `sums`)."""
        return [self._constants_row(group, step, s["state1"].dtype == torch.uint8, inv_grad_scale, ratio)
                for (_, s), step, ratio in zip(items, steps, self._ratios(group, items, sums))]

    def _fused_step(self, group, items, stepped, grads, inv_grad_scale, policy):
        """The norm pass (`_norms`), the ratios, then the step (`_step`) with them; without a trust ratio
        (max_unorm 0), the step alone."""
        operands = self._operands(items, stepped[0].device)
        constants = self._constants(group, items, inv_grad_scale)  # ratio 1: the norm pass's rows
        if float(group["max_unorm"]) > 0.0:
            sums = self._norms(stepped, grads, operands, constants, policy)
            steps = [s["step"] for _, s in items]
            constants = torch.tensor(self._ratio_constants(group, items, steps, sums, inv_grad_scale),
                                     dtype=torch.float32)
        return self._step(stepped, grads, operands, constants, policy)

    def _run_plan(self, plan, group, params, grads, inv_grad_scale, policy):
        """Optimizer8bit's planned step, with the norm pass and the ratios between loading the descriptors and the
        step: the same two library calls as the general path, over descriptors built once."""
        if float(group["max_unorm"]) == 0.0:
            return super()._run_plan(plan, group, params, grads, inv_grad_scale, policy)
        prepared, items = plan.prepared, list(zip(plan.params, plan.states))
        if not prepared.load(params, grads, *self._plan_rows(plan, group, inv_grad_scale)):  # ratio 1
            return None
        sums = prepared.norm_sums(policy)
        steps = [s["step"] + 1 for s in plan.states]
        prepared.set_constants(self._ratio_constants(group, items, steps, sums, inv_grad_scale), list(range(len(items))))
        return prepared.run(policy)


class LAMB(_TrustRatio):
    """LAMB with `optim_bits` 32 (float32 states, the default, as bitsandbytes) or 8 (8-bit states for tensors of at
    least `min_8bit_size` elements): bitsandbytes' LAMB, with the trust ratio of the module docstring.

    Args (bitsandbytes' order and defaults):
        lr, betas, eps: as Adam's. weight_decay: LAMB's, inside the direction r (decoupled from the moments).
        bias_correction: divide the moments by 1 - beta^t (True, the default) or not (bitsandbytes ignores False).
        amsgrad: must be False. adam_w_mode: must be True (False, L2 decay in the gradient, is refused).
        args: must be None. min_8bit_size: as Adam8bit's.
        max_unorm: the trust coefficient, the update's norm relative to ||p||: ratio = max_unorm ||p|| / ||r||
            (1.0: the published LAMB); 0: no trust ratio (AdamW with decoupled decay, bitsandbytes' "off").
        trust_clip (keyword): cap the ratio at 1 (bitsandbytes' meaning of max_unorm as a ceiling). Default False.
    Tensors whose ||p|| or ||r|| is 0 take ratio 1 (bitsandbytes' 32-bit rule would freeze a zero tensor).
    """

    _nonnegative_states = ("state2",)
    _sharded_names = ("exp_avg", "exp_avg_sq")  # Adam's moments, under torch.optim.Adam's names
    _override_keys = ("lr", "betas", "eps", "weight_decay", "max_unorm")
    _own_group_keys = ("max_unorm", "trust_clip", "bias_correction")

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, adam_w_mode: bool = True, optim_bits: int = 32,
                 args=None, min_8bit_size: int = 4096, max_unorm: float = 1.0, *, trust_clip: bool = False,
                 master_weights: bool = False, nonfinite: str = "skip"):
        name = type(self).__name__
        if amsgrad:
            raise ValueError(f"{name} does not support amsgrad=True (bitsandbytes' LAMB8bit refuses it too)")
        if not adam_w_mode:
            raise ValueError(f"{name}: adam_w_mode=False (L2 weight decay added to the gradient) is not supported; "
                             "LAMB's weight decay is part of its direction r (adam_w_mode=True)")
        self._setup(args, optim_bits)
        # alpha, t_alpha and t_beta3: bitsandbytes' group keys (its AdEMAMix fields), kept for the same layout.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, alpha=0.0, t_alpha=None,
                        t_beta3=None, max_unorm=max_unorm, trust_clip=trust_clip, bias_correction=bias_correction)
        super().__init__(params, defaults, min_8bit_size=min_8bit_size, master_weights=master_weights,
                         nonfinite=nonfinite)

    def _check_options(self, group: dict) -> None:
        name, betas = type(self).__name__, group["betas"]
        self.check_common_options(group)
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"{name}: invalid betas {betas}: need two values in [0, 1)")
        if not isinstance(group["bias_correction"], bool):
            raise ValueError(f"{name}: bias_correction must be True or False, got {group['bias_correction']!r}")
        self._check_trust_options(group)

    def _constants_row(self, group, step, eight_bit, inv_grad_scale, ratio=1.0):
        return lamb_constants(group, step, eight_bit, inv_grad_scale, ratio)

    def _norms(self, stepped, grads, operands, constants, policy):
        states, codes = operands
        return F.lamb_norms_multi_tensor(stepped, grads, *states, constants, *codes, policy)

    def _step(self, stepped, grads, operands, constants, policy):
        states, codes = operands
        return F.adam_step_multi_tensor(stepped, grads, *states, constants, *codes, policy)

    def _prepare_step(self, group, items, grads):
        states, codes = self._operands(items, grads[0].device)
        return F.prepare_adam_step([p for p, _ in items], grads, *states, self._constants(group, items, 1.0), *codes)


class LAMB8bit(LAMB):
    """LAMB with 8-bit states (float32 below `min_8bit_size`): bitsandbytes' LAMB8bit (signature, defaults,
    checkpoints), with the trust ratio it lacks: p -= lr * ratio * r, r = m_hat / (sqrt(v_hat) + eps) + wd p,
    ratio = max_unorm ||p|| / ||r|| (1 for a zero norm or max_unorm 0; at most 1 with trust_clip=True).
    bitsandbytes' LAMB8bit is AdamW8bit on its 8-bit tensors (max_unorm=0 here gives its bits) and refuses any
    max_unorm but 1.0; here any finite value >= 0 is taken. See LAMB for the arguments."""

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, adam_w_mode: bool = True, args=None,
                 min_8bit_size: int = 4096, max_unorm: float = 1.0, *, trust_clip: bool = False,
                 master_weights: bool = False, nonfinite: str = "skip"):
        super().__init__(params, lr, bias_correction, betas, eps, weight_decay, amsgrad, adam_w_mode, 8, args,
                         min_8bit_size, max_unorm, trust_clip=trust_clip, master_weights=master_weights,
                         nonfinite=nonfinite)


class LAMB32bit(LAMB):
    """LAMB with float32 states: bitsandbytes' LAMB32bit (see LAMB)."""

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, adam_w_mode: bool = True, args=None,
                 min_8bit_size: int = 4096, max_unorm: float = 1.0, *, trust_clip: bool = False,
                 master_weights: bool = False, nonfinite: str = "skip"):
        super().__init__(params, lr, bias_correction, betas, eps, weight_decay, amsgrad, adam_w_mode, 32, args,
                         min_8bit_size, max_unorm, trust_clip=trust_clip, master_weights=master_weights,
                         nonfinite=nonfinite)


class LARS(_TrustRatio):
    """LARS (SGD with momentum and a layer-wise trust ratio) with `optim_bits` 32 (float32 momentum, the default, as
    bitsandbytes) or 8 (8-bit momentum for tensors of at least `min_8bit_size` elements): bitsandbytes' LARS, with
    the trust ratio of the module docstring.

    Args (bitsandbytes' order and defaults):
        lr: required. momentum: must be > 0 (bitsandbytes refuses 0 too). dampening: must be 0 and nesterov False
            (bitsandbytes accepts both and ignores them). weight_decay: inside the direction d = g + wd p.
        args: must be None. min_8bit_size: as SGD8bit's.
        max_unorm: LARS' trust coefficient eta: the scaled direction ratio * d has norm max_unorm * ||p||
            (default 0.02); 0: no trust ratio (SGD with momentum, bitsandbytes' "off").
        trust_clip (keyword): cap the ratio at 1. Default False (the published LARS).
    The momentum holds the scaled directions (the paper's v / lr), so `p -= lr * m` as in SGD8bit; groups hold
    bitsandbytes' keys (betas = (momentum, dampening), eps 0) plus max_unorm and trust_clip.
    """

    _states = ("state1",)
    _sharded_names = ("momentum_buffer",)  # SGD's, under torch.optim.SGD's name
    _signed = (True,)  # bitsandbytes quantises the momentum with the signed map
    _override_keys = ("lr", "betas", "weight_decay", "max_unorm")

    def __init__(self, params, lr: float, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
                 nesterov: bool = False, optim_bits: int = 32, args=None, min_8bit_size: int = 4096,
                 max_unorm: float = 0.02, *, trust_clip: bool = False, master_weights: bool = False,
                 nonfinite: str = "skip"):
        name = type(self).__name__
        if nesterov:
            raise ValueError(f"{name}: nesterov=True is not supported (bitsandbytes accepts it and ignores it)")
        self._setup(args, optim_bits)
        defaults = dict(lr=lr, betas=(momentum, dampening), eps=0.0, weight_decay=weight_decay, max_unorm=max_unorm,
                        trust_clip=trust_clip)
        super().__init__(params, defaults, min_8bit_size=min_8bit_size, master_weights=master_weights,
                         nonfinite=nonfinite)

    def _check_options(self, group: dict) -> None:
        name = type(self).__name__
        self.check_common_options(group)
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"{name}: invalid momentum and dampening {betas}: need two values in [0, 1)")
        momentum, dampening = (float(b) for b in betas)
        if momentum == 0.0:
            raise ValueError(f"{name}: momentum must be > 0 (bitsandbytes refuses LARS without momentum too)")
        if dampening != 0.0:
            raise ValueError(f"{name}: dampening={dampening} is not supported (bitsandbytes ignores it); use 0")
        self._check_trust_options(group)

    def _constants_row(self, group, step, eight_bit, inv_grad_scale, ratio=1.0):
        return one_state_constants(group, step, eight_bit, inv_grad_scale, ratio)

    def _norms(self, stepped, grads, operands, constants, policy):
        return F.lars_norms_multi_tensor(stepped, grads, constants, policy)

    def _step(self, stepped, grads, operands, constants, policy):
        states, (code,) = operands
        return F.one_state_step_multi_tensor(stepped, grads, *states, constants, code, ONE_STATE_RULES["momentum"],
                                             policy)

    def _prepare_step(self, group, items, grads):
        states, (code,) = self._operands(items, grads[0].device)
        return F.prepare_one_state_step([p for p, _ in items], grads, *states, self._constants(group, items, 1.0), code,
                                        ONE_STATE_RULES["momentum"])


class LARS8bit(LARS):
    """LARS with an 8-bit momentum (float32 below `min_8bit_size`): bitsandbytes' LARS8bit (signature, defaults,
    checkpoints), with the trust ratio it lacks: m = momentum m + ratio (g + wd p), p -= lr m, ratio =
    max_unorm ||p|| / ||g + wd p|| (eta = max_unorm; 1 for a zero norm or max_unorm 0; at most 1 with
    trust_clip=True). bitsandbytes' LARS8bit is SGD8bit on its 8-bit tensors (max_unorm=0 here gives its bits) and
    scales only its float32-state tensors, by min(1, max_unorm ||p|| / ||m||). See LARS for the arguments."""

    def __init__(self, params, lr: float, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
                 nesterov: bool = False, args=None, min_8bit_size: int = 4096, max_unorm: float = 0.02, *,
                 trust_clip: bool = False, master_weights: bool = False, nonfinite: str = "skip"):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 8, args, min_8bit_size, max_unorm,
                         trust_clip=trust_clip, master_weights=master_weights, nonfinite=nonfinite)


class LARS32bit(LARS):
    """LARS with a float32 momentum: bitsandbytes' LARS32bit (see LARS)."""

    def __init__(self, params, lr: float, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
                 nesterov: bool = False, args=None, min_8bit_size: int = 4096, max_unorm: float = 0.02, *,
                 trust_clip: bool = False, master_weights: bool = False, nonfinite: str = "skip"):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 32, args, min_8bit_size, max_unorm,
                         trust_clip=trust_clip, master_weights=master_weights, nonfinite=nonfinite)
