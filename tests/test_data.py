"""pyquant.data: loaders on generated files in every format, the cohort and label rules, the cache, patient splits,
generator determinism, and the error messages for bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import pyquant.data as pd_
import pyquant.data.rsna as rsna_mod
from pyquant.data import (
    DataError,
    LIDCPatches,
    MissingDataError,
    RSNAMammography,
    load_split,
    make_lidc_like,
    make_rsna_like,
    patient_split,
    save_split,
)

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("PIL")

N_PATIENTS, GEN_SIZE, LOAD_SIZE, SEED = 8, 48, 32, 3
FORMATS = [  # (id, make_rsna_like kwargs)
    ("png", dict(fmt="png")),
    ("png-flat", dict(fmt="png-flat")),
    ("dcm-mono1", dict(fmt="dcm", photometric="MONOCHROME1")),
    ("dcm-mono2", dict(fmt="dcm", photometric="MONOCHROME2")),
]
CASES = [(f"{name}-{bits}", dict(kw, bit_depth=bits)) for name, kw in FORMATS for bits in (8, 16)]


def _make(root: Path, **kw) -> Path:
    args = dict(n_patients=N_PATIENTS, size=GEN_SIZE, seed=SEED)
    args.update(kw)
    return make_rsna_like(root, **args)


@pytest.fixture(scope="module")
def rsna_sets(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("rsna")
    return {case: _make(base / case, **kw) for case, kw in CASES}


@pytest.fixture(scope="module")
def lidc_file(tmp_path_factory) -> Path:
    return make_lidc_like(tmp_path_factory.mktemp("lidc") / "data_lidc.pickle", n=60, seed=SEED, size=32)


def _csv_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


def _expected_cohort(root: Path, max_age: float = 55) -> list[tuple[str, str, int]]:
    """(patient_id, image_id, label) by the study's rule, computed independently of the loader."""
    out = []
    for r in _csv_rows(root):
        if r["age"] == "" or float(r["age"]) >= max_age or r["BIRADS"] == "":
            continue
        b = int(float(r["BIRADS"]))
        if b in (0, 1, 2):
            out.append((r["patient_id"], r["image_id"], 1 if b == 0 else 0))
    return out


# -- RSNA loader in every format -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_rsna_formats_shape_range_labels(rsna_sets, case):
    root = rsna_sets[case]
    ds = RSNAMammography(root, size=LOAD_SIZE, cache=False)
    expected = _expected_cohort(root)
    assert len(ds) == len(expected) > 0
    assert [(p, i) for p, i, _ in expected] == list(zip(ds.patient_ids, ds.image_ids))
    assert ds.labels.dtype == torch.long
    assert ds.labels.tolist() == [lab for _, _, lab in expected]
    for i in (0, len(ds) - 1):
        img, label = ds[i]
        assert img.shape == (1, LOAD_SIZE, LOAD_SIZE) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        assert float(img.max()) > 0.3  # tissue is bright, background dark: not inverted or washed out
        assert float(img[0, :, :].mean()) < 0.6
        assert isinstance(label, int) and label == int(ds.labels[i])
    # files are where the format puts them
    suffix = ".dcm" if case.startswith("dcm") else ".png"
    p0 = ds.paths[0]
    assert p0.suffix == suffix
    if case.startswith("png-flat"):
        assert p0.parent.name == "train_images" and p0.name == f"{ds.patient_ids[0]}_{ds.image_ids[0]}.png"
    else:
        assert p0.parent.name == ds.patient_ids[0]


def test_rsna_non_square_size(rsna_sets):
    ds = RSNAMammography(rsna_sets["png-8"], size=(40, 24), cache=False)
    assert ds[0][0].shape == (1, 40, 24)


def test_png_bit_depth_and_dicom_attributes(rsna_sets):
    from PIL import Image

    png8 = next((rsna_sets["png-8"] / "train_images").rglob("*.png"))
    png16 = next((rsna_sets["png-16"] / "train_images").rglob("*.png"))
    with Image.open(png8) as a, Image.open(png16) as b:
        assert a.mode == "L" and b.mode.startswith("I")
        assert a.size == (round(GEN_SIZE * 0.8), GEN_SIZE)  # non-square, like mammograms
    for case, mono, bits_stored in [("dcm-mono1-16", "MONOCHROME1", 12), ("dcm-mono2-8", "MONOCHROME2", 8)]:
        f = next((rsna_sets[case] / "train_images").rglob("*.dcm"))
        ds = pydicom.dcmread(f)
        assert ds.PhotometricInterpretation == mono and int(ds.BitsStored) == bits_stored
        assert "WindowCenter" in ds and "WindowWidth" in ds and ds.Modality == "MG"


