"""Compress a trained model without data: SVD low-rank factorisation and data-free neuron pruning.

- `lowrank(model, energy=0.9 | rank_ratio=... | param_budget=... | rank=..., layers=None,
  example_input=None) -> (model, report)`: replaces nn.Conv2d (groups=1, zero padding) and nn.Linear
  layers by truncated-SVD factorisations (Denton et al., NeurIPS 2014: the weight reshaped
  [out, in * kh * kw], a k x k conv into `rank` channels then a 1 x 1 conv): `pyquant.nn.LowRankConv2d`
  (the fused kernel) and `pyquant.nn.lowrank.LowRankLinear`. The rank of each layer comes from the
  retained spectral energy, a fraction of its full rank, a fixed rank, or a global parameter budget
  shared between layers; a layer is kept when the factorisation would not be cheaper.
- `prune_neurons(model, amount=..., layers=None, example_input=None) -> (model, report)`: Srinivas & Babu
  (BMVC 2015): in consecutive nn.Linear layers of an nn.Sequential (element-wise activations between),
  repeatedly merge the hidden neuron of lowest saliency into its most similar twin (outgoing weights
  added) and remove it for real: the layers get smaller, nothing is masked.

Both deep-copy the model (the argument is never modified) and return an ordinary nn.Module, plus a
`CompressionReport` with a row per layer considered: what was done, parameters and FLOPs before and
after, the relative reconstruction error (low rank) or the saliency of the last removal (pruning), or
why the layer was skipped. Bad requests raise ValueError / TypeError with the reason.
docs/compress.md has a worked example.
"""

from __future__ import annotations

import copy
import heapq
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from pyquant.nn.lowrank import LowRankConv2d, LowRankLinear

__all__ = ["lowrank", "prune_neurons", "CompressionReport", "LayerReport", "ELEMENTWISE"]


# ---- the report ----
@dataclass
class LayerReport:
    """One layer of a compression report. `action` is "factorised", "pruned" or "skipped" (see `reason`)."""

    name: str
    kind: str
    action: str
    params_before: int
    params_after: int
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None
    rank: Optional[int] = None  # lowrank: the chosen rank
    max_rank: Optional[int] = None  # lowrank: min(out, in * kh * kw)
    energy: Optional[float] = None  # lowrank: retained fraction of sum(sigma^2)
    rel_error: Optional[float] = None  # lowrank: ||W - W_r||_F / ||W||_F
    neurons_before: Optional[int] = None  # pruning
    neurons_after: Optional[int] = None
    saliency: Optional[float] = None  # pruning: saliency of the last neuron removed
    reason: Optional[str] = None  # why the layer was skipped


@dataclass
class CompressionReport:
    """Rows per layer, and the parameter count of the whole model before and after.

    For pruning, a row counts both layers it changes (the pruned layer and the next one), so consecutive
    rows share a layer; the model totals count every parameter once.
    """

    method: str
    rows: list[LayerReport] = field(default_factory=list)
    flops_unit: str = "per output position"
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def changed(self) -> list[LayerReport]:
        return [r for r in self.rows if r.action != "skipped"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.rows if r.action == "skipped"]


    def __getitem__(self, name: str) -> LayerReport:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def __str__(self) -> str:
        head = ["layer", "kind", "action", "params", "FLOPs", "rank", "rel. error", "neurons", "note"]
        lines = [head]
        for r in self.rows:
            flops = "" if r.flops_before is None else f"{r.flops_before:,} -> {r.flops_after:,}"
            lines.append([
                r.name, r.kind, r.action, f"{r.params_before:,} -> {r.params_after:,}", flops,
                "" if r.rank is None else f"{r.rank}/{r.max_rank}",
                "" if r.rel_error is None else f"{r.rel_error:.3g}",
                "" if r.neurons_before is None else f"{r.neurons_before} -> {r.neurons_after}",
                r.reason or ("" if r.saliency is None else f"last saliency {r.saliency:.3g}"),
            ])
        widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
        out = [f"{self.method}: model parameters {self.model_params_before:,} -> {self.model_params_after:,}"
               f" (FLOPs {self.flops_unit})"]
        for i, row in enumerate(lines):
            out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)


# ---- helpers ----
def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=True))


def _positions(model: nn.Module, names: Iterable[str], example_input) -> Optional[dict[str, int]]:
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


