"""Reading PNG and DICOM images into float32 arrays in [0, 1], and resizing them.

PNG: 8-bit images are divided by 255 and 16-bit ones by 65535 (they are display-ready conversions); colour or
palette images are converted to grey first.

DICOM (through pydicom): modality LUT / rescale, then the VOI LUT when the file has one, else the window
(WindowCenter/WindowWidth, first value, VOILUTFunction honoured), each mapped to [0, 1] over its own output range;
a file with neither is min-max scaled. MONOCHROME1 is inverted afterwards so that bright always means dense.
Compressed transfer syntaxes (the Kaggle RSNA files are JPEG 2000 / JPEG lossless) need pydicom's optional decoders,
e.g. ``pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg`` or ``python-gdcm``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from pyquant.data.errors import DataError, MissingDataError

DICOM_SUFFIXES = (".dcm", ".dicom")
Size = Union[int, Sequence[int]]


def _size_hw(size: Size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return h, w


def read_png(path: Union[str, Path]) -> np.ndarray:
    """Any image PIL reads (PNG in practice), as a 2-D float32 array in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode.startswith("I;16"):
                arr = np.asarray(im).astype(np.float32) / 65535.0
            elif mode == "I":  # 16-bit PNGs on some Pillow versions
                arr = np.clip(np.asarray(im, dtype=np.float64), 0, 65535).astype(np.float32) / 65535.0
            elif mode == "F":
                arr = np.asarray(im, dtype=np.float32)
            elif mode == "1":
                arr = np.asarray(im, dtype=np.float32)
            else:
                if mode != "L":
                    im = im.convert("L")
                arr = np.asarray(im).astype(np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{path}: expected a 2-D grey image, got shape {arr.shape}")
    return np.clip(arr, 0.0, 1.0)


def _voi_functions():
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _lut_values(item) -> np.ndarray:
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        bits = int(item.LUTDescriptor[2])
        return np.frombuffer(bytes(data), dtype="<u2" if bits > 8 else np.uint8)
    return np.asarray(data, dtype=np.float64).ravel()


def _window_range(ds) -> tuple[float, float]:
    """The output range of pydicom's apply_windowing for this dataset (PS3.3 C.11.2.1.2)."""
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


# the attributes that map stored values to grey levels: a non-finite one makes every pixel NaN or 0
GREY_LEVEL_ATTRIBUTES = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")


def _check_grey_level_attributes(ds, path: Path) -> None:
    for name in GREY_LEVEL_ATTRIBUTES:
        value = ds.get(name)
        if value is None:
            continue
        for v in [value] if isinstance(value, (str, bytes, int, float)) else value:  # else multi-valued
            try:
                ok = math.isfinite(float(v))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise DataError(f"{path}: {name} is {value!r}, not a finite number: the image cannot be mapped to "
                                "grey levels (it would come out all black); fix or remove the file")


def read_dicom(path: Union[str, Path]) -> np.ndarray:
    """A single-frame grey DICOM image as a 2-D float32 array in [0, 1] (VOI applied, MONOCHROME1 inverted)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: DICOM file not found")
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{path}: reading DICOM needs pydicom (pip install pydicom)") from e
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: cannot read DICOM file ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as e:  # decoders raise many kinds of errors
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", ts)
        raise DataError(
            f"{path}: cannot decode DICOM pixel data (transfer syntax {ts_name}; compressed files need a "
            f"decoder such as pylibjpeg + pylibjpeg-openjpeg or python-gdcm): {type(e).__name__}: {e}"
        ) from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{path}: expected a MONOCHROME1/MONOCHROME2 image, got PhotometricInterpretation {photometric}")
    if arr.ndim == 3:  # multi-frame: take the first frame
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{path}: expected a 2-D image, got pixel array of shape {arr.shape}")

    _check_grey_level_attributes(ds, path)
    apply_modality_lut, apply_voi_lut = _voi_functions()
    try:
        x = apply_modality_lut(arr, ds)  # unchanged ints when there is no rescale (VOI LUTs index ints)
        seq = ds.get("VOILUTSequence")
        has_lut = bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None
        has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
        if has_lut:
            lut = _lut_values(seq[0])
            lo, hi = float(lut.min()), float(lut.max())
            x = np.asarray(apply_voi_lut(x, ds, prefer_lut=True), dtype=np.float64)
        elif has_window:
            lo, hi = _window_range(ds)
            x = np.asarray(apply_voi_lut(x, ds), dtype=np.float64)
        else:
            x = np.asarray(x, dtype=np.float64)
            lo, hi = float(x.min()), float(x.max())
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise DataError(f"{path}: invalid VOI / modality LUT attributes ({type(e).__name__}: {e})") from e
    if not (math.isfinite(lo) and math.isfinite(hi) and np.isfinite(x).all()):  # e.g. a LUT of odd values
        raise DataError(f"{path}: the modality / VOI transforms give non-finite grey levels; fix or remove the file")
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    x = np.clip(x, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        x = 1.0 - x
    return x.astype(np.float32)


def read_image(path: Union[str, Path]) -> np.ndarray:
    """DICOM (``.dcm``/``.dicom``) or PNG/other raster image as a 2-D float32 array in [0, 1]."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(path)
    return read_png(path)


def resize_image(arr: np.ndarray, size: Size) -> np.ndarray:
    """Resize a 2-D float array to ``size`` (int: square, or (height, width)), bilinear with antialiasing."""
    h, w = _size_hw(size)
    if arr.shape == (h, w):
        return np.asarray(arr, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].clamp_(0.0, 1.0).numpy()


def to_uint16(arr: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint16 (the cache's storage; 1/65535 resolution)."""
    return np.round(np.clip(arr, 0.0, 1.0) * 65535.0).astype(np.uint16)
