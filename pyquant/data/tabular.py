"""scikit-learn's breast cancer Wisconsin (diagnostic) table, 569 cases x 30 features, as a tabular task."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

from pyquant.data.splits import resolve_split


class TabularDataset(TensorDataset):
    """A TensorDataset ``(features float32, label long)`` with ``.features``, ``.labels``, ``.patient_ids``,
    ``.feature_names``, ``.mean``/``.std`` (the standardisation, from the train split) and ``.splits``."""

    features: torch.Tensor
    labels: torch.Tensor


def breast_cancer_tabular(
    split: Optional[str] = None,
    seed: int = 0,
    *,
    split_file: Optional[Union[str, Path]] = None,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> TabularDataset:
    """The Wisconsin table with label 1 = malignant (212), 0 = benign (357) (scikit-learn's target is the reverse).

    Each row is one case (``patient_ids`` ``case_000`` ...), split 60/20/20 with :func:`patient_split` (or
    ``split_file``). Features are standardised with the mean and standard deviation of the train split only, for
    every split and for ``split=None`` (all rows) alike, so no statistic leaks from validation or test rows.
    """
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("breast_cancer_tabular needs scikit-learn (pip install scikit-learn)") from e
    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = 1 - np.asarray(bunch.target, dtype=np.int64)
    ids = [f"case_{i:03d}" for i in range(len(y))]
    splits, idx = resolve_split(ids, split, seed, split_file, fractions)
    if splits is None:
        splits, _ = resolve_split(ids, "train", seed, None, fractions)
    train = np.asarray(splits["train"], dtype=np.int64)
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    z = (x - mean) / std
    sel = np.arange(len(y)) if idx is None else np.asarray(idx, dtype=np.int64)
    features = torch.from_numpy(z[sel].astype(np.float32))
    labels = torch.from_numpy(y[sel])
    ds = TabularDataset(features, labels)
    ds.features, ds.labels = features, labels
    ds.patient_ids = [ids[i] for i in sel]
    ds.indices = sel.tolist()
    ds.feature_names = [str(n) for n in bunch.feature_names]
    ds.mean = torch.from_numpy(mean.astype(np.float32))
    ds.std = torch.from_numpy(std.astype(np.float32))
    ds.splits = splits
    ds.split = split
    return ds