@pytest.mark.parametrize("case", ["dcm-mono1-16", "dcm-mono2-16", "dcm-mono1-8", "dcm-mono2-8"])
def test_dicom_windowing_and_inversion_match_png(rsna_sets, case):
    """The same seed writes the same pictures; after VOI windowing and MONOCHROME1 inversion, DICOM must give the
    PNG's intensities (up to the coarser 8-bit quantisation)."""
    png = RSNAMammography(rsna_sets["png-16"], size=LOAD_SIZE, cache=False).tensors()[0]
    dcm = RSNAMammography(rsna_sets[case], size=LOAD_SIZE, cache=False).tensors()[0]
    tol = 2e-3 if case.endswith("16") else 6e-3
    assert float((png - dcm).abs().max()) < tol
    # Skipping the window would give a visibly different (low-contrast) image.
    f = next((rsna_sets[case] / "train_images").rglob("*.dcm"))
    ds = pydicom.dcmread(f)
    naive = ds.pixel_array.astype(np.float64) / (2 ** int(ds.BitsStored) - 1)
    windowed = pd_.read_dicom(f)
    assert np.abs(naive - windowed).max() > 0.1


def test_dicom_voi_lut_sequence(tmp_path, rsna_sets):
    png = RSNAMammography(rsna_sets["png-16"], size=LOAD_SIZE, cache=False).tensors()[0]
    for mono in ("MONOCHROME1", "MONOCHROME2"):
        root = _make(tmp_path / mono, fmt="dcm", bit_depth=16, voi="lut", photometric=mono)
        f = next((root / "train_images").rglob("*.dcm"))
        meta = pydicom.dcmread(f)
        assert "VOILUTSequence" in meta and "WindowCenter" not in meta
        dcm = RSNAMammography(root, size=LOAD_SIZE, cache=False).tensors()[0]
        assert float((png - dcm).abs().max()) < 2e-3


def test_dicom_without_voi_is_min_max_scaled(tmp_path):
    root = _make(tmp_path / "none", fmt="dcm", bit_depth=16, voi="none", photometric="MONOCHROME1")
    f = next((root / "train_images").rglob("*.dcm"))
    x = pd_.read_dicom(f)
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert x[0, 0] < 0.2 or x[0, -1] < 0.2  # MONOCHROME1 inverted: background (a corner) dark


# -- cohort ----------------------------------------------------------------------------------------------------
def test_cohort_filters(rsna_sets):
    root = rsna_sets["png-8"]
    rows = _csv_rows(root)
    ds = RSNAMammography(root, size=LOAD_SIZE, cache=False)
    s = ds.cohort_summary
    assert s["rows"] == len(rows) == N_PATIENTS * 4
    # the generator makes sure every filter removes something
    assert any(r["age"] == "" or float(r["age"]) >= 55 for r in rows)
    assert any(r["BIRADS"] == "" for r in rows if r["age"] != "" and float(r["age"]) < 55)
    assert s["rows"] > s["age_below_max"] > s["with_birads"] == s["images"] == len(ds)
    assert s["follow_up"] == int(ds.labels.sum()) > 0 and s["negative"] > 0
    ages = {r["patient_id"]: float(r["age"]) for r in rows if r["age"]}
    assert all(ages[p] < 55 for p in ds.patient_ids)
    assert set(ds.birads) <= {0, 1, 2}
    assert all((b == 0) == bool(lab) for b, lab in zip(ds.birads, ds.labels.tolist()))
    older = RSNAMammography(root, size=LOAD_SIZE, max_age=200, cache=False)
    assert len(older) == len(_expected_cohort(root, 200)) > len(ds)


def test_csv_value_formats(tmp_path, rsna_sets):
    """Kaggle writes floats ("61.0", "1.0") and blank cells; case and hyphen in the BI-RADS header are tolerated."""
    root = tmp_path / "r"
    root.mkdir()
    (root / "train_images").symlink_to(rsna_sets["png-8"] / "train_images")
    rows = _csv_rows(rsna_sets["png-8"])
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "image_id", "Age", "BI-RADS"])
        for r in rows:
            w.writerow([r["patient_id"], r["image_id"], r["age"], f"{float(r['BIRADS']):.1f}" if r["BIRADS"] else "nan"])
    ds = RSNAMammography(root, size=LOAD_SIZE, cache=False)
    ref = RSNAMammography(rsna_sets["png-8"], size=LOAD_SIZE, cache=False)
    assert ds.image_ids == ref.image_ids and torch.equal(ds.labels, ref.labels)


