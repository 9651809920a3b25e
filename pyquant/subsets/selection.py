"""Subset selection before training, from per-sample embeddings (any ``(N, D)`` array: a model's penultimate
features, or anything else you pass).

- :func:`moderate_coreset` (Xia et al., ICLR 2023, "Moderate Coreset"): keep the samples whose distance to their
  own class centre is closest to the median distance;
- :func:`kcenter_greedy` and :func:`herding`: the representativeness baselines (as in DeepCore);
- :func:`random_subset`: the control.

Every function returns a ``torch.int64`` tensor of indices into the ``N`` samples. Distances are Euclidean and are
computed in float64, so the selection does not depend on the input's dtype or on the thread count.
"""

from __future__ import annotations

import math

import torch


def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"fraction must be a number in (0, 1], got {fraction!r}")
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0):  # also refuses NaN
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return fraction


def subset_size(n: int, fraction: float) -> int:
    """round(n * fraction) samples (DeepCore's rule), at least one."""
    fraction = _check_fraction(fraction)
    if n < 1:
        raise ValueError(f"cannot select from {n} samples")
    return max(1, round(n * fraction))


def as_features(features, name: str = "features") -> torch.Tensor:
    """A finite float64 ``(N, D)`` tensor on the CPU, or a ValueError that says what is wrong."""
    x = torch.as_tensor(features)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (samples, dims) array, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no samples")
    if x.is_complex():
        raise ValueError(f"{name} must be real numbers, got {x.dtype}")
    x = x.detach().to("cpu", torch.float64)
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()
        raise ValueError(f"{name} has NaN or infinite values in {len(rows)} sample(s), the first at index {int(rows[0])}")
    return x


def as_labels(labels, n: int, num_classes: int | None = None) -> tuple[torch.Tensor, int]:
    """Integer class labels 0..C-1 for ``n`` samples, every class present; returns (labels, C)."""
    y = torch.as_tensor(labels)
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if len(y) != n:
        raise ValueError(f"features and labels have different lengths: {n} embeddings, {len(y)} labels")
    integral = not (y.is_complex() or y.dtype == torch.bool) and (not y.is_floating_point() or torch.equal(y, y.round()))
    if not integral:  # floats are accepted when they hold whole numbers (labels read from a CSV, say)
        raise ValueError(f"labels must be integer class indices, got {y.dtype} values")
    y = y.to("cpu", torch.int64)
    if (y < 0).any():
        raise ValueError(f"labels must be class indices 0..C-1, got {int(y.min())}")
    classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if int(y.max()) >= classes:
        raise ValueError(f"label {int(y.max())} is out of range for num_classes={classes}")
    counts = torch.bincount(y, minlength=classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"class(es) {empty} have no samples (labels must be 0..{classes - 1} with every class present)")
    return y, classes


