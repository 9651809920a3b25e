"""Small data sets written in exactly the real on-disk formats, deterministic by seed.

``make_rsna_like`` writes a Kaggle-style ``train.csv`` and mammogram-like images (PNG nested, PNG flat, or DICOM with
MONOCHROME1/2 and a window or VOI LUT). Follow-up breasts (BI-RADS 0, label 1) carry an irregular textured mass in
both views; BI-RADS 2 breasts often carry small smooth benign spots; any breast may hold a large faint dense region.
So brightness alone does not give the label away, but a small CNN learns it in a few epochs.
``make_lidc_like`` writes the Probabilistic-U-Net LIDC patch pickle with four rater masks per patch.

Same arguments and seed -> byte-identical files (on one numpy/Pillow/pydicom installation).
"""

from __future__ import annotations

import csv as csv_lib
import io
import json
import pickle
import shutil
from pathlib import Path
from typing import Any, Union

import numpy as np

from pyquant.data.errors import DataError

MARKER = "pyquant_synthetic.json"
RSNA_COLUMNS = (
    "site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy", "invasive", "BIRADS",
    "implant", "density", "machine_id", "difficult_negative_case",
)
VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
DENSITY = ("A", "B", "C", "D")
MG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *key]))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (periodic), unit standard deviation."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    g = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    out = np.fft.irfft2(np.fft.rfft2(noise) * g, s=shape)
    return out / (out.std() + 1e-12)


def _blob(yy, xx, cy, cx, radius, edge, rng=None, lobes=0, irregularity=0.0) -> np.ndarray:
    """A soft disc (1 inside, 0 outside, sigmoid edge of width ``edge`` px), optionally with a lobulated border."""
    dy, dx = yy - cy, xx - cx
    r = np.sqrt(dy * dy + dx * dx)
    if lobes and rng is not None:
        theta = np.arctan2(dy, dx)
        mod = np.zeros_like(theta)
        for k in range(2, 2 + lobes):
            mod += rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) / k**0.5
        radius = radius * (1.0 + irregularity * mod)
    return 1.0 / (1.0 + np.exp(np.clip((r - radius) / max(edge, 1e-3), -50, 50)))