# -- cache -----------------------------------------------------------------------------------------------------
def test_cache_reused_and_invalidated(tmp_path, monkeypatch):
    root = _make(tmp_path / "c", fmt="png", bit_depth=8)
    first = RSNAMammography(root, size=LOAD_SIZE)
    assert not first.from_cache and first.cache_path.is_file()
    assert first.cache_path.parent == root / ".pyquant_cache"

    def boom(*a, **k):
        raise AssertionError("image decoded although the cache is valid")

    monkeypatch.setattr(rsna_mod, "_load_one", boom)
    second = RSNAMammography(root, size=LOAD_SIZE)
    assert second.from_cache and second.cache_path == first.cache_path
    assert torch.equal(first.tensors()[0], second.tensors()[0]) and torch.equal(first.labels, second.labels)
    # a split selects from the cached cohort without decoding again
    assert RSNAMammography(root, size=LOAD_SIZE, split="val").from_cache
    # changing a setting or a file invalidates it
    with pytest.raises(AssertionError, match="decoded"):
        RSNAMammography(root, size=LOAD_SIZE + 8)
    with pytest.raises(AssertionError, match="decoded"):
        RSNAMammography(root, size=LOAD_SIZE, max_age=60)
    monkeypatch.undo()
    f = first.paths[0]
    f.write_bytes(f.read_bytes() + b"\0")  # trailing garbage after IEND: still a PNG, but a different file
    third = RSNAMammography(root, size=LOAD_SIZE)
    assert not third.from_cache and third.cache_path != first.cache_path
    assert not RSNAMammography(root, size=LOAD_SIZE, cache=False).from_cache
    alt = tmp_path / "elsewhere"
    assert RSNAMammography(root, size=LOAD_SIZE, cache=alt).cache_path.parent == alt


def test_corrupt_cache_is_rebuilt(tmp_path):
    root = _make(tmp_path / "c", fmt="png-flat", bit_depth=8)
    first = RSNAMammography(root, size=LOAD_SIZE)
    first.cache_path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = RSNAMammography(root, size=LOAD_SIZE)
    assert not again.from_cache and torch.equal(first.tensors()[0], again.tensors()[0])


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("unexpected pos 3520 vs 3414")],
                         ids=["ENOSPC", "torch-RuntimeError"])
def test_cache_write_failure_loads_uncached_and_leaves_no_partial_file(tmp_path, monkeypatch, error):
    """A full disk while writing the cache: the images still load, a warning names the cache file, the
    temporary file is removed, and a cache already there is kept."""
    root = _make(tmp_path / "c", fmt="png", bit_depth=8)
    old = RSNAMammography(root, size=LOAD_SIZE).cache_path
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"the first bytes") if hasattr(f, "write") else Path(f).write_bytes(b"the first bytes")  # partial, then the failure
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.warns(UserWarning, match="cannot write cache") as caught:
        ds = RSNAMammography(root, size=LOAD_SIZE + 8)
    if isinstance(error, OSError):
        assert f"no space left on {ds.cache_path}" in str(caught[0].message)
    monkeypatch.setattr(torch, "save", real_save)
    assert len(ds) > 0 and not ds.cache_path.exists()
    assert sorted(p.name for p in old.parent.iterdir()) == [old.name]  # no .tmp left, the old cache kept
    assert RSNAMammography(root, size=LOAD_SIZE).from_cache


# -- splits ----------------------------------------------------------------------------------------------------
def test_patient_split_properties():
    rng = np.random.default_rng(0)
    ids = [f"p{int(i)}" for i in rng.integers(0, 50, size=400)]
    s = patient_split(ids, seed=7)
    assert sorted(s) == ["test", "train", "val"]
    assert sorted(i for v in s.values() for i in v) == list(range(len(ids)))
    pats = {k: {ids[i] for i in v} for k, v in s.items()}
    assert not (pats["train"] & pats["val"] or pats["train"] & pats["test"] or pats["val"] & pats["test"])
    n = len(set(ids))
    assert [len(pats[k]) for k in ("train", "val", "test")] == [round(0.6 * n), round(0.2 * n), n - round(0.6 * n) - round(0.2 * n)]
    assert patient_split(ids, seed=7) == s
    rev = patient_split(list(reversed(ids)), seed=7)
    assert {k: {ids[::-1][i] for i in v} for k, v in rev.items()} == pats
    assert patient_split(ids, seed=8) != s
    # the paper's 3,199 subjects give [1919, 640, 640]
    big = patient_split([str(i) for i in range(3199)], seed=0)
    assert [len(big[k]) for k in ("train", "val", "test")] == [1919, 640, 640]
    tiny = patient_split(["a", "b", "c"], seed=0)
    assert all(len(v) == 1 for v in tiny.values())
    with pytest.raises(ValueError, match="fractions"):
        patient_split(ids, 0, fractions=(0.5, 0.2, 0.2))