def _check_budget(budget, n: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
        raise ValueError(f"budget must be an integer in [1, {n}] (the number of samples), got {budget!r}")
    return budget


def class_centres(x: torch.Tensor, y: torch.Tensor, num_classes: int, centre: str = "median") -> torch.Tensor:
    """Per class the coordinate-wise median (the authors' code; numpy's median, the mean of the two middle values
    for an even count) or mean (the paper's text) of its embeddings: ``(C, D)``."""
    if centre not in ("median", "mean"):
        raise ValueError(f"centre must be 'median' or 'mean', got {centre!r}")
    out = torch.empty(num_classes, x.shape[1], dtype=x.dtype)
    for k in range(num_classes):
        members = x[y == k]
        if centre == "mean":
            out[k] = members.mean(0)
        else:
            s = members.sort(0).values
            m = len(s) // 2
            out[k] = s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2
    return out


def _median_band(order: torch.Tensor, fraction: float) -> torch.Tensor:
    """Ranks [round(n (0.5 - r/2)), round(n (0.5 + r/2))) of ``order``: the r n items around the median rank.
    Python's round (half to even), as in the reference code, so n = 10, r = 0.5 keeps ranks 2..7 (six items)."""
    n = len(order)
    low, high = round(n * (0.5 - fraction / 2)), round(n * (0.5 + fraction / 2))
    return order[low:high]


def moderate_coreset(features, labels, fraction: float, per_class: bool = False, centre: str = "median",
                     num_classes: int | None = None) -> torch.Tensor:
    """Moderate Coreset (Xia et al. 2023): the samples whose distance to their own class centre is nearest the median.

    Score d_i = ||f_i - c_{y_i}||, c_k the class-k centre (coordinate-wise median by default, as in the authors'
    code). All N scores are ranked together (ascending, ties by index) and ranks [round(N(0.5 - r/2)),
    round(N(0.5 + r/2))) are kept: the closest samples (easy, redundant) and the farthest (hard, outliers, often
    mislabelled) are both dropped. With ``per_class=True`` the same band is taken within each class instead, so
    every class keeps about r of its samples (the global ranking can under-sample a class whose samples are spread
    out); this variant is not the published behaviour. Returns the kept indices in ascending order.
    """
    fraction = _check_fraction(fraction)
    x = as_features(features)
    y, classes = as_labels(labels, len(x), num_classes)
    centres = class_centres(x, y, classes, centre)
    distance = (x - centres[y]).norm(dim=1)
    if per_class:
        kept = []
        for k in range(classes):
            members = (y == k).nonzero().flatten()
            kept.append(_median_band(members[torch.argsort(distance[members], stable=True)], fraction))
        keep = torch.cat(kept)
    else:
        keep = _median_band(torch.argsort(distance, stable=True), fraction)
    if len(keep) == 0:
        raise ValueError(f"fraction {fraction} of {len(x)} samples selects none; use a larger fraction")
    return keep.sort().values


def kcenter_greedy(features, budget: int, initial=None, seed: int = 0) -> torch.Tensor:
    """Greedy k-centre (as in DeepCore and Coleman et al.): repeatedly add the sample farthest from everything
    selected so far. Starts from ``initial`` indices (they count towards the budget) or from one sample drawn with
    ``seed``. Returns ``budget`` distinct indices in the order they were chosen. Exact duplicates of a selected
    sample are at distance 0, so they are only chosen once nothing else is left."""
    x = as_features(features)
    n = len(x)
    budget = _check_budget(budget, n)
    if initial is None:
        start = torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed))
    else:
        start = torch.as_tensor(initial, dtype=torch.int64).flatten()
        if len(start) == 0 or len(start) > budget or start.min() < 0 or start.max() >= n or len(start.unique()) != len(start):
            raise ValueError(f"initial must be 1..budget distinct indices in [0, {n}), got {start.tolist()}")
    chosen = start.tolist()
    nearest = torch.cdist(x, x[start]).min(dim=1).values
    nearest[start] = -1.0  # never choose a selected sample again
    while len(chosen) < budget:
        i = int(torch.argmax(nearest))
        chosen.append(i)
        nearest = torch.minimum(nearest, (x - x[i]).norm(dim=1))
        nearest[chosen] = -1.0
    return torch.tensor(chosen, dtype=torch.int64)


def herding(features, budget: int) -> torch.Tensor:
    """Herding (Welling 2009, as in DeepCore): greedily add the sample that brings the mean of the selected embeddings
    closest to the mean of all of them. Returns ``budget`` distinct indices in the order they were chosen."""
    x = as_features(features)
    n = len(x)
    budget = _check_budget(budget, n)
    mean = x.mean(0)
    total = torch.zeros_like(mean)
    available = torch.ones(n, dtype=torch.bool)
    chosen = []
    for k in range(1, budget + 1):
        # || (total + x_i) / k - mean || is smallest where || k mean - total - x_i || is.
        gap = (k * mean - total - x).norm(dim=1)
        gap[~available] = math.inf
        i = int(torch.argmin(gap))
        chosen.append(i)
        available[i] = False
        total += x[i]
    return torch.tensor(chosen, dtype=torch.int64)


def random_subset(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """round(n * fraction) distinct indices drawn uniformly with ``seed``, in ascending order."""
    k = subset_size(n, fraction)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
