"""bench/gpu/check.sh --smoke: the GPU validation script's stages, end to end on this CPU-only machine.

The script exists for the rare, short loans of a GPU machine, so it must work the first time it runs there; this
keeps its wiring (stages, time limits, report, the comparisons themselves) exercised on every CI run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("setup", "tests", "env", "bits", "bench", "profile", "study")


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is missing")
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), PYQUANT_GPU_CHECK_WORK=str(work))
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "check.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] is True
    by_name = {stage["stage"]: stage for stage in results["stages"]}
    assert set(by_name) == set(STAGES)
    for name in STAGES:
        stage = by_name[name]
        assert stage["run"] is not None and stage["run"]["exit"] == 0, (name, stage)
        failed = [c for c in stage["checks"] if not c["passed"]]
        assert not failed, (name, failed)
    # The comparisons really ran: every backend of this machine was compared on every op.
    bit_checks = [c["name"] for c in by_name["bits"]["checks"]]
    for op in ("quantize/dequantize", "Adam8bit", "AdamW8bit", "unscale_"):
        assert any(n.startswith(op) and n.endswith("triton = cpu = reference") for n in bit_checks), (op, bit_checks)
    assert any("bitsandbytes" in n for n in bit_checks)
    assert set(by_name["bench"]["figures"]) >= {"matmul torch.bfloat16 128^3"}
    assert by_name["study"]["figures"]["runs"], "the study stage found no run records"
    assert "pyquant::adam_step" in by_name["profile"]["figures"]["pyquant ranges in the trace"]

    report = (out / "gpu_report.md").read_text()
    for name in STAGES:
        assert f"| {name} | 0 |" in report, name
    assert (out / "trace.json.gz").stat().st_size > 0
    assert len(list(out.iterdir())) <= 8  # what the GPU machine's $OUT can bring back