def test_split_save_load_round_trip(tmp_path):
    ids = [f"p{i // 3}" for i in range(60)]
    s = patient_split(ids, seed=1)
    path = save_split(tmp_path / "run" / "split.json", s, ids, meta={"seed": 1})
    assert load_split(path) == s
    assert load_split(path, ids) == s
    doc = json.loads(path.read_text())
    assert doc["meta"] == {"seed": 1} and set(doc["patients"]) == {"train", "val", "test"}
    # indices are rebuilt from patient membership when the items come in another order
    perm = list(reversed(ids))
    re = load_split(path, perm)
    assert {k: {perm[i] for i in v} for k, v in re.items()} == {k: {ids[i] for i in v} for k, v in s.items()}
    with pytest.raises(DataError, match=r"split\.json.*not in the split file"):
        load_split(path, ids + ["stranger"])
    plain = save_split(tmp_path / "plain.json", s)
    assert load_split(plain, ids) == s
    bad = dict(s)
    bad["val"] = s["val"] + [s["train"][0]]
    save_split(tmp_path / "bad.json", bad)
    with pytest.raises(DataError, match=r"bad\.json: patient .* is in both"):
        load_split(tmp_path / "bad.json", ids)
    with pytest.raises(MissingDataError, match=r"nope\.json: split file not found"):
        load_split(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match=r"junk\.json: cannot read split file"):
        load_split(tmp_path / "junk.json")


def test_dataset_splits_disjoint_and_reused(tmp_path, rsna_sets):
    root = rsna_sets["png-8"]
    split_file = tmp_path / "run" / "split.json"
    parts = {k: RSNAMammography(root, size=LOAD_SIZE, split=k, seed=5, split_file=split_file) for k in ("train", "val", "test")}
    assert split_file.is_file()
    allds = RSNAMammography(root, size=LOAD_SIZE, cache=False)
    assert sum(len(p) for p in parts.values()) == len(allds)
    pats = {k: set(p.patient_ids) for k, p in parts.items()}
    assert not (pats["train"] & pats["val"] or pats["train"] & pats["test"] or pats["val"] & pats["test"])
    assert all(len(p) > 0 for p in parts.values())
    # same as patient_split over the cohort with that seed; the saved file wins over a different seed later
    assert parts["val"].indices == patient_split(allds.patient_ids, 5)["val"]
    again = RSNAMammography(root, size=LOAD_SIZE, split="val", seed=99, split_file=split_file)
    assert again.image_ids == parts["val"].image_ids
    img, lab = parts["test"][0]
    j = allds.image_ids.index(parts["test"].image_ids[0])
    assert torch.equal(img, allds[j][0]) and lab == allds[j][1]
    with pytest.raises(ValueError, match="split must be"):
        RSNAMammography(root, size=LOAD_SIZE, split="validation")


# -- LIDC ------------------------------------------------------------------------------------------------------
def test_lidc_patches(lidc_file):
    with open(lidc_file, "rb") as f:
        raw = pickle.load(f)
    ds = LIDCPatches(lidc_file)
    assert len(ds) == len(raw) == 60
    votes = [sum(int(np.asarray(m).any()) for m in v["masks"]) for v in raw.values()]
    assert ds.votes.tolist() == votes
    assert ds.labels.tolist() == [int(v >= 2) for v in votes]
    assert ds.patient_ids == [v["series_uid"] for v in raw.values()]
    assert 0 < int(ds.labels.sum()) < len(ds)
    img, label = ds[0]
    assert img.shape == (1, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert torch.equal(img[0], torch.from_numpy(next(iter(raw.values()))["image"]))
    for k in (1, 3, 4):
        assert LIDCPatches(lidc_file, min_raters=k).labels.tolist() == [int(v >= k) for v in votes]
    assert int(LIDCPatches(lidc_file, min_raters=1).labels.sum()) >= int(ds.labels.sum())
    with pytest.raises(ValueError, match="min_raters"):
        LIDCPatches(lidc_file, min_raters=5)
    parts = {k: LIDCPatches(lidc_file, split=k, seed=2) for k in ("train", "val", "test")}
    series = {k: set(p.patient_ids) for k, p in parts.items()}
    assert not (series["train"] & series["val"] or series["train"] & series["test"] or series["val"] & series["test"])
    assert sum(len(p) for p in parts.values()) == len(ds)


def test_lidc_folder_of_pickles(tmp_path, lidc_file):
    with open(lidc_file, "rb") as f:
        raw = pickle.load(f)
    items = list(raw.items())
    (tmp_path / "a.pickle").write_bytes(pickle.dumps(dict(items[:25])))
    (tmp_path / "b.pickle").write_bytes(pickle.dumps(dict(items[25:])))
    ds = LIDCPatches(tmp_path)
    assert ds.names == [k for k, _ in items] and torch.equal(ds.labels, LIDCPatches(lidc_file).labels)


def test_lidc_generator_defaults_structure(tmp_path):
    p = make_lidc_like(tmp_path / "d.pickle", n=12, seed=0)
    raw = pickle.loads(p.read_bytes())
    v = next(iter(raw.values()))
    assert set(v) == {"image", "masks", "series_uid"}
    assert v["image"].shape == (128, 128) and v["image"].dtype == np.float32
    assert len(v["masks"]) == 4 and all(m.shape == (128, 128) and set(np.unique(m)) <= {0, 1} for m in v["masks"])


# -- tabular ---------------------------------------------------------------------------------------------------
def test_breast_cancer_tabular(tmp_path):
    pytest.importorskip("sklearn")
    tr = pd_.breast_cancer_tabular("train", seed=0)
    va = pd_.breast_cancer_tabular("val", seed=0)
    te = pd_.breast_cancer_tabular("test", seed=0)
    everything = pd_.breast_cancer_tabular(seed=0)
    assert (len(tr), len(va), len(te), len(everything)) == (341, 114, 114, 569)
    assert int(everything.labels.sum()) == 212  # label 1 = malignant
    x, y = tr[0]
    assert x.shape == (30,) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.allclose(tr.features.mean(0), torch.zeros(30), atol=1e-5)
    assert torch.allclose(tr.features.std(0, unbiased=False), torch.ones(30), atol=1e-4)
    assert not torch.allclose(te.features.mean(0), torch.zeros(30), atol=1e-3)  # test stats are not used
    assert torch.equal(everything.features[te.indices], te.features)
    assert torch.equal(tr.mean, te.mean)
    assert not set(tr.patient_ids) & set(te.patient_ids) and not set(tr.patient_ids) & set(va.patient_ids)
    other = pd_.breast_cancer_tabular("train", seed=1)
    assert other.indices != tr.indices and not torch.equal(other.mean, tr.mean)
    f = tmp_path / "tab_split.json"
    a = pd_.breast_cancer_tabular("test", seed=4, split_file=f)
    b = pd_.breast_cancer_tabular("test", seed=123, split_file=f)
    assert a.indices == b.indices and torch.equal(a.features, b.features)


# -- generator determinism -------------------------------------------------------------------------------------
def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".pyquant_cache" not in p.parts
    }