def _flops(macs_per_position: int, positions: Optional[dict[str, int]], name: str) -> int:
    count = 1 if positions is None else positions.get(name, 0)
    return 2 * macs_per_position * count


def _layer_matrix(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def _sharing(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, str]]:
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


def _conv_problem(module: nn.Module, known: dict[int, str]) -> Optional[str]:
    """Why `module` cannot be factorised (None: it can); `known`: id(module) -> a problem found from the
    rest of the model (tied weights, a weight used by nn.MultiheadAttention)."""
    if id(module) in known:
        return known[id(module)]
    if isinstance(module, nn.Linear):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            return "uninitialized lazy layer"
        return None
    if isinstance(module, nn.Conv2d):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            return "uninitialized lazy layer"
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros')"
        if isinstance(module.padding, str) and module.padding == "same":
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(t % 2 for t in total):
                return "padding='same' with an even kernel needs asymmetric padding"
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolution"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{type(module).__name__} (only Conv2d and Linear are factorised)"
    return f"{type(module).__name__} is not a Conv2d or Linear layer"


def _kind(module: nn.Module) -> str:
    return type(module).__name__


# ---- low-rank factorisation ----
def _energy_rank(s: torch.Tensor, energy: float) -> int:
    sq = s.to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    # the smallest r with kept[r - 1] >= energy (a hair of slack for the rounding of the cumulative sum)
    return int((kept < energy - 1e-12).sum().item()) + 1


def _retained(s: torch.Tensor, r: int) -> tuple[float, float]:
    sq = s.to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1.0, 0.0
    kept = float(sq[:r].sum()) / total
    return kept, math.sqrt(max(0.0, 1.0 - kept))


def _budget_ranks(infos: list[dict], budget: float) -> dict[str, Optional[int]]:
    """Greedy allocation of a parameter budget across layers: start every factorisable layer at rank 1,
    then repeatedly take the step with the largest gain in normalised retained energy per parameter:
    the next singular value of a layer (m + n parameters) or, at the break-even rank, keeping the layer
    dense (the rest of its energy for the parameters it then costs more). None: keep dense."""
    ranks: dict[str, Optional[int]] = {}
    cost = 0
    heap = []
    for i, info in enumerate(infos):
        m, n, s = info["m"], info["n"], info["s"]
        bias = info["bias"]
        r_be = (m * n - 1) // (m + n)  # largest r with r (m + n) < m n
        info["r_be"] = r_be
        if r_be < 1:
            ranks[info["name"]] = None
            cost += m * n + bias
            continue
        ranks[info["name"]] = 1
        cost += (m + n) + bias
        total = float((s.to(torch.float64) ** 2).sum()) or 1.0
        info["norm"] = (s.to(torch.float64) ** 2 / total).tolist()
        heapq.heappush(heap, _next_step(info, 1, i))
    if cost > budget:
        raise ValueError(
            f"param_budget {budget:,.0f} is too small: rank 1 everywhere already needs {cost:,} parameters"
        )
    while heap:
        _, i, r_next = heapq.heappop(heap)
        info = infos[i]
        m, n = info["m"], info["n"]
        r = ranks[info["name"]]
        step = (m + n) if r_next is not None else (m * n - r * (m + n))
        if cost + step > budget:
            continue  # this layer's next step does not fit; smaller steps of others may
        cost += step
        ranks[info["name"]] = r_next
        if r_next is not None:
            heapq.heappush(heap, _next_step(info, r_next, i))
    return ranks


def _next_step(info: dict, r: int, i: int):
    """Heap entry for the step after rank r: (-gain per parameter, layer index, new rank or None=dense)."""
    m, n, norm, r_be = info["m"], info["n"], info["norm"], info["r_be"]
    if r < r_be and r < len(norm):
        return (-norm[r] / (m + n), i, r + 1)
    rest = sum(norm[r:])
    return (-rest / max(1, m * n - r * (m + n)), i, None)