def _mammogram(rng: np.random.Generator, h: int, w: int, laterality: str, view: str, density: int,
               birads: Any, lesion: tuple[float, float] | None, contrast: float = 1.0, lesion_size: float = 1.0) -> np.ndarray:
    """A [0, 1] mammogram-like image: breast against the chest wall (left edge for L, right for R). ``contrast`` and
    ``lesion_size`` scale the follow-up mass's brightness and radius (the random draws stay the same)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if laterality == "R":
        xx = (w - 1) - xx
    cy = h * rng.uniform(0.45, 0.55)
    a, b = h * rng.uniform(0.40, 0.48), w * rng.uniform(0.75, 0.92)
    rad = np.sqrt(((yy - cy) / a) ** 2 + (xx / b) ** 2)
    breast = 1.0 / (1.0 + np.exp(np.clip((rad - 1.0) / 0.015, -50, 50)))
    s = min(h, w)
    fib = 0.5 + 0.5 * np.tanh(_smooth_noise(rng, (h, w), s / 18) + (density - 1.5) * 0.45)
    tissue = 0.30 + 0.18 * fib + 0.04 * _smooth_noise(rng, (h, w), s / 60)
    tissue *= 1.0 - 0.35 * np.clip(rad, 0, 1) ** 3  # thinner towards the skin line
    img = breast * tissue
    if view == "MLO":  # pectoral muscle in the upper corner at the chest wall
        muscle = (xx / (w * rng.uniform(0.22, 0.32)) + yy / (h * rng.uniform(0.35, 0.5))) < 1.0
        img = np.where(muscle, np.maximum(img, 0.62 + 0.04 * _smooth_noise(rng, (h, w), s / 30)), img)
    if rng.random() < 0.35:  # a large faint dense region: a distractor for both classes
        ry, rx = cy + rng.uniform(-0.4, 0.4) * a, rng.uniform(0.2, 0.6) * b
        img += breast * 0.09 * _blob(yy, xx, ry, rx, s * rng.uniform(0.10, 0.16), s * 0.03)
    if birads == 2 and rng.random() < 0.7:  # benign: a few small smooth round spots
        for _ in range(int(rng.integers(2, 5))):
            t = rng.uniform(0, 2 * np.pi)
            rr = rng.uniform(0.1, 0.65)
            py, px = cy + rr * a * np.sin(t), rr * b * abs(np.cos(t))
            img += breast * rng.uniform(0.2, 0.3) * _blob(yy, xx, py, px, s * rng.uniform(0.008, 0.016), 0.6)
    if lesion is not None:  # follow-up: an irregular mass with internal texture
        t, rr = lesion
        py = cy + rr * a * np.sin(t) + rng.uniform(-0.04, 0.04) * h  # the other view sees it slightly elsewhere
        px = rr * b * abs(np.cos(t)) + rng.uniform(-0.04, 0.04) * w
        radius = s * rng.uniform(0.055, 0.085) * lesion_size
        mass = _blob(yy, xx, py, px, radius, max(0.8, s * 0.005), rng=rng, lobes=5, irregularity=0.3)
        halo = _blob(yy, xx, py, px, radius * 1.6, s * 0.02)  # spiculated surround: raised, streaky density
        texture = 1.0 + 0.2 * _smooth_noise(rng, (h, w), s / 80)
        streaks = np.clip(1 + _smooth_noise(rng, (h, w), 1.0), 0, None)
        img += breast * contrast * (rng.uniform(0.18, 0.28) * mass * texture + 0.06 * halo * streaks)
    img += 0.012 * rng.standard_normal((h, w))
    return np.clip(img, 0.0, 1.0)


def _write_png(path: Path, img: np.ndarray, bit_depth: int) -> None:
    from PIL import Image

    if bit_depth == 8:
        pil = Image.fromarray(np.round(img * 255).astype(np.uint8))
    else:
        pil = Image.fromarray(np.round(img * 65535).astype(np.uint16))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=6)
    path.write_bytes(buf.getvalue())


def _write_dicom(path: Path, img: np.ndarray, *, bit_depth: int, photometric: str, voi: str, uid_src: list[str],
                 patient_id: str, laterality: str, view: str, age: Any) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if bit_depth == 8:
        bits_alloc, bits_stored, offset, width = 8, 8, 60, 150
    else:
        bits_alloc, bits_stored, offset, width = 16, 12, 400, 3000
    v = 1.0 - img if photometric == "MONOCHROME1" else img
    raw = np.round(offset + v * width).astype(np.uint8 if bits_alloc == 8 else np.uint16)

    sop_uid = generate_uid(entropy_srcs=["pyquant-rsna-like-sop", *uid_src])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "PYQUANT_SYNTH"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MG_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["pyquant-rsna-like-study", uid_src[0], patient_id])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["pyquant-rsna-like-series", *uid_src])
    ds.Modality = "MG"
    ds.PatientID = patient_id
    ds.PatientAge = "" if age is None else f"{int(age):03d}Y"
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(raw.shape[0]), int(raw.shape[1])
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if voi == "window":
        # pydicom's LINEAR window maps [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] onto the full output range
        ds.WindowCenter = f"{offset + width / 2 + 0.5:g}"
        ds.WindowWidth = f"{width + 1:g}"
        ds.VOILUTFunction = "LINEAR"
    elif voi == "lut":
        n = 2**bits_stored
        lut = np.round(np.clip((np.arange(n) - offset) / width, 0, 1) * 65535).astype(np.uint16)
        item = Dataset()
        item.LUTDescriptor = [n if n < 65536 else 0, 0, 16]
        item.LUTExplanation = "pyquant synthetic"
        item.add_new(0x00283006, "US", [int(x) for x in lut])  # LUTData
        ds.VOILUTSequence = Sequence([item])
    elif voi != "none":
        raise ValueError(f"voi must be 'window', 'lut' or 'none', got {voi!r}")
    ds.PixelData = raw.tobytes()
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(buf, write_like_original=False)
    path.write_bytes(buf.getvalue())


def _written_with(marker: Path, params: dict) -> bool:
    """Whether the marker file of an earlier synthetic set records exactly `params` (False if unreadable)."""
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, json.JSONDecodeError):
        return False


def _prepare(root: Path, params: dict, exist_ok: bool, overwrite: bool, outputs: list[Path]) -> bool:
    """True when the set already exists with these parameters; clears an earlier synthetic set if overwrite."""
    marker = root / MARKER
    if marker.is_file():
        if exist_ok and _written_with(marker, params):
            return True
        if not overwrite:
            raise DataError(f"{root}: already holds a synthetic data set (see {MARKER}); pass overwrite=True to replace it")
        for p in outputs:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        marker.unlink()
    elif any(p.exists() for p in outputs):
        raise DataError(f"{root}: {', '.join(str(p.name) for p in outputs if p.exists())} already exist and were "
                        "not written by pyquant's generator; refusing to overwrite them")
    root.mkdir(parents=True, exist_ok=True)
    return False


def make_rsna_like(
    root: Union[str, Path],
    n_patients: int = 60,
    images_per_patient: int = 4,
    size: int = 128,
    seed: int = 0,
    fmt: str = "png",
    bit_depth: int = 8,
    *,
    photometric: str = "mixed",
    voi: str = "window",
    aspect: float = 0.8,
    csv: str = "train.csv",
    images: str = "train_images",
    contrast: float = 1.0,
    lesion_size: float = 1.0,
    label_noise: float = 0.0,
    prevalence: float = 1 / 3,
    exist_ok: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``root/csv`` (Kaggle columns) and ``root/images/...`` like the RSNA screening mammography data.

    ``fmt``: ``"png"`` (``<patient_id>/<image_id>.png``), ``"png-flat"`` (``<patient_id>_<image_id>.png``) or
    ``"dcm"`` (``<patient_id>/<image_id>.dcm``, Kaggle's layout). ``bit_depth`` 8 or 16 (DICOM: 8 or 12 bits stored
    in 16). DICOM only: ``photometric`` ``"MONOCHROME2"``, ``"MONOCHROME1"`` or ``"mixed"`` (alternating by patient),
    ``voi`` ``"window"`` (WindowCenter/Width), ``"lut"`` (VOILUTSequence) or ``"none"``; the stored values only span
    the display range after the VOI step, so a loader that skips it gets low-contrast images.
    Images are ``size`` high and ``round(size * aspect)`` wide. Patients: about 25 % aged 55 or over, 3 % without age;
    breasts (two views each): BI-RADS 0 / 1 / 2 / missing about 30 / 50 / 10 / 10 %, so the study's cohort is about
    2:1 negative:follow-up. ``exist_ok=True`` returns at once when ``root`` already holds this exact set.

    Difficulty (the defaults are the easy set, which a small CNN separates almost perfectly): ``contrast`` and
    ``lesion_size`` scale the follow-up mass's brightness and radius; ``label_noise`` is the fraction of labelled
    breasts whose recorded BI-RADS contradicts the image (a follow-up mass recorded as 1, or no mass recorded as 0:
    reader disagreement); ``prevalence`` is the fraction of labelled breasts that are BI-RADS 0 (the paper's RSNA
    cohort: 1/3) before the noise, so the recorded fraction is prevalence x (1 - noise) + (1 - prevalence) x noise.
    """
    if fmt not in ("png", "png-flat", "dcm"):
        raise ValueError(f"fmt must be 'png', 'png-flat' or 'dcm', got {fmt!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "mixed"):
        raise ValueError(f"photometric must be 'MONOCHROME1', 'MONOCHROME2' or 'mixed', got {photometric!r}")
    if voi not in ("window", "lut", "none"):
        raise ValueError(f"voi must be 'window', 'lut' or 'none', got {voi!r}")
    if n_patients < 1 or images_per_patient < 1 or size < 8:
        raise ValueError("need n_patients >= 1, images_per_patient >= 1 and size >= 8")
    if not (0 <= label_noise <= 1 and 0 < prevalence < 1 and contrast >= 0 and lesion_size > 0):
        raise ValueError("need 0 <= label_noise <= 1, 0 < prevalence < 1, contrast >= 0 and lesion_size > 0")
    root = Path(root)
    params = {"kind": "rsna-like", "version": 1, "n_patients": n_patients, "images_per_patient": images_per_patient,
              "size": size, "seed": seed, "fmt": fmt, "bit_depth": bit_depth, "photometric": photometric, "voi": voi,
              "aspect": aspect, "csv": csv, "images": images, "contrast": contrast, "lesion_size": lesion_size,
              "label_noise": label_noise, "prevalence": prevalence}
    if _prepare(root, params, exist_ok, overwrite, [root / csv, root / images]):
        return root
    h, w = int(size), max(8, int(round(size * aspect)))

    # Patient- and breast-level metadata first (one stream), then images (one stream per image).
    meta, noise = _rng(seed, 0), _rng(seed, 4)
    if n_patients > 55535:
        raise ValueError("n_patients must be at most 55,535 (five-digit Kaggle-style patient ids)")
    pids = 10000 + meta.choice(55535, size=n_patients, replace=False)
    iids = 10**6 + meta.choice(2**31 - 1 - 10**6, size=n_patients * images_per_patient, replace=False)
    patients = []
    for p in range(n_patients):
        u = meta.random()
        age = None if u < 0.03 else float(meta.integers(55, 81) if u < 0.28 else meta.integers(38, 55))
        breasts = {}
        for side in ("L", "R"):
            # 10 % unlabelled; the negatives are BI-RADS 2 and 1 at 1:5
            b, zero = meta.random(), 0.10 + 0.90 * prevalence
            birads = None if b < 0.10 else (0 if b < zero else (2 if b < zero + 0.90 * (1 - prevalence) / 6 else 1))
            lesion = (meta.uniform(0, 2 * np.pi), meta.uniform(0.15, 0.6)) if birads == 0 else None
            cancer = int(birads == 0 and meta.random() < 0.15)
            shown = birads  # what the image shows; "birads" is what the CSV records
            # its own stream: the noise changes the recorded labels only, never the images or the other metadata
            if birads is not None and noise.random() < label_noise:
                birads, cancer = (1 if birads == 0 else 0), 0
            breasts[side] = {"birads": birads, "shown": shown, "lesion": lesion, "cancer": cancer}
        patients.append({"age": age, "breasts": breasts, "density": int(meta.integers(0, 4)), "site": int(meta.integers(1, 3))})
    # Make sure every filter and both classes are exercised in small sets.
    if n_patients >= 4:
        if not any(p["age"] is not None and p["age"] >= 55 for p in patients):
            patients[-1]["age"] = 61.0
        if not any(b["birads"] is None for p in patients for b in p["breasts"].values()):
            patients[1]["breasts"]["R"].update(birads=None, shown=None, lesion=None, cancer=0)
        in_cohort = [p for p in patients[:-1] if p["age"] is not None and p["age"] < 55]
        if not in_cohort:
            patients[0]["age"] = 45.0
            in_cohort = [patients[0]]
        labels = {b["birads"] for p in in_cohort for b in p["breasts"].values()}
        if 0 not in labels:
            in_cohort[0]["breasts"]["L"].update(birads=0, shown=0, lesion=(1.0, 0.4), cancer=0)
        if not labels & {1, 2}:
            in_cohort[-1]["breasts"]["R"].update(birads=1, shown=1, lesion=None, cancer=0)

    img_dir = root / images
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    k = 0
    for p, info in enumerate(patients):
        pid = str(int(pids[p]))
        mono = photometric if photometric != "mixed" else ("MONOCHROME1" if p % 2 else "MONOCHROME2")
        for j in range(images_per_patient):
            side, view = VIEWS[j % 4]
            iid = str(int(iids[k]))
            k += 1
            br = info["breasts"][side]
            img = _mammogram(_rng(seed, 1, p, j), h, w, side, view, info["density"], br["shown"], br["lesion"],
                             contrast, lesion_size)
            if fmt == "dcm":
                (img_dir / pid).mkdir(exist_ok=True)
                _write_dicom(img_dir / pid / f"{iid}.dcm", img, bit_depth=bit_depth, photometric=mono, voi=voi,
                             uid_src=[str(seed), pid, iid], patient_id=pid, laterality=side, view=view, age=info["age"])
            elif fmt == "png":
                (img_dir / pid).mkdir(exist_ok=True)
                _write_png(img_dir / pid / f"{iid}.png", img, bit_depth)
            else:
                _write_png(img_dir / f"{pid}_{iid}.png", img, bit_depth)
            rows.append({
                "site_id": info["site"], "patient_id": pid, "image_id": iid, "laterality": side, "view": view,
                "age": "" if info["age"] is None else f"{info['age']:.1f}", "cancer": br["cancer"],
                "biopsy": br["cancer"], "invasive": br["cancer"],
                "BIRADS": "" if br["birads"] is None else br["birads"], "implant": 0,
                "density": DENSITY[info["density"]] if br["birads"] is not None else "", "machine_id": 49,
                "difficult_negative_case": "False",
            })
    buf = io.StringIO()
    writer = csv_lib.DictWriter(buf, fieldnames=list(RSNA_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (root / csv).write_text(buf.getvalue())
    (root / MARKER).write_text(json.dumps(params, sort_keys=True, indent=1) + "\n")
    return root


def _ct_patch(rng: np.random.Generator, s: int, nodule: tuple[float, float, float, float] | None) -> np.ndarray:
    """A [0, 1] lung-CT-like patch: dark parenchyma, bright vessels, sometimes chest wall, optional nodule."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    img = 0.12 + 0.03 * _smooth_noise(rng, (s, s), s / 25)
    for _ in range(int(rng.integers(1, 5))):  # vessels: gently curved bright tubes
        y0, x0, ang = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0, np.pi)
        curv = rng.uniform(-0.004, 0.004)
        d = (yy - y0) * np.cos(ang) - (xx - x0) * np.sin(ang)
        along = (yy - y0) * np.sin(ang) + (xx - x0) * np.cos(ang)
        d = d - curv * along**2
        width = rng.uniform(0.7, 1.8)
        img += rng.uniform(0.2, 0.4) * np.exp(-0.5 * (d / width) ** 2)
    if rng.random() < 0.3:  # chest wall on one side
        side = int(rng.integers(0, 4))
        coord = [yy, xx, (s - 1) - yy, (s - 1) - xx][side]
        edge = s * rng.uniform(0.05, 0.25) + 3 * _smooth_noise(rng, (s, s), s / 10)
        img = np.where(coord < edge, 0.55 + 0.05 * _smooth_noise(rng, (s, s), 3), img)
    if nodule is not None:
        cy, cx, r, amp = nodule
        img += amp * _blob(yy, xx, cy, cx, r, 0.8, rng=rng, lobes=3, irregularity=0.12)
    img += 0.015 * rng.standard_normal((s, s))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def make_lidc_like(
    path: Union[str, Path],
    n: int = 400,
    seed: int = 0,
    *,
    size: int = 128,
    patches_per_series: int = 8,
    exist_ok: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write an LIDC patch pickle like the Probabilistic U-Net project's ``data_lidc.pickle``.

    ``{name: {"image": size x size float32 in [0, 1], "masks": [4 x uint8 {0, 1}], "series_uid": str}}``, about
    ``patches_per_series`` patches per series. About 70 % of patches hold a nodule (radius 2.5-11 px); each of the four
    raters marks it with a probability rising with its size and contrast, so small faint nodules get 1-2 votes, and
    10 % of the other patches get one rater's false mark on a vessel. At the study's 2-of-4 threshold about 60 % of
    the patches are positive. ``exist_ok=True`` returns at once when this exact file was already written.
    """
    if n < 1 or size < 16 or patches_per_series < 1:
        raise ValueError("need n >= 1, size >= 16 and patches_per_series >= 1")
    path = Path(path)
    params = {"kind": "lidc-like", "version": 1, "n": n, "seed": seed, "size": size,
              "patches_per_series": patches_per_series, "file": path.name}
    marker = path.with_name(path.name + ".json")
    if path.exists():
        if exist_ok and _written_with(marker, params):
            return path
        if not overwrite:
            raise DataError(f"{path}: already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)

    meta = _rng(seed, 2)
    n_series = max(1, int(np.ceil(n / patches_per_series)))
    series = ["1.3.6.1.4.1.14519.5.2.1.6279.6001." + "".join(str(d) for d in meta.integers(0, 10, size=30))
              for _ in range(n_series)]
    data: dict[str, dict[str, Any]] = {}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for i in range(n):
        rng = _rng(seed, 3, i)
        s_idx = i * n_series // n
        nodule = None
        masks = [np.zeros((size, size), np.uint8) for _ in range(4)]
        if rng.random() < 0.7:
            r = rng.uniform(2.5, 11.0) * size / 128
            amp = rng.uniform(0.25, 0.6)
            c = size / 2
            cy, cx = c + rng.uniform(-0.2, 0.2) * size, c + rng.uniform(-0.2, 0.2) * size
            nodule = (cy, cx, r, amp)
            p_mark = 1.0 / (1.0 + np.exp(-((r * 128 / size - 4.5) * 1.4 + (amp - 0.3) * 14)))
            for m in masks:
                if rng.random() < p_mark:
                    rr = r * rng.uniform(0.85, 1.15)
                    oy, ox = rng.normal(0, 0.7, size=2)
                    m[((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) <= rr * rr] = 1
        elif rng.random() < 0.10:
            cy, cx = rng.uniform(0.3, 0.7, size=2) * size
            masks[int(rng.integers(0, 4))][((yy - cy) ** 2 + (xx - cx) ** 2) <= 9] = 1
        img = _ct_patch(rng, size, nodule)
        data[f"LIDC-like-{s_idx:04d}_patch{i:05d}"] = {"image": img, "masks": masks, "series_uid": series[s_idx]}
    path.write_bytes(pickle.dumps(data, protocol=4))
    marker.write_text(json.dumps(params, sort_keys=True, indent=1) + "\n")
    return path