@pytest.mark.parametrize("fmt,bits", [("png", 16), ("png-flat", 8), ("dcm", 16), ("dcm", 8)])
def test_rsna_generator_deterministic(tmp_path, fmt, bits):
    a = _digest(_make(tmp_path / "a", n_patients=4, fmt=fmt, bit_depth=bits))
    b = _digest(_make(tmp_path / "b", n_patients=4, fmt=fmt, bit_depth=bits))
    c = _digest(_make(tmp_path / "c", n_patients=4, fmt=fmt, bit_depth=bits, seed=SEED + 1))
    assert a == b and len(a) == 4 * 4 + 2  # images + train.csv + marker
    assert a != c


def _pixels(root: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    return {p.stem: np.asarray(Image.open(p), dtype=np.float64) for p in sorted((root / "train_images").rglob("*.png"))}


def test_rsna_difficulty_knobs(tmp_path):
    """contrast and lesion_size act on the follow-up mass only, label_noise on the recorded labels only, prevalence
    on the share of BI-RADS 0; the same knobs and seed give the same bytes."""
    easy = dict(n_patients=12, size=32)
    base = _make(tmp_path / "base", **easy)
    noisy = dict(easy, contrast=0.5, lesion_size=0.7, label_noise=0.3)
    assert _digest(_make(tmp_path / "n1", **noisy)) == _digest(_make(tmp_path / "n2", **noisy))
    # contrast 0: the follow-up breasts' images lose their mass, every other image keeps its bytes
    flat = _make(tmp_path / "flat", **easy, contrast=0.0)
    rows, a, b = _csv_rows(base), _pixels(base), _pixels(flat)
    follow_up = {r["image_id"] for r in rows if r["BIRADS"] == "0"}
    assert follow_up and len(follow_up) < len(rows)
    assert all((a[i] != b[i]).any() == (i in follow_up) for i in a)
    # a larger lesion adds more brightness
    big = _pixels(_make(tmp_path / "big", **easy, lesion_size=1.6))
    assert sum(abs(big[i] - b[i]).sum() for i in follow_up) > 1.5 * sum(abs(a[i] - b[i]).sum() for i in follow_up)
    # label noise 1: every labelled breast's recorded label contradicts its image; images and metadata unchanged
    flipped = _make(tmp_path / "flip", **easy, label_noise=1.0)
    assert all((pixels == a[i]).all() for i, pixels in _pixels(flipped).items())
    for r, f in zip(rows, _csv_rows(flipped)):
        assert (r["image_id"], r["age"]) == (f["image_id"], f["age"])
        assert f["BIRADS"] == r["BIRADS"] == "" or (f["BIRADS"] == "0") != (r["BIRADS"] == "0")
    # prevalence: the share of BI-RADS 0 among labelled breasts (1/3 by default, the paper's RSNA cohort)
    def share(root):
        labels = [r["BIRADS"] for r in _csv_rows(root)[::2] if r["BIRADS"]]  # one row per breast (CC view)
        return labels.count("0") / len(labels)

    many = dict(n_patients=150, size=8, images_per_patient=2)
    assert 0.25 < share(_make(tmp_path / "p33", **many)) < 0.42
    assert 0.1 < share(_make(tmp_path / "p15", **many, prevalence=0.15)) < 0.2
    with pytest.raises(ValueError, match="prevalence"):
        _make(tmp_path / "bad", prevalence=1.0)


def test_lidc_generator_deterministic(tmp_path):
    a = make_lidc_like(tmp_path / "a.pickle", n=20, seed=1, size=32).read_bytes()
    b = make_lidc_like(tmp_path / "b.pickle", n=20, seed=1, size=32).read_bytes()
    c = make_lidc_like(tmp_path / "c.pickle", n=20, seed=2, size=32).read_bytes()
    assert a == b and a != c


def test_generators_exist_ok_and_overwrite(tmp_path):
    root = _make(tmp_path / "g", n_patients=4)
    csv_mtime = (root / "train.csv").stat().st_mtime_ns
    assert _make(root, n_patients=4, exist_ok=True) == root
    assert (root / "train.csv").stat().st_mtime_ns == csv_mtime  # nothing rewritten
    with pytest.raises(DataError, match="already holds a synthetic data set"):
        _make(root, n_patients=5, exist_ok=True)
    _make(root, n_patients=5, overwrite=True)
    assert len(_csv_rows(root)) == 20
    foreign = tmp_path / "real"
    (foreign / "train_images").mkdir(parents=True)
    with pytest.raises(DataError, match="not written by pyquant"):
        _make(foreign, n_patients=4, overwrite=True)
    p = make_lidc_like(tmp_path / "l.pickle", n=5, seed=0, size=32)
    assert make_lidc_like(p, n=5, seed=0, size=32, exist_ok=True) == p
    with pytest.raises(DataError, match=r"l\.pickle: already exists"):
        make_lidc_like(p, n=6, seed=0, size=32)


# -- errors ----------------------------------------------------------------------------------------------------
@pytest.fixture
def small_png(tmp_path) -> Path:
    return _make(tmp_path / "e", n_patients=4, fmt="png", bit_depth=8)


def test_error_missing_root_csv_images(tmp_path, small_png):
    with pytest.raises(MissingDataError, match=r"nowhere: data root folder not found"):
        RSNAMammography(tmp_path / "nowhere")
    with pytest.raises(MissingDataError, match=r"other\.csv: CSV file not found"):
        RSNAMammography(small_png, csv="other.csv")
    with pytest.raises(MissingDataError, match=r"test_images: image folder not found"):
        RSNAMammography(small_png, images="test_images")
    with pytest.raises(FileNotFoundError):  # MissingDataError is also a FileNotFoundError
        RSNAMammography(tmp_path / "nowhere")


def test_error_missing_image_file(small_png):
    ds = RSNAMammography(small_png, size=LOAD_SIZE, cache=False)
    gone = ds.paths[1]
    gone.unlink()
    with pytest.raises(MissingDataError, match=rf"image file missing for 1 of {len(ds)} cohort rows.*image_id={ds.image_ids[1]}"):
        RSNAMammography(small_png, size=LOAD_SIZE, cache=False)
    skipped = RSNAMammography(small_png, size=LOAD_SIZE, cache=False, on_missing="skip")
    assert len(skipped) == len(ds) - 1 and ds.image_ids[1] not in skipped.image_ids


def test_error_corrupt_png(small_png):
    ds = RSNAMammography(small_png, size=LOAD_SIZE, cache=False)
    bad = ds.paths[0]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(DataError, match=rf"{bad.name}: cannot read image"):
        RSNAMammography(small_png, size=LOAD_SIZE, cache=False)
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=rf"{bad.name}: cannot read image"):
        RSNAMammography(small_png, size=LOAD_SIZE, cache=False)


