"""Data-free neuron pruning of MLPs: `prune_neurons` (Srinivas & Babu, BMVC 2015).

In consecutive nn.Linear layers of an nn.Sequential (element-wise activations between), repeatedly merge
the hidden neuron of lowest saliency into its most similar twin (outgoing weights added) and remove it for
real: the layers get smaller, nothing is masked. docs/compress.md ("compress.prune_neurons") has the
details.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from ._modules import check_model, layer_flops, output_positions, param_count, set_module, shared_modules
from .report import CompressionReport, LayerReport

__all__ = ["prune_neurons", "ELEMENTWISE"]


def _elementwise_types() -> tuple[type, ...]:
    names = ["ReLU", "ReLU6", "LeakyReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh",
             "Hardtanh", "Hardsigmoid", "Hardswish", "Softplus", "Softsign", "Tanhshrink", "LogSigmoid",
             "Threshold", "Identity", "Dropout", "AlphaDropout"]
    return tuple(getattr(nn, n) for n in names if hasattr(nn, n))


# Modules that apply the same scalar function to every feature: merging two identical neurons through
# them changes nothing. (PReLU counts when it has a single parameter.)
ELEMENTWISE = _elementwise_types()


def _is_elementwise(module: nn.Module) -> bool:
    if isinstance(module, nn.PReLU):
        return module.num_parameters == 1
    return type(module) in ELEMENTWISE


def _flatten(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for child_name, child in seq.named_children():
        full = f"{prefix}.{child_name}" if prefix else child_name
        if type(child) is nn.Sequential:
            out.extend(_flatten(child, full))
        else:
            out.append((full, child))
    return out


def _chains(model: nn.Module):
    """(name_a, a, name_b, b, problem) for each nn.Linear a followed in an nn.Sequential by nn.Linear b."""
    seen_seq = set()
    pairs = []
    uses, tied = shared_modules(model)
    for name, module in model.named_modules():
        if type(module) is not nn.Sequential or id(module) in seen_seq:
            continue
        for sub in module.modules():
            if type(sub) is nn.Sequential:
                seen_seq.add(id(sub))
        flat = _flatten(module, name)
        for i, (name_a, a) in enumerate(flat):
            if not isinstance(a, nn.Linear):
                continue
            between = []
            for name_b, b in flat[i + 1:]:
                if isinstance(b, nn.Linear):
                    problem = None
                    bad = [type(mod).__name__ for _, mod in between if not _is_elementwise(mod)]
                    if bad:
                        problem = f"{', '.join(bad)} between {name_a} and {name_b} is not element-wise"
                    elif a.out_features != b.in_features:
                        problem = f"{name_a} has {a.out_features} outputs but {name_b} takes {b.in_features}"
                    elif len(uses[id(a)]) > 1 or len(uses[id(b)]) > 1:
                        problem = "the layer is shared (used at several places in the model)"
                    elif id(a) in tied or id(b) in tied:
                        name, tie = (name_a, tied[id(a)]) if id(a) in tied else (name_b, tied[id(b)])
                        problem = f"{name} {tie}"
                    elif a.out_features < 2:
                        problem = "a single neuron: nothing to merge"
                    pairs.append((name_a, a, name_b, b, problem))
                    break
                between.append((name_b, b))
    return pairs


def _saliency_sequence(w_in: torch.Tensor, a_out: torch.Tensor, steps: int):
    """Srinivas & Babu's greedy merges: (removed j, kept i, saliency) for `steps` removals.

    w_in [n, d]: incoming weights (bias as a column); a_out [m, n]: outgoing weights (modified: the
    columns of removed neurons are added to their twins). s_ij = <a_j^2> ||W_i - W_j||^2, <.> the mean
    over the m next-layer neurons, recomputed for a twin after every merge.
    """
    w_in, a_out = w_in.detach(), a_out.detach()
    n = w_in.shape[0]
    dist = torch.cdist(w_in, w_in, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    dist.fill_diagonal_(math.inf)
    alive = torch.ones(n, dtype=torch.bool)
    asq = (a_out**2).mean(0)
    colmin, argmin = dist.min(0)  # per j: the closest i (its twin candidate)
    merges = []
    for _ in range(steps):
        sal = torch.where(alive, asq * colmin, torch.full_like(asq, math.inf))
        j = int(torch.argmin(sal))
        i = int(argmin[j])
        merges.append((j, i, float(sal[j])))
        a_out[:, i] += a_out[:, j]
        alive[j] = False
        asq[i] = (a_out[:, i] ** 2).mean()
        dist[j, :] = math.inf
        dist[:, j] = math.inf
        stale = (argmin == j) & alive
        if stale.any():
            idx = stale.nonzero().flatten()
            colmin[idx], argmin[idx] = dist[:, idx].min(0)
    return merges, alive


def _knee(saliencies: list[float]) -> int:
    """Removals up to the knee of the saliency curve: on the running maximum of log(saliency) (saliencies
    span orders of magnitude: the last few merges dominate a linear scale), the point farthest below the
    chord from the first to the last removal, both axes scaled to [0, 1]. Zero saliencies (identical
    neurons) count as the smallest positive one."""
    t = len(saliencies)
    if t <= 1:
        return t
    values = torch.tensor(saliencies, dtype=torch.float64)
    positive = values[values > 0]
    if positive.numel() == 0:
        return t  # every neuron has an identical twin
    curve = values.clamp_min(float(positive.min())).log().cummax(0).values
    lo, hi = float(curve[0]), float(curve[-1])
    if not math.isfinite(hi) or hi - lo <= 0.0:
        return t  # flat: every removal is as cheap as the first (identical neurons)
    x = torch.arange(1, t + 1, dtype=torch.float64) / t
    y = (curve - lo) / (hi - lo)
    return int(torch.argmax(x - y)) + 1


def prune_neurons(
    model: nn.Module,
    amount: Union[int, float, str, dict] = "knee",
    layers: Optional[Iterable[str]] = None,
    example_input=None,
) -> tuple[nn.Module, CompressionReport]:
    """Data-free pruning of the hidden neurons of nn.Linear layers (Srinivas & Babu 2015), in a copy.

    A neuron of Linear layer `a` can go when `a` is followed in an nn.Sequential (nested ones count) by
    another nn.Linear `b`, with only element-wise modules between (activations, Dropout, Identity; see
    ELEMENTWISE). Per layer the neuron j with the lowest saliency <a_j^2> ||W_i - W_j||^2 is merged into
    its twin i (b's column j is added to column i) and removed, repeatedly; exact when the two neurons
    have identical incoming weights and biases.
    `amount`: neurons to remove per layer: an int, a float fraction in [0, 1) (rounded), "knee" (stop at
    the knee of the saliency curve, the paper's rule), or a dict {layer name: any of those}.
    `layers`: names of the layers `a` to prune (default: all that qualify). Layers are pruned in model
    order, each after the changes to the one before it.
    """
    check_model(model)
    compressed = copy.deepcopy(model)
    pairs = _chains(compressed)
    if not pairs:
        raise ValueError(
            "the model has no nn.Linear followed by another nn.Linear in an nn.Sequential (with element-wise "
            "activations between): there is no neuron this method can remove"
        )
    by_name = {p[0]: p for p in pairs}
    if layers is not None:
        names = [layers] if isinstance(layers, str) else list(layers)
        modules = dict(compressed.named_modules())
        for n in names:
            if n not in modules:
                raise ValueError(f"the model has no layer named {n!r}")
            if n not in by_name:
                raise ValueError(f"layer {n!r} is not an nn.Linear followed by another nn.Linear in an nn.Sequential")
            if by_name[n][4] is not None:
                raise ValueError(f"layer {n!r} cannot be pruned: {by_name[n][4]}")
        selected = set(names)
    else:
        selected = set(by_name)
    if isinstance(amount, dict):
        unknown = [n for n in amount if n not in by_name]
        if unknown:
            raise ValueError(f"amount names layers that cannot be pruned here: {', '.join(map(repr, unknown))}")

    def amount_for(name: str, n: int) -> Union[int, str]:
        value = amount.get(name, 0) if isinstance(amount, dict) else amount
        if isinstance(value, str):
            if value != "knee":
                raise ValueError(f"amount must be an int, a float fraction, 'knee' or a dict, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"amount must be an int, a float fraction, 'knee' or a dict, got {value!r}")
        if isinstance(value, float):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"a float amount is the fraction of neurons to remove, in [0, 1), got {value}")
            value = int(round(value * n))
        if value < 0 or value >= n:
            raise ValueError(f"cannot remove {value} of the {n} neurons of {name!r}: between 0 and {n - 1}")
        return value

    report = CompressionReport("prune_neurons", flops_unit="per output position" if example_input is None
                               else "for one forward of example_input")
    positions = output_positions(compressed, [p[0] for p in pairs] + [p[2] for p in pairs], example_input)
    rows = {}
    for name_a, a0, name_b, b0, problem in pairs:  # the "before" columns: the layers as given
        n, d, m = a0.out_features, a0.in_features, b0.out_features
        params = param_count(a0) + param_count(b0)
        flops = layer_flops(n * d, positions, name_a) + layer_flops(m * n, positions, name_b)
        rows[name_a] = LayerReport(name_a, "Linear neurons", "skipped", params, params, flops, flops,
                                   neurons_before=n, neurons_after=n)
    for name_a, _, name_b, _, problem in pairs:
        a = compressed.get_submodule(name_a)  # the current modules: an earlier pair may have replaced them
        b = compressed.get_submodule(name_b)
        n, d, m = a.out_features, a.in_features, b.out_features
        row = rows[name_a]
        report.rows.append(row)
        if problem is not None:
            row.reason = problem
            continue
        if name_a not in selected:
            row.reason = "not selected"
            continue
        k = amount_for(name_a, n)
        w_in = a.weight.detach().to(torch.float64)
        if a.bias is not None:
            w_in = torch.cat([w_in, a.bias.detach().to(torch.float64)[:, None]], 1)
        a_out = b.weight.detach().to(torch.float64).clone()
        steps = n - 1 if k == "knee" else k
        merges, _ = _saliency_sequence(w_in, a_out.clone(), steps)
        if k == "knee":
            k = _knee([s for _, _, s in merges])
        if k == 0:
            row.reason = "nothing to remove (amount 0)"
            continue
        # replay the first k merges on the outgoing weights
        alive = torch.ones(n, dtype=torch.bool)
        for j, i, _ in merges[:k]:
            a_out[:, i] += a_out[:, j]
            alive[j] = False
        keep = alive.nonzero().flatten()
        new_a = nn.Linear(d, len(keep), bias=a.bias is not None, device=a.weight.device, dtype=a.weight.dtype)
        new_b = nn.Linear(len(keep), m, bias=b.bias is not None, device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            new_a.weight.copy_(a.weight[keep])
            if a.bias is not None:
                new_a.bias.copy_(a.bias[keep])
            new_b.weight.copy_(a_out[:, keep].to(b.weight.dtype))
            if b.bias is not None:
                new_b.bias.copy_(b.bias)
        for new, old in ((new_a, a), (new_b, b)):
            new.train(old.training)
            new.weight.requires_grad_(old.weight.requires_grad)
        set_module(compressed, name_a, new_a)
        set_module(compressed, name_b, new_b)
        row.action = "pruned"
        row.neurons_after = len(keep)
        row.saliency = merges[k - 1][2]
    # the "after" columns: the layers as they end up (a later row may have shrunk this row's second layer)
    for name_a, _, name_b, _, _ in pairs:
        a, b = compressed.get_submodule(name_a), compressed.get_submodule(name_b)
        row = rows[name_a]
        row.params_after = param_count(a) + param_count(b)
        row.flops_after = layer_flops(a.out_features * a.in_features, positions, name_a) + layer_flops(
            b.out_features * b.in_features, positions, name_b)
    report.model_params_before, report.model_params_after = param_count(model), param_count(compressed)
    return compressed, report
