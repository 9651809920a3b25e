"""The numbers every layer of pyquant agrees on: dtype codes, the optimizers' block size, the Adam constants.

A low module: it imports only torch, so front-ends, backends and the Triton kernels may all import it.
The C side has the same values in csrc/include/pyquant/capi.h (tests/test_build.py compares them).
"""

from __future__ import annotations

import math

import torch

# Storage dtype codes of the C ABI and of the Triton kernels' constexpr arguments (enum pq_dtype in capi.h).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the quantisers and the optimizers take
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "avx512vbmi"}  # enum pq_isa in capi.h

GRID_POINTS = 65536  # bins of the quantisers' [-1, 1] grid (docs/numerics.md section 2)
OPTIMIZER_BLOCK = 256  # elements per absmax entry of 8-bit optimizer states (pq::kOptimizerBlock)
MAX_BLOCKSIZE = 2**63 - 1  # the C ABI's int64
FOURBIT_BLOCK = 128  # elements per scale of the 4-bit first moment (and of a block-wise 4-bit second moment)
RANK1_MAX_DIMS = 8  # rank-1 second moments for tensors of 2 to 8 dimensions (pq_adam4bit_tensor.shape)

# What an optimizer step does with a non-finite gradient element (the kernels' `nonfinite` argument).
SKIP_ELEMENT, PROPAGATE = 0, 1

# Field order of pq::AdamConstants: the optimizers build one row per tensor.
# inv_c1 and weight_decay: read by LAMB's norm pass only (pq_lamb_norms).
CONSTANT_FIELDS = (
    "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "eps_c2", "c2", "step_size", "decay", "inv_grad_scale",
    "inv_c1", "weight_decay",
)


def betas_and_eps(beta1: float, beta2: float, eps: float) -> dict:
    """The fields every constants row starts with."""
    return dict(beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2, eps=eps)


def adam_constants(group: dict, step: int, eight_bit: bool, inv_grad_scale: float = 1.0, *,
                   bias_correction: bool = True) -> list[float]:
    """One row of pq::AdamConstants for a parameter group (lr, betas, eps, weight_decay) at `step`, in
    double precision (docs/numerics.md section 4); a float32 tensor of rows rounds each entry once.
    `bias_correction=False` (LAMB's option) makes c1 = c2 = 1."""
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    c1 = 1.0 - beta1**step if bias_correction else 1.0
    c2 = math.sqrt(1.0 - beta2**step) if bias_correction else 1.0
    values = dict(
        betas_and_eps(beta1, beta2, eps),
        eps_c2=eps * c2,
        c2=c2,
        step_size=-lr / c1 if eight_bit else -lr * c2 / c1,
        decay=1.0 - lr * wd if wd > 0.0 else 1.0,
        inv_grad_scale=inv_grad_scale,
        inv_c1=1.0 / c1,
        weight_decay=wd,
    )
    return [values[name] for name in CONSTANT_FIELDS]


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 0 < blocksize <= MAX_BLOCKSIZE:
        raise ValueError(f"blocksize must be a positive int below 2**63 (an int64), got {blocksize!r}")
    return blocksize


