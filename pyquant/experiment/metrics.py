"""Binary classification metrics in numpy (tested against scikit-learn in tests/test_experiment.py).

Scores are the predicted probability of the positive class (label 1). A sample is called positive when its score is
``>= threshold``. The threshold is chosen on the validation set by Youden's J (max sensitivity + specificity - 1)
and then applied unchanged to the test set.
"""

from __future__ import annotations

import math
import warnings

import numpy as np


def _roc_counts(labels, scores, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positives, true positives, thresholds) at every distinct score, highest first. ``weights``: one
    weight per sample, or a (replicates, samples) array of them (a bootstrap replicate weights each sample by how
    often it was drawn): the counts then have one row per replicate."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} and {s.size}")
    w = np.ones(y.size) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y, w = s[order], y[order], w[..., order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each run of equal scores
    return np.cumsum(w * ~y, axis=-1)[..., last], np.cumsum(w * y, axis=-1)[..., last], s[last]


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first (scikit-learn's roc_curve with
    drop_intermediate=False, without its leading (0, 0, inf) point)."""
    fps, tps, thresholds = _roc_counts(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        return fps / fps[-1], tps / tps[-1], thresholds


def _auc(fps: np.ndarray, tps: np.ndarray) -> np.ndarray:
    """Trapezoid area under the ROC curve of cumulative counts (last axis); NaN where a class is absent."""
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr, tpr = fps / fps[..., -1:], tps / tps[..., -1:]
    zero = np.zeros(fpr.shape[:-1] + (1,))
    fpr, tpr = np.concatenate([zero, fpr], -1), np.concatenate([zero, tpr], -1)
    return np.sum(np.diff(fpr, axis=-1) * (tpr[..., 1:] + tpr[..., :-1]) / 2, axis=-1)


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present."""
    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        return math.nan
    return float(_auc(*_roc_counts(labels, scores)[:2]))


def youden_threshold(labels, scores) -> float:
    """The score threshold with the largest sensitivity + specificity - 1 (the highest such one on ties);
    0.5 when only one class is present."""
    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, scores)
    return float(thresholds[int(np.argmax(tpr - fpr))])


THRESHOLD_RULES = {"youden": youden_threshold, "fixed": lambda labels, scores: 0.5}


def binary_metrics(labels, scores, threshold: float = 0.5) -> dict[str, float]:
    """accuracy, balanced_accuracy, sensitivity (recall of 1), specificity (recall of 0) at ``threshold``; auc;
    counts. Metrics with an empty denominator are NaN."""
    y = np.asarray(labels).astype(bool).ravel()
    pred = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    return {
        "accuracy": (tp + tn) / y.size if y.size else math.nan,
        "balanced_accuracy": (sens + spec) / 2,
        "sensitivity": sens,
        "specificity": spec,
        "auc": roc_auc(y, scores),
        "threshold": float(threshold),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def bootstrap_intervals(runs, replicates: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile intervals (95 %) of AUC and balanced accuracy, averaged over ``runs``, resampling patients.

    ``runs``: (labels, scores, patient ids, threshold) per run, e.g. one per seed on the same test patients. Each
    replicate draws the test patients with replacement, a patient's images all coming along as often as it is
    drawn (images of one patient are not independent), and uses the same draw for every run; so the interval is
    that of the mean over the runs due to which patients happened to be tested. The threshold stays the one chosen
    on validation. Seeded: the same runs give the same interval."""
    patients = sorted({str(p) for _, _, ids, _ in runs for p in ids})
    index = {p: i for i, p in enumerate(patients)}
    counts = np.random.default_rng(seed).multinomial(len(patients), np.full(len(patients), 1 / len(patients)),
                                                     size=replicates)
    auc = bacc = 0.0
    for labels, scores, ids, threshold in runs:
        y = np.asarray(labels).astype(bool).ravel()
        pred = np.asarray(scores, dtype=np.float64).ravel() >= threshold
        w = counts[:, [index[str(p)] for p in ids]].astype(np.float64)  # (replicates, samples)
        auc = auc + _auc(*_roc_counts(y, scores, w)[:2])
        with np.errstate(invalid="ignore", divide="ignore"):
            bacc = bacc + (w @ (pred & y) / (w @ y) + w @ (~pred & ~y) / (w @ ~y)) / 2
    tail = 50 * (1 - level)
    with warnings.catch_warnings():  # a replicate without one class gives NaN: left out of the percentiles
        warnings.simplefilter("ignore", RuntimeWarning)
        return {name: [float(x) for x in np.nanpercentile(v / len(runs), [tail, 100 - tail])]
                for name, v in (("auc", auc), ("balanced_accuracy", bacc))}


def paired_difference(values: list[float], baseline: list[float], level: float = 0.95) -> dict | None:
    """Mean of the per-seed differences ``values - baseline`` (same seeds, in order) with a t interval over seeds;
    ``within_noise`` when the interval holds 0: the difference is no larger than seeds alone make it. None when
    fewer than two seeds pair up."""
    d = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return None
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    mean = float(d.mean())
    return {"mean": mean, "ci": [mean - half, mean + half], "seeds": int(d.size), "within_noise": abs(mean) <= half}
