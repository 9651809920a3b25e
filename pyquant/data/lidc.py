"""LIDC-IDRI 128x128 patches in the pickle of the "Probabilistic U-Net in PyTorch" project, as a classification set.

The pickle (``data_lidc.pickle``; a folder of ``*.pickle`` parts is merged, as that project does) is a dict from
patch name to ``{"image": HxW float array in [0, 1], "masks": four HxW {0, 1} rater masks, "series_uid": str}``.
Label 1 when at least ``min_raters`` of the raters marked a lesion (any mask pixel > 0); the study uses 2 of 4.
Pickles can run code when loaded: read only files you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from pyquant.data.errors import DataError, MissingDataError
from pyquant.data.splits import resolve_split

REQUIRED_KEYS = ("image", "masks", "series_uid")


def _same_patch(a, b) -> bool:
    try:
        return a["series_uid"] == b["series_uid"] and all(np.array_equal(a[k], b[k]) for k in ("image", "masks"))
    except (KeyError, TypeError):
        return False  # a malformed entry: reported as a clash rather than silently replaced


def _load_pickles(path: Path) -> tuple[dict, list[Path]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".pickle" or p.suffix == ".pkl")
        if not files:
            raise MissingDataError(f"{path}: no .pickle files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise MissingDataError(f"{path}: LIDC patch pickle not found")
    data: dict = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                part = pickle.load(fh)
        except Exception as e:  # unpickling raises anything
            raise DataError(f"{f}: cannot unpickle ({type(e).__name__}: {e})") from e
        if not isinstance(part, dict):
            raise DataError(
                f"{f}: wrong structure: expected a dict from patch name to {{'image', 'masks', 'series_uid'}}, "
                f"got {type(part).__name__}"
            )
        clash = [k for k in part if k in data and not _same_patch(data[k], part[k])]
        if clash:  # two files disagree about one patch: which is right cannot be guessed
            raise DataError(f"{f}: {len(clash)} patch name(s) also in an earlier file with other contents "
                            f"({', '.join(map(str, clash[:5]))}{', ...' if len(clash) > 5 else ''})")
        data.update(part)
    if not data:
        raise DataError(f"{path}: the pickle holds no patches")
    return data, files


class LIDCPatches(Dataset):
    """LIDC patches: items ``(image, label)`` with ``image`` float32 (1, H, W) in [0, 1] and ``label`` an int.

    ``.labels`` (LongTensor), ``.votes`` (raters who marked a lesion), ``.patient_ids`` (series UIDs, the unit of
    the split), ``.names`` (patch names). ``split``/``seed``/``split_file`` as in :class:`RSNAMammography`.
    """

    def __init__(
        self,
        path: Union[str, Path],
        min_raters: int = 2,
        split: Optional[str] = None,
        *,
        seed: int = 0,
        split_file: Optional[Union[str, Path]] = None,
        fractions: Sequence[float] = (0.6, 0.2, 0.2),
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        self.path = Path(path)
        self.min_raters = int(min_raters)
        self.transform = transform
        data, files = _load_pickles(self.path)
        where = files[0] if len(files) == 1 else self.path

        names: list[str] = []
        images: list[np.ndarray] = []
        votes: list[int] = []
        series: list[str] = []
        shape = None
        n_raters = None
        for name, entry in data.items():
            if not isinstance(entry, dict):
                raise DataError(f"{where}: wrong structure: entry {name!r} is a {type(entry).__name__}, expected a dict")
            missing = [k for k in REQUIRED_KEYS if k not in entry]
            if missing:
                raise DataError(
                    f"{where}: wrong structure: entry {name!r} lacks key(s) {', '.join(missing)} "
                    f"(has {', '.join(map(str, entry))})"
                )
            try:
                img = np.asarray(entry["image"])
                masks = [np.asarray(m) for m in entry["masks"]]
            except TypeError as e:
                raise DataError(f"{where}: wrong structure: entry {name!r}: {e}") from e
            if img.ndim != 2 or img.size == 0 or not np.issubdtype(img.dtype, np.number):
                raise DataError(f"{where}: entry {name!r}: image must be a 2-D numeric array, got {img.dtype} {img.shape}")
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise DataError(f"{where}: entry {name!r}: image shape {img.shape} differs from earlier patches' {shape}")
            if not masks or any(m.shape != img.shape for m in masks):
                raise DataError(
                    f"{where}: entry {name!r}: 'masks' must be a list of arrays of the image's shape {img.shape}, "
                    f"got {[m.shape for m in masks]}"
                )
            if n_raters is None:
                n_raters = len(masks)
            elif len(masks) != n_raters:
                raise DataError(f"{where}: entry {name!r} has {len(masks)} masks, earlier patches have {n_raters}")
            if img.dtype == np.uint8:
                img = img.astype(np.float32) / 255.0
            img = img.astype(np.float32)
            lo, hi = float(img.min()), float(img.max())
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
                raise DataError(f"{where}: entry {name!r}: image intensities must lie in [0, 1], got {lo:g} to {hi:g}")
            names.append(str(name))
            images.append(img)
            votes.append(int(sum(bool((m > 0).any()) for m in masks)))
            series.append(str(entry["series_uid"]))
        assert n_raters is not None
        if not 1 <= self.min_raters <= n_raters:
            raise ValueError(f"min_raters must be between 1 and the number of raters ({n_raters}), got {min_raters}")
        self.n_raters = n_raters

        self.cohort_patient_ids = series
        self.splits, idx = resolve_split(series, split, seed, split_file, fractions)
        self.split = split
        self.indices = list(range(len(names))) if idx is None else idx
        self._images = torch.from_numpy(np.stack([images[i] for i in self.indices])[:, None])
        self.votes = torch.as_tensor([votes[i] for i in self.indices], dtype=torch.long)
        self.labels = (self.votes >= self.min_raters).long()
        self.patient_ids = [series[i] for i in self.indices]
        self.names = [names[i] for i in self.indices]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self._images[i].clone()
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images (N, 1, H, W) float32 and labels."""
        return self._images.clone(), self.labels.clone()

    def __repr__(self) -> str:
        pos = int(self.labels.sum())
        return (
            f"LIDCPatches(path={str(self.path)!r}, min_raters={self.min_raters}, split={self.split!r}, n={len(self)}, "
            f"positive={pos}, negative={len(self) - pos}, series={len(set(self.patient_ids))})"
        )
