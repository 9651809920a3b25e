"""RSNA Screening Mammography (Kaggle 2022) as a torch Dataset, with the study's cohort and label rule.

Cohort (study.md): rows with an age under ``max_age`` (55) and a BI-RADS value; label 1 = BI-RADS 0 (needs follow-up),
label 0 = BI-RADS 1 or 2 (negative / normal). Rows with no age, no BI-RADS, or another BI-RADS value are left out.
On the real data this gives 3,199 patients and 11,856 images, about 2:1 negative:follow-up.
"""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from pyquant._files import write_atomic
from pyquant.data.errors import DataError, MissingDataError
from pyquant.data.images import Size, _size_hw, read_image, resize_image, to_uint16
from pyquant.data.splits import resolve_split

CACHE_DIRNAME = ".pyquant_cache"
CACHE_VERSION = 1
REQUIRED_COLUMNS = ("patient_id", "image_id", "age", "BIRADS")
FOLLOW_UP, NEGATIVE = 1, 0
BIRADS_LABEL = {0: FOLLOW_UP, 1: NEGATIVE, 2: NEGATIVE}


def _norm(col: str) -> str:
    return "".join(ch for ch in col.strip().lower() if ch.isalnum())


def _float_or_none(value: Optional[str], where: str, column: str) -> Optional[float]:
    v = (value or "").strip()
    if v == "" or v.lower() in ("nan", "na", "none", "null"):
        return None
    try:
        return float(v)
    except ValueError:
        raise DataError(f"{where}: column {column} has a non-numeric value {value!r}") from None


