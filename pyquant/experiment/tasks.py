"""Tasks by name: each builds train/val/test datasets (split by patient, seeded) from its ``[data.<task>]`` config.

    @register_task("my_task")
    def my_task(cfg: dict) -> TaskData: ...

Generated data: a small data set in the real format (pyquant.data.make_rsna_like / make_lidc_like, with the
``generate`` table's arguments), so the same loader runs on both, is written only into the task's demo folder
(DEMO_DATA) or where ``write_generated = true`` (``pyquant experiment --generate-data``) asks for it, and only when the
data there is absent or was generated before. Any other root must hold the real data: a missing root, ``train.csv``,
image folder or pickle is an error naming it, and nothing is written there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset, Subset

TASKS: dict[str, Callable[[dict], "TaskData"]] = {}
# Where generated data may be written without being asked: the folders the quick and subsets presets use. A mistyped
# real-data root must fail, not fill up with generated images that are then trained on and published as results.
DEMO_DATA = {"rsna": "data/rsna-demo", "lidc": "data/lidc-demo/data_lidc.pickle"}


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


def _may_generate(task: str, target: Path, cfg: dict) -> bool:
    return cfg.get("write_generated") is True or os.path.abspath(target) == os.path.abspath(DEMO_DATA[task])


def _load(task: str, key: str, load: Callable):
    """``load()``, with a missing file's error saying how to point the task at its data."""
    from pyquant.data import MissingDataError

    try:
        return load()
    except MissingDataError as e:
        raise MissingDataError(
            f"{e}; set data.{task}.{key} to the real data (--set data.{task}.{key}='...'); generated demo data is "
            f"written only into {DEMO_DATA[task]} or where data.{task}.write_generated = true (--generate-data)"
        ) from None


def _split_subsets(dataset, patient_ids, cfg) -> tuple[dict, Subset, Subset, Subset]:
    from pyquant.data import patient_split

    split = patient_split(patient_ids, int(cfg.get("split_seed", 0)), tuple(cfg.get("fractions", (0.6, 0.2, 0.2))))
    return split, Subset(dataset, split["train"]), Subset(dataset, split["val"]), Subset(dataset, split["test"])


@register_task("rsna")
def rsna(cfg: dict) -> TaskData:
    """RSNA screening mammography (train.csv + images under ``root``), cohort age < ``max_age``, resized to ``size``."""
    from pyquant.data import RSNAMammography, make_rsna_like
    from pyquant.data.synthetic import MARKER

    root, csv, images = Path(cfg["root"]), cfg.get("csv", "train.csv"), cfg.get("images", "train_images")
    if _may_generate("rsna", root, cfg) and (not (root / csv).is_file() or (root / MARKER).is_file()):
        make_rsna_like(root, **dict(cfg.get("generate") or {}), csv=csv, images=images, exist_ok=True, overwrite=True)
    size = int(cfg.get("size", 256))
    full = _load("rsna", "root", lambda: RSNAMammography(root, csv=csv, images=images, max_age=cfg.get("max_age", 55),
                                                         size=size, workers=int(cfg.get("load_workers", 0))))
    split, train, val, test = _split_subsets(full, full.patient_ids, cfg)
    summary = {**full.cohort_summary, "root": str(root), "generated": (root / MARKER).is_file()}
    return TaskData(train, val, test, 1, 2, size, split, list(full.patient_ids), summary)


@register_task("lidc")
def lidc(cfg: dict) -> TaskData:
    """LIDC-IDRI patches (the Probabilistic U-Net pickle at ``path``), positive when >= ``min_raters`` raters marked."""
    from pyquant.data import LIDCPatches, make_lidc_like

    path = Path(cfg["path"])
    if _may_generate("lidc", path, cfg) and (not path.exists() or path.with_name(path.name + ".json").is_file()):
        make_lidc_like(path, **dict(cfg.get("generate") or {}), exist_ok=True, overwrite=True)
    full = _load("lidc", "path", lambda: LIDCPatches(path, min_raters=int(cfg.get("min_raters", 2))))
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