def test_error_corrupt_dicom(tmp_path):
    root = _make(tmp_path / "d", n_patients=4, fmt="dcm", bit_depth=16)
    ds = RSNAMammography(root, size=LOAD_SIZE, cache=False)
    bad = ds.paths[0]
    bad.write_bytes(b"garbage" * 20)
    with pytest.raises(DataError, match=rf"{bad.name}: cannot read DICOM file"):
        RSNAMammography(root, size=LOAD_SIZE, cache=False)
    good = ds.paths[1].read_bytes()
    bad.write_bytes(good[: len(good) - 500])  # pixel data cut short
    with pytest.raises(DataError, match=rf"{bad.name}: (cannot decode DICOM pixel data|cannot read DICOM file)"):
        RSNAMammography(root, size=LOAD_SIZE, cache=False)


def test_error_csv_columns_and_values(small_png):
    text = (small_png / "train.csv").read_text().splitlines()
    header = text[0].split(",")
    keep = [i for i, c in enumerate(header) if c not in ("age", "BIRADS")]
    (small_png / "cut.csv").write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in text) + "\n")
    with pytest.raises(DataError, match=r"cut\.csv: missing required column\(s\) age, BIRADS"):
        RSNAMammography(small_png, csv="cut.csv")
    (small_png / "empty.csv").write_text(text[0] + "\n")
    with pytest.raises(DataError, match=r"empty\.csv: CSV has a header but no data rows"):
        RSNAMammography(small_png, csv="empty.csv")
    age_col = header.index("age")
    line = text[1].split(",")
    line[age_col] = "forty"
    (small_png / "text.csv").write_text("\n".join([text[0], ",".join(line)]) + "\n")
    with pytest.raises(DataError, match=r"text\.csv:2: column age has a non-numeric value 'forty'"):
        RSNAMammography(small_png, csv="text.csv")


