"""Tasks by name: each builds train/val/test datasets (split by patient, seeded) from its ``[data.<task>]`` config.

    @register_task("my_task")
    def my_task(cfg: dict) -> TaskData: ...

Generated data: when ``generate`` is set and the data folder holds no real data, the task writes a small data set in
the real format first (pyquant.data.make_rsna_like / make_lidc_like), so the same loader runs on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset, Subset

TASKS: dict[str, Callable[[dict], "TaskData"]] = {}


@dataclass
class TaskData:
    train: Dataset
    val: Dataset
    test: Dataset
    in_chans: int
    num_classes: int
    image_size: Optional[int]  # side length of the (square) images; None for tabular data
    split: dict  # split name -> indices into the cohort
    patient_ids: list  # per cohort item, what the split is made over
    summary: dict = field(default_factory=dict)


def register_task(name: str):
    def decorate(fn):
        TASKS[name] = fn
        return fn

    return decorate


def get_task(name: str, cfg: dict) -> TaskData:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(TASKS)} (add one with @register_task)")
    return TASKS[name](cfg)


def _split_subsets(dataset, patient_ids, cfg) -> tuple[dict, Subset, Subset, Subset]:
    from pyquant.data import patient_split

    split = patient_split(patient_ids, int(cfg.get("split_seed", 0)), tuple(cfg.get("fractions", (0.6, 0.2, 0.2))))
    return split, Subset(dataset, split["train"]), Subset(dataset, split["val"]), Subset(dataset, split["test"])


@register_task("rsna")
def rsna(cfg: dict) -> TaskData:
    """RSNA screening mammography (train.csv + images under ``root``), cohort age < ``max_age``, resized to ``size``."""
    from pyquant.data import RSNAMammography, make_rsna_like
    from pyquant.data.synthetic import MARKER

    root, csv = Path(cfg["root"]), cfg.get("csv", "train.csv")
    generate = cfg.get("generate")
    if generate and (not (root / csv).is_file() or (root / MARKER).is_file()):
        make_rsna_like(root, **dict(generate), csv=csv, images=cfg.get("images", "train_images"), exist_ok=True, overwrite=True)
    size = int(cfg.get("size", 256))
    full = RSNAMammography(root, csv=csv, images=cfg.get("images", "train_images"), max_age=cfg.get("max_age", 55),
                           size=size, workers=int(cfg.get("load_workers", 0)))
    split, train, val, test = _split_subsets(full, full.patient_ids, cfg)
    summary = {**full.cohort_summary, "root": str(root), "generated": (root / MARKER).is_file()}
    return TaskData(train, val, test, 1, 2, size, split, list(full.patient_ids), summary)


@register_task("lidc")
def lidc(cfg: dict) -> TaskData:
    """LIDC-IDRI patches (the Probabilistic U-Net pickle at ``path``), positive when >= ``min_raters`` raters marked."""
    from pyquant.data import LIDCPatches, make_lidc_like

    path = Path(cfg["path"])
    generate = cfg.get("generate")
    if generate and (not path.exists() or path.with_name(path.name + ".json").is_file()):
        make_lidc_like(path, **dict(generate), exist_ok=True, overwrite=True)
    full = LIDCPatches(path, min_raters=int(cfg.get("min_raters", 2)))
    split, train, val, test = _split_subsets(full, full.patient_ids, cfg)
    size = int(full[0][0].shape[-1])
    summary = {"path": str(path), "patches": len(full), "positive": int(full.labels.sum()), "min_raters": full.min_raters,
               "generated": path.with_name(path.name + ".json").is_file()}
    return TaskData(train, val, test, 1, 2, size, split, list(full.patient_ids), summary)


@register_task("tabular")
def tabular(cfg: dict) -> TaskData:
    """scikit-learn's breast cancer Wisconsin table (569 cases, 30 features), standardised on the train split."""
    from pyquant.data import breast_cancer_tabular

    seed, fractions = int(cfg.get("split_seed", 0)), tuple(cfg.get("fractions", (0.6, 0.2, 0.2)))
    parts = {s: breast_cancer_tabular(split=s, seed=seed, fractions=fractions) for s in ("train", "val", "test")}
    train = parts["train"]
    ids = [f"case_{i:03d}" for i in range(sum(len(p) for p in parts.values()))]
    summary = {"cases": len(ids), "features": int(train.features.shape[1]), "positive (malignant)": int(sum(int(p.labels.sum()) for p in parts.values()))}
    return TaskData(train, parts["val"], parts["test"], int(train.features.shape[1]), 2, None, train.splits, ids, summary)
