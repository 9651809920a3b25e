"""What a run leaves on disk, and how the grid tells a finished run from one to do again.

A run's folder ``<out>/<task>_<model>_<setting>_S<scale>_seed<seed>_<hash>/`` holds ``record.json`` (written last,
atomically: a run without it is unfinished and reruns), ``best.pt`` and ``split.json``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from pyquant._files import write_atomic, write_text_atomic

RECORD_FORMAT = "pyquant-experiment-run-v1"
RECORD_NAME = "record.json"
CHECKPOINT_NAME = "best.pt"
SPLIT_NAME = "split.json"


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_record(path: Path, record: dict) -> None:
    """The one JSON writer: NaN/inf become null, written to a temporary file and moved into place."""
    write_text_atomic(path, json.dumps(_finite_or_none(record), indent=1, sort_keys=False) + "\n")


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(run_dir: Path, run_hash: str) -> bool:
    record = read_record(Path(run_dir) / RECORD_NAME)
    return bool(record) and record.get("status") == "done" and record.get("config_hash") == run_hash


def resume(run_dir: Path, run_hash: str) -> bool:
    """True when the run in ``run_dir`` is finished (skip it); otherwise what an interrupted earlier attempt left
    there is removed, so that the run starts again from scratch."""
    if is_finished(run_dir, run_hash):
        return True
    if Path(run_dir).exists():
        shutil.rmtree(run_dir)
    return False


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then os.replace: an interrupted or failed save (a full disk: "no space
    left on <path>") never leaves a half-written file, and the previous checkpoint stays."""
    write_atomic(path, lambda f: torch.save(state, f))