def test_error_empty_cohort_names_the_filter(small_png):
    rows = _csv_rows(small_png)
    fields = list(rows[0])

    def write(name, rows_):
        with open(small_png / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows_)

    write("old.csv", [dict(r, age="70.0") for r in rows])
    with pytest.raises(DataError, match=r"old\.csv: empty cohort: the age filter \(age < 55\) removed all 16 rows"):
        RSNAMammography(small_png, csv="old.csv")
    write("nobirads.csv", [dict(r, age="40.0", BIRADS="") for r in rows])
    with pytest.raises(DataError, match=r"nobirads\.csv: empty cohort: the BI-RADS filter .* removed all 16 rows"):
        RSNAMammography(small_png, csv="nobirads.csv")


def test_error_lidc_structure(tmp_path, lidc_file):
    with pytest.raises(MissingDataError, match=r"absent\.pickle: LIDC patch pickle not found"):
        LIDCPatches(tmp_path / "absent.pickle")
    p = tmp_path / "list.pickle"
    p.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match=r"list\.pickle: wrong structure: expected a dict .* got list"):
        LIDCPatches(p)
    raw = pickle.loads(lidc_file.read_bytes())
    name, entry = next(iter(raw.items()))
    cases = {
        "nokey": ({name: {"image": entry["image"], "masks": entry["masks"]}}, r"lacks key\(s\) series_uid"),
        "notdict": ({name: entry["image"]}, r"is a ndarray, expected a dict"),
        "maskshape": ({name: dict(entry, masks=[np.zeros((5, 5))] * 4)}, r"'masks' must be a list of arrays"),
        "range": ({name: dict(entry, image=entry["image"] * 300)}, r"intensities must lie in \[0, 1\]"),
        "3d": ({name: dict(entry, image=entry["image"][None])}, r"image must be a 2-D numeric array"),
    }
    for tag, (data, msg) in cases.items():
        f = tmp_path / f"{tag}.pickle"
        f.write_bytes(pickle.dumps(data))
        with pytest.raises(DataError, match=rf"{tag}\.pickle: .*{msg}"):
            LIDCPatches(f)
    junk = tmp_path / "junk.pickle"
    junk.write_bytes(b"\x80\x04not really")
    with pytest.raises(DataError, match=r"junk\.pickle: cannot unpickle"):
        LIDCPatches(junk)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(MissingDataError, match=r"emptydir: no \.pickle files"):
        LIDCPatches(tmp_path / "emptydir")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # pydicom's, on writing the bad value
@pytest.mark.parametrize("name, value", [("WindowCenter", "nan"), ("WindowWidth", "inf"), ("RescaleSlope", "nan"),
                                         ("RescaleIntercept", "-inf"), ("WindowCenter", [1900.5, float("nan")])])
def test_error_dicom_non_finite_grey_level_attributes(tmp_path, name, value):
    """A DICOM whose window or rescale is not a finite number is refused, naming the file and the attribute
    (it used to load as an all-black image, with only numpy's cast warning)."""
    root = _make(tmp_path / "d", n_patients=4, fmt="dcm", bit_depth=16)
    bad = RSNAMammography(root, size=LOAD_SIZE, cache=False).paths[0]
    ds = pydicom.dcmread(bad)
    setattr(ds, name, value)
    ds.save_as(bad)
    with pytest.raises(DataError, match=rf"{bad.name}: {name} is .*not a finite number"):
        RSNAMammography(root, size=LOAD_SIZE, cache=False)


