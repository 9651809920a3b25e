"""Data for the study: the real on-disk formats, small generators writing the same formats, and patient splits.

- :class:`RSNAMammography`: Kaggle RSNA screening mammography (``train.csv`` + DICOM or PNG conversions), the
  study's cohort (age < 55, a BI-RADS value) and label (BI-RADS 0 follow-up = 1, BI-RADS 1/2 = 0), resized once and
  cached under ``root/.pyquant_cache``;
- :class:`LIDCPatches`: the LIDC-IDRI 128x128 patch pickle, label = at least ``min_raters`` of 4 raters;
- :func:`breast_cancer_tabular`: scikit-learn's breast cancer Wisconsin table, train-split standardisation;
- :func:`patient_split`, :func:`save_split`, :func:`load_split`: seeded 60/20/20 splits by patient;
- :func:`make_rsna_like`, :func:`make_lidc_like`: deterministic synthetic sets in exactly those formats.

Errors: :class:`MissingDataError` (also a ``FileNotFoundError``) for absent files, :class:`DataError` (a
``ValueError``) for unreadable or ill-formed ones; messages name the file and the problem.
"""

from pyquant.data.errors import DataError, MissingDataError
from pyquant.data.images import read_dicom, read_image, read_png, resize_image
from pyquant.data.lidc import LIDCPatches
from pyquant.data.rsna import RSNAMammography
from pyquant.data.splits import SPLIT_NAMES, load_split, patient_split, save_split
from pyquant.data.synthetic import make_lidc_like, make_rsna_like
from pyquant.data.tabular import TabularDataset, breast_cancer_tabular

__all__ = [
    "DataError",
    "LIDCPatches",
    "MissingDataError",
    "RSNAMammography",
    "SPLIT_NAMES",
    "TabularDataset",
    "breast_cancer_tabular",
    "load_split",
    "make_lidc_like",
    "make_rsna_like",
    "patient_split",
    "read_dicom",
    "read_image",
    "read_png",
    "resize_image",
    "save_split",
]