def lowrank(
    model: nn.Module,
    energy: Optional[float] = None,
    rank_ratio: Optional[float] = None,
    param_budget: Optional[Union[int, float]] = None,
    rank: Optional[Union[int, dict]] = None,
    layers: Optional[Iterable[str]] = None,
    example_input=None,
) -> tuple[nn.Module, CompressionReport]:
    """Factorise the Conv2d and Linear layers of a (deep-copied) `model` by truncated SVD.

    Exactly one rank rule (default `energy=0.9`):
    - `energy` in (0, 1]: per layer, the smallest rank keeping that fraction of sum(sigma_i^2);
    - `rank_ratio` in (0, 1]: per layer, ceil(ratio * full rank);
    - `rank`: an int for every layer (layers whose full rank is smaller are skipped), or a dict
      {layer name: rank} (checked strictly);
    - `param_budget`: the parameters all factorised layers may have together: an int, or a float in
      (0, 1] for that fraction of their current parameters; shared greedily by normalised spectral
      energy per parameter.
    `layers`: names of the modules to factorise (default: every nn.Conv2d and nn.Linear; unsupported
    convolutions, e.g. grouped or transposed, are then listed as skipped). A layer whose factorisation has
    no fewer parameters than the dense layer is kept and listed as skipped.
    `example_input`: when given, FLOPs are counted for one forward of it (else per output position).
    A layer used at several places in the model is one row, under its first name, and every use is replaced
    by the same new module; a layer holding a parameter that another module also holds (tied weights) is
    kept, with a warning and the reason in its row (naming it in `layers` raises).
    Returns (compressed copy, CompressionReport).
    """
    _check_model(model)
    rules = {k: v for k, v in (("energy", energy), ("rank_ratio", rank_ratio), ("param_budget", param_budget),
                               ("rank", rank)) if v is not None}
    if len(rules) > 1:
        raise ValueError(f"give one of energy, rank_ratio, param_budget or rank, not {', '.join(rules)}")
    if not rules:
        energy, rules = 0.9, {"energy": 0.9}
    for key in ("energy", "rank_ratio"):
        v = rules.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0):
            raise ValueError(f"{key} must be a number in (0, 1], got {v!r}")
    if param_budget is not None:
        if isinstance(param_budget, bool) or not isinstance(param_budget, (int, float)) or param_budget <= 0:
            raise ValueError(f"param_budget must be a positive int or a fraction in (0, 1], got {param_budget!r}")
        if isinstance(param_budget, float) and param_budget > 1.0:
            raise ValueError(f"a float param_budget is a fraction in (0, 1], got {param_budget!r} (use an int for a count)")
    if rank is not None:
        values = rank.values() if isinstance(rank, dict) else [rank]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"rank must be an int or a dict of ints, got {v!r}")
            if v < 1:
                raise ValueError(f"rank must be >= 1, got {v}")

    compressed = copy.deepcopy(model)
    modules = dict(compressed.named_modules())  # each module once, under its first name
    uses, known = _sharing(compressed)
    tied = set(known)
    # every name of a module used at several places -> its first name (the one its report row has)
    first = {name: names[0] for names in uses.values() for name in names}
    for m in compressed.modules():
        if isinstance(m, nn.MultiheadAttention):
            known[id(m.out_proj)] = "used by nn.MultiheadAttention through its weight, not its forward"
    if layers is not None:
        given = list(layers) if not isinstance(layers, str) else [layers]
        missing = [n for n in given if n not in first]
        if missing:
            raise ValueError(f"the model has no layer named {', '.join(map(repr, missing))}")
        names = list(dict.fromkeys(first[n] for n in given))
        for n in names:
            problem = _conv_problem(modules[n], known)
            if problem is not None:
                raise ValueError(f"layer {n!r} cannot be factorised: {problem}")
    else:
        names = [n for n, m in modules.items()
                 if n and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(m, nn.Bilinear)]
        if not names:
            raise ValueError("the model has no Conv2d or Linear layers to factorise")
    if isinstance(rank, dict):
        unknown = [n for n in rank if first.get(n) not in names]
        if unknown:
            raise ValueError(f"rank names layers that are not factorised here: {', '.join(map(repr, unknown))}")
        by_first: dict[str, int] = {}
        for n, r in rank.items():
            if by_first.setdefault(first[n], r) != r:
                raise ValueError(f"rank gives two ranks to layer {first[n]!r} (under the names it has)")
        rank = by_first

    report = CompressionReport("lowrank", flops_unit="per output position" if example_input is None
                               else "for one forward of example_input")
    usable = [n for n in names if _conv_problem(modules[n], known) is None]
    positions = _positions(compressed, usable, example_input)

    infos = []
    for name in names:
        module = modules[name]
        params = _count(module)
        problem = _conv_problem(module, known)
        if problem is not None:
            report.rows.append(LayerReport(name, _kind(module), "skipped", params, params, reason=problem))
            if id(module) in tied:
                warnings.warn(f"lowrank: layer {name!r} kept dense: it {problem}", UserWarning, stacklevel=2)
            continue
        w = _layer_matrix(module)
        m, n = w.shape
        s = torch.linalg.svdvals(w.to(torch.float64))
        infos.append({"name": name, "module": module, "m": m, "n": n, "s": s, "params": params,
                      "bias": 0 if module.bias is None else module.bias.numel()})

    if param_budget is not None:
        total = sum(info["params"] for info in infos)
        budget = param_budget * total if isinstance(param_budget, float) else float(param_budget)
        chosen = _budget_ranks(infos, budget)
    else:
        chosen = {}
        for info in infos:
            full = min(info["m"], info["n"])
            if energy is not None:
                chosen[info["name"]] = _energy_rank(info["s"], energy)
            elif rank_ratio is not None:
                chosen[info["name"]] = max(1, math.ceil(rank_ratio * full - 1e-9))
            elif isinstance(rank, dict):
                r = rank.get(info["name"])
                if r is not None and r > full:
                    raise ValueError(f"rank {r} for layer {info['name']!r} is larger than its largest possible rank {full}")
                chosen[info["name"]] = r
            else:
                chosen[info["name"]] = rank

    for info in infos:
        name, module, m, n, s = info["name"], info["module"], info["m"], info["n"], info["s"]
        full = min(m, n)
        bias = info["bias"]
        dense_flops = _flops(m * n, positions, name)
        row = LayerReport(name, _kind(module), "skipped", info["params"], info["params"],
                          flops_before=dense_flops, flops_after=dense_flops, max_rank=full)
        report.rows.append(row)
        r = chosen.get(name)
        if r is None:
            if isinstance(rank, dict):
                row.reason = "no rank given for this layer"
            elif (m * n - 1) // (m + n) < 1:
                row.reason = "not cheaper at any rank"
            else:
                row.reason = "kept dense: the parameter budget is better spent on this layer unfactorised"
            continue
        if r > full:
            row.reason = f"rank {r} is larger than the largest possible rank {full}"
            continue
        row.rank = r
        row.energy, row.rel_error = _retained(s, r)
        factored = r * (m + n) + bias
        if r * (m + n) >= m * n:
            row.reason = f"not cheaper: rank {r} needs {factored:,} parameters, the dense layer {m * n + bias:,}"
            continue
        new = LowRankConv2d.from_conv(module, r) if isinstance(module, nn.Conv2d) else LowRankLinear.from_linear(module, r)
        new.train(module.training)
        for p_new, p_old in ((new.weight_first, module.weight), (new.weight_second, module.weight)):
            p_new.requires_grad_(p_old.requires_grad)
        for use in uses[id(module)]:  # one new module wherever the old one was used
            _set_module(compressed, use, new)
        row.action = "factorised"
        row.params_after = _count(new)
        row.flops_after = _flops(r * (m + n), positions, name)
    report.model_params_before, report.model_params_after = _count(model), _count(compressed)
    return compressed, report