def test_error_duplicate_ids_with_conflicting_labels(small_png, tmp_path, lidc_file):
    rows = _csv_rows(small_png)
    ds = RSNAMammography(small_png, size=LOAD_SIZE, cache=False)
    first = next(r for r in rows if r["image_id"] == ds.image_ids[0])
    fields = list(rows[0])

    def write(extra):
        with open(small_png / "dup.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows + [extra])

    write(dict(first))  # the same row twice: the same label, accepted
    assert len(RSNAMammography(small_png, csv="dup.csv", size=LOAD_SIZE, cache=False)) == len(ds) + 1
    write(dict(first, BIRADS="0" if int(float(first["BIRADS"])) else "1"))
    with pytest.raises(DataError, match=rf"dup\.csv: 1 image id\(s\) listed more than once .*image_id {first['image_id']}: "
                                        rf"patient {first['patient_id']} label 0, patient {first['patient_id']} label 1"):
        RSNAMammography(small_png, csv="dup.csv", size=LOAD_SIZE, cache=False)
    # LIDC: one patch name in two pickles of a folder, with other masks
    with open(lidc_file, "rb") as f:
        raw = pickle.load(f)
    name, entry = next(iter(raw.items()))
    (tmp_path / "a.pickle").write_bytes(pickle.dumps(raw))
    (tmp_path / "b.pickle").write_bytes(pickle.dumps({name: dict(entry, masks=1 - np.asarray(entry["masks"]))}))
    with pytest.raises(DataError, match=rf"b\.pickle: 1 patch name\(s\) also in an earlier file with other contents \({name}\)"):
        LIDCPatches(tmp_path)
    (tmp_path / "b.pickle").write_bytes(pickle.dumps({name: entry}))  # the same patch twice: fine
    assert len(LIDCPatches(tmp_path)) == len(raw)


# ---- the harness's data paths: generated data only where asked for (issue 16 item 1) ----
def _tree(path: Path) -> list:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


def _refused(task: str, cfg: dict, *words: str) -> None:
    from pyquant.experiment.tasks import get_task

    with pytest.raises(MissingDataError) as caught:
        get_task(task, cfg)
    message = str(caught.value)
    assert all(w in message for w in words), message
    assert f"--set data.{task}." in message and "--generate-data" in message  # and how to fix it


def test_a_given_data_root_without_its_data_is_an_error_and_nothing_is_written(tmp_path, small_png):
    gen = {"generate": {"n_patients": 8, "size": 32, "seed": 0}}  # the quick preset's table: not a request to write
    mistyped = tmp_path / "rnsa"
    _refused("rsna", {"root": str(mistyped), **gen}, str(mistyped), "data root folder not found")
    assert not mistyped.exists()

    images_only = tmp_path / "images-only"  # real images, no train.csv: the CSV is named, not the images
    (images_only / "train_images" / "1").mkdir(parents=True)
    (images_only / "train_images" / "1" / "2.png").write_bytes(next((small_png / "train_images").rglob("*.png")).read_bytes())
    before = _tree(images_only)
    _refused("rsna", {"root": str(images_only), **gen}, str(images_only / "train.csv"), "CSV file not found")
    assert _tree(images_only) == before

    csv_only = tmp_path / "csv-only"
    csv_only.mkdir()
    (csv_only / "train.csv").write_bytes((small_png / "train.csv").read_bytes())
    _refused("rsna", {"root": str(csv_only), **gen}, str(csv_only / "train_images"), "image folder not found")
    assert _tree(csv_only) == ["train.csv"]

    pickle_path = tmp_path / "lidc" / "data_lidc.pickle"
    _refused("lidc", {"path": str(pickle_path), "generate": {"n": 20}}, str(pickle_path), "LIDC patch pickle not found")
    assert not pickle_path.parent.exists()


def test_generated_data_goes_to_the_demo_folder_or_where_asked(tmp_path, monkeypatch):
    from pyquant.data.synthetic import MARKER
    from pyquant.experiment.tasks import DEMO_DATA, get_task

    gen = {"generate": {"n_patients": 20, "size": 32, "seed": 0}, "size": 32}
    monkeypatch.chdir(tmp_path)
    demo = get_task("rsna", {"root": DEMO_DATA["rsna"], **gen})  # the presets' folder: generated on first use
    assert demo.summary["generated"] and (tmp_path / DEMO_DATA["rsna"] / MARKER).is_file()
    asked = get_task("rsna", {"root": str(tmp_path / "mine"), "write_generated": True, **gen})
    assert asked.summary["generated"] and (tmp_path / "mine" / "train.csv").is_file()
    lidc = get_task("lidc", {"path": str(tmp_path / "l" / "p.pickle"), "write_generated": True, "generate": {"n": 40}})
    assert lidc.summary["generated"]
    from pyquant.experiment import config

    assert config.load("quick")["data"]["rsna"]["root"] == DEMO_DATA["rsna"]
    # the permission to write is not part of what a run is: it never makes a finished run rerun
    run = config.expand(config.load("quick"))[0]
    allowed = {**run, "data": {**run["data"], "write_generated": True}}
    assert config.run_hash(allowed) == run["hash"]


def test_experiment_with_a_mistyped_root_fails_before_training(tmp_path, capsys):
    from pyquant import cli

    mistyped = tmp_path / "data" / "rnsa"
    code = cli.main(["experiment", "--models", "mlp", "--settings", "baseline", "--seeds", "1", "--epochs", "1",
                     "--quiet", "--out", str(tmp_path / "runs"), "--set", "isolate=false", "--set", "downsample.scales=[]",
                     "--set", f"data.rsna.root='{mistyped}'"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{mistyped}: data root folder not found" in err
    assert not mistyped.parent.exists()