def read_rsna_csv(csv_path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows of a Kaggle-style train.csv with parsed ``age`` and ``birads`` (None when empty)."""
    if not csv_path.is_file():
        raise MissingDataError(f"{csv_path}: CSV file not found")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            columns = {_norm(c): c for c in header}
            missing = [c for c in REQUIRED_COLUMNS if _norm(c) not in columns]
            if missing:
                raise DataError(
                    f"{csv_path}: missing required column(s) {', '.join(missing)} "
                    f"(found: {', '.join(header) if header else 'no header'})"
                )
            col = {c: columns[_norm(c)] for c in REQUIRED_COLUMNS}
            extra = {k: columns[_norm(k)] for k in ("laterality", "view") if _norm(k) in columns}
            rows = []
            for line_no, r in enumerate(reader, start=2):
                where = f"{csv_path}:{line_no}"
                pid = (r.get(col["patient_id"]) or "").strip()
                iid = (r.get(col["image_id"]) or "").strip()
                if not pid or not iid:
                    raise DataError(f"{where}: empty patient_id or image_id")
                rows.append(
                    {
                        "patient_id": pid,
                        "image_id": iid,
                        "age": _float_or_none(r.get(col["age"]), where, col["age"]),
                        "birads": _float_or_none(r.get(col["BIRADS"]), where, col["BIRADS"]),
                        **{k: (r.get(c) or "").strip() for k, c in extra.items()},
                    }
                )
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not a UTF-8 text CSV ({e})") from e
    except csv.Error as e:
        raise DataError(f"{csv_path}: malformed CSV ({e})") from e
    if not rows:
        raise DataError(f"{csv_path}: CSV has a header but no data rows")
    return rows, col


def select_cohort(rows: list[dict[str, Any]], max_age: float, csv_path: Path) -> tuple[list[dict[str, Any]], dict]:
    """Apply the study's filters in order (age < max_age, then BI-RADS in {0, 1, 2}); say which one emptied it."""
    summary: dict[str, Any] = {"rows": len(rows)}
    aged = [r for r in rows if r["age"] is not None and r["age"] < max_age]
    summary["age_below_max"] = len(aged)
    if not aged:
        ages = [r["age"] for r in rows if r["age"] is not None]
        span = f"ages {min(ages):g} to {max(ages):g}" if ages else "no row has an age"
        raise DataError(
            f"{csv_path}: empty cohort: the age filter (age < {max_age:g}) removed all {len(rows)} rows "
            f"({span}; {len(rows) - len(ages)} rows without an age)"
        )
    kept = [r for r in aged if r["birads"] is not None and r["birads"] in BIRADS_LABEL]
    summary["with_birads"] = len(kept)
    if not kept:
        n_none = sum(r["birads"] is None for r in aged)
        raise DataError(
            f"{csv_path}: empty cohort: the BI-RADS filter (BI-RADS 0, 1 or 2) removed all {len(aged)} rows with "
            f"age < {max_age:g} ({n_none} have no BI-RADS value, {len(aged) - n_none} another value)"
        )
    labels: dict[str, set] = {}
    for r in kept:
        labels.setdefault(r["image_id"], set()).add((r["patient_id"], BIRADS_LABEL[int(r["birads"])]))
    conflicts = sorted(i for i, seen in labels.items() if len(seen) > 1)
    if conflicts:  # one image, two labels (or two patients): which row is right cannot be guessed
        shown = "; ".join(f"image_id {i}: " + ", ".join(f"patient {p} label {lab}" for p, lab in sorted(labels[i]))
                          for i in conflicts[:5])
        raise DataError(f"{csv_path}: {len(conflicts)} image id(s) listed more than once with different labels or "
                        f"patients ({shown}{'; ...' if len(conflicts) > 5 else ''}); fix the CSV")
    return kept, summary


def _candidates(images_dir: Path, pid: str, iid: str) -> list[Path]:
    return [
        images_dir / pid / f"{iid}.dcm",
        images_dir / pid / f"{iid}.png",
        images_dir / f"{pid}_{iid}.png",
        images_dir / f"{pid}_{iid}.dcm",
    ]


def _load_one(args: tuple[str, tuple[int, int]]) -> np.ndarray:
    path, size = args
    return to_uint16(resize_image(read_image(path), size))


class RSNAMammography(Dataset):
    """RSNA mammography images and follow-up labels.

    ``root/csv`` is the Kaggle ``train.csv`` (needs columns patient_id, image_id, age, BIRADS); images are looked up
    as ``root/images/<patient_id>/<image_id>.dcm`` (Kaggle), ``.../<image_id>.png`` or
    ``root/images/<patient_id>_<image_id>.png`` (common 8/16-bit PNG conversions, any size), in that order.
    Items are ``(image, label)`` with ``image`` a float32 tensor of shape (1, H, W) in [0, 1] resized to ``size``
    (int or (H, W); stored with 1/65535 resolution) and ``label`` an int (1 = BI-RADS 0 follow-up).

    The resized cohort is cached once in ``root/.pyquant_cache`` (or the folder ``cache`` names; ``cache=False``
    turns it off) under a key hashed from the settings, the CSV bytes and every image's path, size and mtime, so a
    second construction only reads the cache and any change of setting or file rebuilds it.

    ``split`` selects ``"train"``, ``"val"`` or ``"test"`` of a patient split (``split_file`` when it exists, else
    :func:`pyquant.data.patient_split` with ``seed`` over the whole cohort, saved to ``split_file`` if given).
    ``on_missing="skip"`` leaves out cohort rows whose image file is absent instead of raising.
    """

    def __init__(
        self,
        root: Union[str, Path],
        csv: str = "train.csv",
        images: str = "train_images",
        max_age: float = 55,
        size: Size = 256,
        split: Optional[str] = None,
        cache: Union[bool, str, Path] = True,
        *,
        seed: int = 0,
        split_file: Optional[Union[str, Path]] = None,
        fractions: Sequence[float] = (0.6, 0.2, 0.2),
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        on_missing: str = "error",
        workers: int = 0,
    ) -> None:
        if on_missing not in ("error", "skip"):
            raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingDataError(f"{self.root}: data root folder not found")
        self.size = _size_hw(size)
        self.max_age = float(max_age)
        self.transform = transform
        csv_path = self.root / csv
        images_dir = self.root / images
        rows, _ = read_rsna_csv(csv_path)
        cohort, summary = select_cohort(rows, self.max_age, csv_path)
        if not images_dir.is_dir():
            raise MissingDataError(f"{images_dir}: image folder not found (expected {images}/ under {self.root})")

        paths: list[Path] = []
        kept: list[dict[str, Any]] = []
        missing: list[dict[str, Any]] = []
        for r in cohort:
            found = next((p for p in _candidates(images_dir, r["patient_id"], r["image_id"]) if p.is_file()), None)
            if found is None:
                missing.append(r)
            else:
                paths.append(found)
                kept.append(r)
        if missing and on_missing == "error":
            r = missing[0]
            tried = ", ".join(str(p.relative_to(self.root)) for p in _candidates(images_dir, r["patient_id"], r["image_id"]))
            raise MissingDataError(
                f"{images_dir}: image file missing for {len(missing)} of {len(cohort)} cohort rows; first: "
                f"patient_id={r['patient_id']} image_id={r['image_id']} (looked for {tried}); "
                "pass on_missing='skip' to leave such rows out"
            )
        summary["missing_images"] = len(missing)
        if not kept:
            raise DataError(f"{images_dir}: empty cohort: none of the {len(cohort)} cohort rows has an image file")

        # Cache key: settings, CSV content, and every image file's identity.
        rel = [str(p.relative_to(self.root)) for p in paths]
        files = []
        for p, rp in zip(paths, rel):
            st = p.stat()
            files.append([rp, st.st_size, st.st_mtime_ns])
        key_doc = {
            "version": CACHE_VERSION,
            "csv": hashlib.sha256(csv_path.read_bytes()).hexdigest(),
            "csv_name": csv,
            "images": images,
            "max_age": self.max_age,
            "size": list(self.size),
            "on_missing": on_missing,
            "files": files,
        }
        self.cache_key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()
        if cache is False or cache is None:
            self.cache_path: Optional[Path] = None
        else:
            cache_dir = self.root / CACHE_DIRNAME if cache is True else Path(cache)
            self.cache_path = cache_dir / f"rsna_{self.size[0]}x{self.size[1]}_{self.cache_key[:20]}.pt"

        images_u16 = self._read_cache()
        self.from_cache = images_u16 is not None
        if images_u16 is None:
            jobs = [(str(p), self.size) for p in paths]
            if workers and workers > 1 and len(jobs) > 1:
                with ProcessPoolExecutor(max_workers=workers) as ex:
                    arrays = list(ex.map(_load_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
            else:
                arrays = [_load_one(j) for j in jobs]
            images_u16 = torch.from_numpy(np.stack(arrays)[:, None])
            self._write_cache(images_u16, rel)

        labels = [BIRADS_LABEL[int(r["birads"])] for r in kept]
        summary.update(
            images=len(kept),
            patients=len({r["patient_id"] for r in kept}),
            follow_up=int(sum(labels)),
            negative=int(len(labels) - sum(labels)),
        )
        self.cohort_summary = summary
        self.cohort_patient_ids = [r["patient_id"] for r in kept]
        self.splits, idx = resolve_split(self.cohort_patient_ids, split, seed, split_file, fractions)
        self.split = split
        self.indices = list(range(len(kept))) if idx is None else idx
        sel = torch.as_tensor(self.indices, dtype=torch.long)
        self._images = images_u16.index_select(0, sel) if idx is not None else images_u16
        self.labels = torch.as_tensor(labels, dtype=torch.long)[sel]
        self.patient_ids = [kept[i]["patient_id"] for i in self.indices]
        self.image_ids = [kept[i]["image_id"] for i in self.indices]
        self.birads = [int(kept[i]["birads"]) for i in self.indices]
        self.ages = [kept[i]["age"] for i in self.indices]
        self.paths = [paths[i] for i in self.indices]

    # -- cache -------------------------------------------------------------------------------------------------
    def _read_cache(self) -> Optional[torch.Tensor]:
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        try:
            blob = torch.load(self.cache_path, map_location="cpu", weights_only=True)
            if blob.get("key") != self.cache_key:
                return None
            images = blob["images"]
            if images.dtype != torch.uint16 or tuple(images.shape[2:]) != self.size:
                return None
            return images
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"{self.cache_path}: ignoring unreadable cache ({type(e).__name__}: {e})", stacklevel=3)
            return None

    def _write_cache(self, images: torch.Tensor, rel: list[str]) -> None:
        if self.cache_path is None:
            return
        blob = {"key": self.cache_key, "version": CACHE_VERSION, "images": images, "files": rel}
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.cache_path, lambda f: torch.save(blob, f))
        except (OSError, RuntimeError) as e:  # read-only data folders (e.g. Kaggle input), a full disk: uncached
            warnings.warn(f"{self.cache_path}: cannot write cache ({e}); the images load uncached; pass "
                          "cache=<writable folder> or cache=False", stacklevel=3)

    # -- Dataset -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self._images[i].to(torch.float32).div_(65535.0)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images (N, 1, H, W) float32 in [0, 1] and labels, e.g. for pre-loaded timing batches."""
        return self._images.to(torch.float32).div_(65535.0), self.labels.clone()

    def __repr__(self) -> str:
        s = self.cohort_summary
        return (
            f"RSNAMammography(root={str(self.root)!r}, size={self.size}, split={self.split!r}, n={len(self)}, "
            f"cohort={s['images']} images / {s['patients']} patients, follow-up={s['follow_up']}, "
            f"negative={s['negative']}, from_cache={self.from_cache})"
        )
