"""Low-rank (truncated-SVD) factorisation of Conv2d and Linear layers: `lowrank`.

Denton et al., NeurIPS 2014: the weight reshaped [out, in * kh * kw], a k x k conv into `rank` channels
then a 1 x 1 conv, as `pyquant.nn.LowRankConv2d` (the fused kernel) or `pyquant.nn.lowrank.LowRankLinear`.
The rank of each layer comes from the retained spectral energy, a fraction of its full rank, a fixed rank,
or a global parameter budget shared between layers; a layer is kept when the factorisation would not be
cheaper. docs/compress.md ("compress.lowrank") describes the rules; bench/test_compress.py measures the
result on DenseNet-121.

(The module is not called lowrank.py: `pyquant.compress.lowrank` is the function, and "lowrank" already
names `pyquant.nn.lowrank` and the op `pyquant.ops.lowrank_conv2d`.)
"""

from __future__ import annotations

import copy
import heapq
import math
import warnings
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

# pyquant.nn re-exports LowRankConv2d only; both classes are public (__all__) in pyquant.nn.lowrank.
from pyquant.nn.lowrank import LowRankConv2d, LowRankLinear

from ._modules import check_model, layer_flops, output_positions, param_count, set_module, shared_modules
from .report import CompressionReport, LayerReport

__all__ = ["lowrank"]


def _layer_matrix(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


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
    check_model(model)
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
    uses, known = shared_modules(compressed)
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
    positions = output_positions(compressed, usable, example_input)

    infos = []
    for name in names:
        module = modules[name]
        params = param_count(module)
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
        dense_flops = layer_flops(m * n, positions, name)
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
            set_module(compressed, use, new)
        row.action = "factorised"
        row.params_after = param_count(new)
        row.flops_after = layer_flops(r * (m + n), positions, name)
    report.model_params_before, report.model_params_after = param_count(model), param_count(compressed)
    return compressed, report
