"""Seeded splits by patient (or series): no patient lands in two splits; saved as JSON beside a run and reused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from pyquant._files import write_text_atomic
from pyquant.data.errors import DataError, MissingDataError

SPLIT_NAMES = ("train", "val", "test")
SPLIT_FORMAT = "pyquant-split-v1"


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder apportionment of n items; every split with a positive fraction gets one when n allows."""
    raw = [f * n for f in fractions]
    counts = [math.floor(r + 1e-9) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    positive = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1 (train, val, test), got {fractions!r}")
    return fr  # type: ignore[return-value]


def patient_split(
    patient_ids: Sequence[Any], seed: int, fractions: Sequence[float] = (0.6, 0.2, 0.2)
) -> dict[str, list[int]]:
    """Split item indices into ``train``/``val``/``test`` by patient.

    The unique patient ids (compared as strings, sorted, so the result does not depend on item order) are shuffled
    with ``numpy.random.default_rng(seed)`` and cut by ``fractions`` (largest remainder: 3,199 patients give
    1,919/640/640). Returns, per split, the sorted indices of the items whose patient falls in it.
    """
    fr = _check_fractions(fractions)
    ids = [str(p) for p in patient_ids]
    unique = sorted(set(ids))
    perm = np.random.default_rng(seed).permutation(len(unique))
    counts = _counts(len(unique), fr)
    assignment: dict[str, str] = {}
    start = 0
    for name, c in zip(SPLIT_NAMES, counts):
        for j in perm[start : start + c]:
            assignment[unique[j]] = name
        start += c
    out: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for i, p in enumerate(ids):
        out[assignment[p]].append(i)
    return out


def save_split(
    path: Union[str, Path],
    split: Mapping[str, Sequence[int]],
    patient_ids: Optional[Sequence[Any]] = None,
    meta: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``split`` (split -> indices) as JSON. With ``patient_ids`` (per item, the list the indices refer to) the
    file also records each split's patients, so that :func:`load_split` can check or rebuild the indices."""
    path = Path(path)
    doc: dict[str, Any] = {"format": SPLIT_FORMAT, "splits": {k: [int(i) for i in v] for k, v in split.items()}}
    if patient_ids is not None:
        ids = [str(p) for p in patient_ids]
        doc["n"] = len(ids)
        doc["patients"] = {k: sorted({ids[int(i)] for i in v}) for k, v in split.items()}
    if meta:
        doc["meta"] = dict(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def load_split(path: Union[str, Path], patient_ids: Optional[Sequence[Any]] = None) -> dict[str, list[int]]:
    """Read a split written by :func:`save_split`.

    With ``patient_ids`` the split is checked against the data: when the file records patients, the indices are
    rebuilt from patient membership (so a split stays valid if items are reordered) and every patient must be in the
    file; otherwise the item count must match. In both cases no patient may appear in two splits.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: split file not found")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read split file ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("splits"), dict):
        raise DataError(f"{path}: not a split file (expected a JSON object with a 'splits' mapping)")
    splits_doc = doc["splits"]
    try:
        splits = {str(k): [int(i) for i in v] for k, v in splits_doc.items()}
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: 'splits' must map split names to lists of integer indices ({e})") from e
    if patient_ids is None:
        return splits

    ids = [str(p) for p in patient_ids]
    patients = doc.get("patients")
    if isinstance(patients, dict):
        owner: dict[str, str] = {}
        for name, plist in patients.items():
            for p in plist:
                if str(p) in owner:
                    raise DataError(f"{path}: patient {p} is in both '{owner[str(p)]}' and '{name}'")
                owner[str(p)] = str(name)
        unknown = sorted({p for p in ids if p not in owner})
        if unknown:
            raise DataError(
                f"{path}: {len(unknown)} patient(s) of the data are not in the split file (e.g. {unknown[:3]}); "
                "the file was made for other data or another cohort"
            )
        rebuilt: dict[str, list[int]] = {str(name): [] for name in patients}
        for i, p in enumerate(ids):
            rebuilt[owner[p]].append(i)
        return rebuilt

    n = doc.get("n", None)
    if n is not None and int(n) != len(ids):
        raise DataError(f"{path}: split is for {n} items, the data has {len(ids)}")
    seen: dict[str, str] = {}
    for name, idx in splits.items():
        for i in idx:
            if not 0 <= i < len(ids):
                raise DataError(f"{path}: index {i} in '{name}' is out of range for {len(ids)} items")
            p = ids[i]
            if seen.setdefault(p, name) != name:
                raise DataError(f"{path}: patient {p} is in both '{seen[p]}' and '{name}'")
    return splits


def resolve_split(
    patient_ids: Sequence[Any],
    split: Optional[str],
    seed: int,
    split_file: Optional[Union[str, Path]],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> tuple[Optional[dict[str, list[int]]], Optional[list[int]]]:
    """(all splits, indices of ``split``) for a dataset. The split comes from ``split_file`` when it exists, else
    from :func:`patient_split` (and is then saved to ``split_file`` when one is given). ``split=None`` selects all."""
    if split is not None and split not in SPLIT_NAMES:
        raise ValueError(f"split must be None or one of {SPLIT_NAMES}, got {split!r}")
    if split is None and split_file is None:
        return None, None
    if split_file is not None and Path(split_file).exists():
        splits = load_split(split_file, patient_ids)
    else:
        splits = patient_split(patient_ids, seed, fractions)
        if split_file is not None:
            save_split(split_file, splits, patient_ids, meta={"seed": int(seed), "fractions": list(fractions)})
    if split is None:
        return splits, None
    if split not in splits:
        raise DataError(f"{split_file}: has no '{split}' split (has {sorted(splits)})")
    return splits, list(splits[split])