def blocks_of(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


# ---- the one-state 8-bit optimizers (Lion8bit, SGD8bit, RMSprop8bit, Adagrad8bit: docs/numerics.md) ----
# The update rule of a one-state step (enum pq_one_state_rule in capi.h), bitsandbytes' optimizer names.
ONE_STATE_RULES = {"momentum": 0, "lion": 1, "rmsprop": 2, "adagrad": 3}

# Field order of pq::OneStateConstants: one row per tensor, as for Adam.
ONE_STATE_FIELDS = (
    "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "neg_lr", "decay", "weight_decay",
    "grad_decay", "first_step", "inv_grad_scale", "trust_ratio",
)


def one_state_constants(group: dict, step: int, eight_bit: bool, inv_grad_scale: float = 1.0,
                        trust_ratio: float = 1.0) -> list[float]:
    """One row of pq::OneStateConstants for a parameter group (lr, betas, eps, weight_decay) at `step`.

    bitsandbytes' CPU paths differ in two places that the row carries: its 8-bit path always adds the weight
    decay term to the gradient (`grad.add_(p, alpha=wd)`, an fma even when wd == 0: an infinite parameter makes
    the gradient NaN), its 32-bit path only when wd > 0 (`grad_decay`); SGD's first step copies the gradient
    into the momentum (`first_step`). `trust_ratio` multiplies the momentum rule's decayed gradient (LARS)."""
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    values = dict(
        betas_and_eps(beta1, beta2, eps),
        neg_lr=-lr,
        decay=1.0 - lr * wd if wd > 0.0 else 1.0,
        weight_decay=wd,
        grad_decay=1.0 if eight_bit or wd > 0.0 else 0.0,
        first_step=1.0 if step == 1 else 0.0,
        inv_grad_scale=inv_grad_scale,
        trust_ratio=trust_ratio,
    )
    return [values[name] for name in ONE_STATE_FIELDS]


# ---- LAMB and LARS (docs/numerics.md, "LAMB and LARS"): a norm pass, then Adam's or the momentum step ----
def trust_ratio(param_square_sum: float, direction_square_sum: float, max_unorm: float, clip: bool) -> float:
    """The layer's trust ratio from the two sums of squares of its norm pass, in double precision:
    max_unorm * ||p|| / ||direction||; 1 when max_unorm is 0 (no trust ratio: bitsandbytes' "off") or either norm
    is 0 (a zero-initialised tensor still moves; a zero direction moves nothing anyway); with `clip`, at most 1
    (bitsandbytes' meaning of max_unorm: the update's norm is capped at max_unorm * ||p||, never raised). A NaN sum
    (a NaN gradient under nonfinite="propagate") gives a NaN ratio."""
    if max_unorm == 0.0:
        return 1.0
    param_norm, direction_norm = math.sqrt(param_square_sum), math.sqrt(direction_square_sum)
    if param_norm == 0.0 or direction_norm == 0.0:
        return 1.0
    ratio = max_unorm * param_norm / direction_norm
    return min(ratio, 1.0) if clip and not math.isnan(ratio) else ratio


def lamb_constants(group: dict, step: int, eight_bit: bool, inv_grad_scale: float = 1.0, ratio: float = 1.0):
    """One row of pq::AdamConstants for LAMB's step: Adam's row with the learning rate lr * ratio (so that
    p - lr*ratio*(m/c1 / (sqrt(v)/c2 + eps) + wd*p) is Adam's decoupled-decay update), bias correction as the group
    says."""
    scaled = dict(group, lr=float(group["lr"]) * ratio)
    return adam_constants(scaled, step, eight_bit, inv_grad_scale, bias_correction=group.get("bias_correction", True))


# ---- AdEMAMix8bit (docs/numerics.md, "AdEMAMix"): Adam's moments plus a slow EMA m2 mixed in with weight alpha ----
# Field order of pq::AdemamixConstants: one row per tensor, as for Adam.
ADEMAMIX_FIELDS = (
    "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta3", "one_minus_beta3", "alpha", "eps", "c1", "c2",
    "neg_lr", "decay", "inv_grad_scale",
)


def ademamix_schedules(group: dict, step: int) -> tuple[float, float]:
    """(alpha, beta3) at `step` (from 1) under bitsandbytes 0.50.2's schedulers, in double precision and in its
    expression order: alpha rises linearly over t_alpha steps; beta3 rises from beta1 to beta3 over t_beta3 steps
    along exp(ln b1 ln b3 / ((1 - s) ln b3 + s ln b1)), s = step / t_beta3. A t_alpha or t_beta3 of None or 0 turns
    the scheduler off (bitsandbytes tests their truth value)."""
    beta1, _, beta3 = (float(b) for b in group["betas"])
    alpha, t_alpha, t_beta3 = float(group["alpha"]), group["t_alpha"], group["t_beta3"]
    if t_alpha:
        alpha = min(step * alpha / t_alpha, alpha)
    if t_beta3:
        ln_beta1, ln_beta3 = math.log(beta1), math.log(beta3)
        step_scale = step / t_beta3
        beta3 = min(math.exp((ln_beta1 * ln_beta3) / (((1 - step_scale) * ln_beta3) + (step_scale * ln_beta1))), beta3)
    return alpha, beta3


def ademamix_constants(group: dict, step: int, inv_grad_scale: float = 1.0) -> list[float]:
    """One row of pq::AdemamixConstants for a parameter group (lr, betas (3), alpha, t_alpha, t_beta3, eps,
    weight_decay) at `step`. bitsandbytes' 8-bit and 32-bit CPU paths do the same arithmetic, so one row serves
    both state kinds."""
    beta1, beta2, _ = (float(b) for b in group["betas"])
    alpha, beta3 = ademamix_schedules(group, step)
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    values = dict(
        betas_and_eps(beta1, beta2, eps),
        beta3=beta3,
        one_minus_beta3=1.0 - beta3,
        alpha=alpha,
        c1=1.0 - beta1**step,
        c2=math.sqrt(1.0 - beta2**step),
        neg_lr=-lr,
        decay=1.0 - lr * wd if wd > 0.0 else 1.0,
        inv_grad_scale=inv_grad_scale,
    )
    return [values[name] for name in ADEMAMIX_FIELDS]
