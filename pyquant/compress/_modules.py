"""Model-walking helpers shared by the two compression methods (factorize.py and prune.py).

Both find layers by name, replace them (under every name a shared module has), refuse to untie tied
weights, and count parameters and FLOPs for the report; one copy of that code keeps their reports
comparable.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=True))


def output_positions(model: nn.Module, names: Iterable[str], example_input) -> Optional[dict[str, int]]:
    """Output positions (elements / channels) of each named module for one forward of example_input."""
    if example_input is None:
        return None
    positions: dict[str, int] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod, args, out, name=name):
            channels = out.shape[1] if isinstance(mod, nn.Conv2d) else out.shape[-1]
            positions[name] = positions.get(name, 0) + out.numel() // max(channels, 1)

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return positions


def layer_flops(macs_per_position: int, positions: Optional[dict[str, int]], name: str) -> int:
    count = 1 if positions is None else positions.get(name, 0)
    return 2 * macs_per_position * count


def shared_modules(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, str]]:
    """How the modules of `model` share: (uses, tied). uses: id(module) -> all its names, in model order (a
    module used at several places has several); tied: id(module) -> why it cannot be replaced, for a module
    holding a parameter that another module also holds (tied weights: replacing one would untie them)."""
    uses: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        uses.setdefault(id(m), []).append(name)
    holders: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    tied = {}
    for name, m in model.named_modules():
        others = sorted({h for p in m.parameters(recurse=False) for h in holders[id(p)] if h != name})
        if others:
            tied[id(m)] = f"shares a parameter with {', '.join(map(repr, others))} (tied weights would be untied)"
    return uses, tied