# ---- data-free neuron pruning ----
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
    uses, tied = _sharing(model)
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
    _check_model(model)
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
    positions = _positions(compressed, [p[0] for p in pairs] + [p[2] for p in pairs], example_input)
    rows = {}
    for name_a, a0, name_b, b0, problem in pairs:  # the "before" columns: the layers as given
        n, d, m = a0.out_features, a0.in_features, b0.out_features
        params = _count(a0) + _count(b0)
        flops = _flops(n * d, positions, name_a) + _flops(m * n, positions, name_b)
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
        _set_module(compressed, name_a, new_a)
        _set_module(compressed, name_b, new_b)
        row.action = "pruned"
        row.neurons_after = len(keep)
        row.saliency = merges[k - 1][2]
    # the "after" columns: the layers as they end up (a later row may have shrunk this row's second layer)
    for name_a, _, name_b, _, _ in pairs:
        a, b = compressed.get_submodule(name_a), compressed.get_submodule(name_b)
        row = rows[name_a]
        row.params_after = _count(a) + _count(b)
        row.flops_after = _flops(a.out_features * a.in_features, positions, name_a) + _flops(
            b.out_features * b.in_features, positions, name_b)
    report.model_params_before, report.model_params_after = _count(model), _count(compressed)
    return compressed, report
