"""Binary classification metrics in numpy (tested against scikit-learn in tests/test_experiment.py).

Scores are the predicted probability of the positive class (label 1). A sample is called positive when its score is
``>= threshold``. The threshold is chosen on the validation set by Youden's J (max sensitivity + specificity - 1)
and then applied unchanged to the test set.
"""

from __future__ import annotations

import math

import numpy as np


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first (scikit-learn's roc_curve with
    drop_intermediate=False, without its leading (0, 0, inf) point)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} and {s.size}")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = np.cumsum(~y)[last]
    pos, neg = y.sum(), (~y).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return fps / neg, tps / pos, s[last]


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present."""
    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        return math.nan
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.r_[0.0, fpr], np.r_[0.0, tpr]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids


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
