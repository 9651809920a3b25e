"""Per-parameter options of the 8-bit optimizers: bitsandbytes' `GlobalOptimManager.override_config`, in torch's shape.

    pyquant.optim.override(model.emb.weight, optim_bits=32)   # this tensor's states stay float32, whatever its size
    pyquant.optim.override(model.head.parameters(), lr=1e-4)   # a tensor or an iterable of tensors

The same keys may also be put in a parameter group (`{"params": ..., "optim_bits": 32}`); a parameter's override
wins over its group, and its group over the optimizer's arguments, as bitsandbytes' `get_config` orders them:
- `optim_bits`: 8 (the default) or 32; 32 keeps float32 states. With 8, tensors below `min_8bit_size` still keep
  float32 states (bitsandbytes' rule).
- `min_8bit_size`: the size rule for this tensor.
- the hyperparameters the optimizer has (`lr`, `betas`, `eps`, `weight_decay`: each class names those its update
  reads in `_override_keys`). As in bitsandbytes, an overridden value replaces the group's at every step, so an LR
  scheduler that changes the group's `lr` does not change an overridden one.

As in bitsandbytes, an override may be set before or after the optimizer is created: the precision is decided when
the tensor's states are created (its first step), the hyperparameters are read at every step. Unlike bitsandbytes
(which ignored overrides silently until 2026, its issue #1269), an unknown key is a ValueError here, and so is a key
the optimizer that meets the tensor does not have, or `optim_bits=32` on a tensor that already has 8-bit states.

Where the override lives: in an attribute of the tensor, not in a global table. bitsandbytes keys a global dict by
`id(param)`: it keeps entries (and, for module overrides, the modules) after they are freed, and a later tensor that
reuses the id (another model's) inherits them. A weak-keyed table (torch.utils.weak.WeakIdKeyDictionary) would not
leak, but torch.utils.swap_tensors refuses a tensor that has a weak reference, and torch swaps parameters (FSDP2,
`load_state_dict(assign=True)` under swap-on-conversion). The attribute dies with the tensor, never reaches another
one, stays through `model.to(device)` (the same Parameter object) and pickling / `torch.save(model)`. It does not
follow a new Parameter object: `copy.deepcopy` of a Parameter, materialising a meta-device model, or assigning a
new weight; set the override on the new tensor (pyquant.nn.StableEmbedding does so for its own weight).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["override", "overrides_of"]

ATTRIBUTE = "_pyquant_optim_overrides"
PRECISION_KEYS = ("optim_bits", "min_8bit_size")
# Every key some pyquant 8-bit optimizer takes: precision, and the group hyperparameters of bitsandbytes' layout.
# An optimizer with other group keys adds them here and to its `_override_keys`.
KNOWN_KEYS = (*PRECISION_KEYS, "lr", "betas", "eps", "weight_decay", "max_unorm")


def override(params: torch.Tensor | Iterable[torch.Tensor], **options) -> None:
    """Set options for one tensor (or each of an iterable of tensors) that every pyquant 8-bit optimizer over it
    uses instead of its group's (see the module docstring). Later calls add to or replace earlier keys."""
    unknown = sorted(set(options) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(f"override: unknown key {unknown[0]!r}; the 8-bit optimizers take {', '.join(KNOWN_KEYS)}")
    if not options:
        raise ValueError(f"override: no option given; pass some of {', '.join(KNOWN_KEYS)}")
    check_precision_options(options, "override")
    tensors = [params] if isinstance(params, torch.Tensor) else list(params)
    for p in tensors:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"override: expected a tensor or an iterable of tensors, got {type(p).__name__}")
    for p in tensors:
        # A new dict each time: an optimizer never sees one change under it within a step.
        setattr(p, ATTRIBUTE, {**(getattr(p, ATTRIBUTE, None) or {}), **options})


def overrides_of(param: torch.Tensor) -> dict:
    """The options `override` set on `param` (an empty dict when none)."""
    return dict(getattr(param, ATTRIBUTE, None) or {})


def check_precision_options(options: dict, where: str) -> None:
    """optim_bits in {8, 32}; min_8bit_size an int >= 0 (in an override or a parameter group)."""
    bits = options.get("optim_bits", 8)
    if isinstance(bits, bool) or bits not in (8, 32):
        raise ValueError(f"{where}: optim_bits must be 8 or 32, got {bits!r}")
    size = options.get("min_8bit_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{where}: min_8bit_size must be an int >= 0, got {size!r}")
