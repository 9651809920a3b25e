"""`pyquant experiment --nproc N`: a run trained data-parallel over 2 processes (DDP, gloo on CPU), and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from pyquant import cli
from pyquant.experiment import config, parallel, report

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

ARGS = ["experiment", "--preset", "quick", "--task", "tabular", "--models", "mlp", "--settings", "8bit", "--seeds", "1",
        "--epochs", "2", "--lr", "1e-3", "--threads", "1", "--quiet", "--set", "downsample.scales=[]"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "runs"
    assert cli.main([*ARGS, "--nproc", "2", "--batch-size", "32", "--out", str(out), "--no-report"]) == 0
    [record] = report.load_records(out)
    return out, record


def test_record_says_how_the_run_was_split(ddp_run):
    out, record = ddp_run
    n_train = record["data"]["train"]
    assert record["config"]["nproc"] == 2 and record["config_hash"] == config.run_hash(record["config"])
    assert record["parallel"] == {
        "world_size": 2, "backend": "gloo", "global_batch": 32, "per_rank_batch": 16,
        "train_samples_dropped_per_epoch": n_train % 2,
        "note": "rank 0 validates, tests, measures and writes; memory figures are rank 0's process"}
    assert record["training"]["epochs_run"] == 2 and not record["training"]["diverged"]
    assert record["metrics"]["test"]["auc"] > 0.9  # the breast-cancer table is easy: training worked
    run_dir = out / record["run_id"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "record.json", "split.json"]  # rank 0's only
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # the model, not its DDP wrapper


def test_record_and_report_hold_the_memory_breakdown(ddp_run, tmp_path):
    out, record = ddp_run
    b = record["resources"]["memory"]["breakdown"]
    params = record["model"]["params"]
    assert b["parameters_bytes"] == b["gradients_bytes"] == 4 * params
    assert b["optimizer_state_bytes"] == record["resources"]["memory"]["optimizer_state_bytes"]
    assert 0 < b["activations_bytes"] == b["saved_for_backward_bytes"]
    assert b["total_bytes"] == sum(b[k] for k in ("parameters_bytes", "buffers_bytes", "gradients_bytes",
                                                  "optimizer_state_bytes", "activations_bytes"))
    report.build_report(out, tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "### Memory of a training step" in table
    assert f"| tabular | mlp | 8bit | 1 | {b['parameters_bytes'] / 2**20:.2f} |" in table


def test_a_single_process_run_keeps_its_hash():
    cfg = config.load("quick", overrides={"tasks": ["tabular"], "models": ["mlp"]})
    one = config.expand(cfg)
    two = config.expand(config.set_key(cfg, "nproc", 2))
    assert all("nproc" not in r for r in one) and all(r["nproc"] == 2 for r in two)
    assert not {r["hash"] for r in one} & {r["hash"] for r in two}


@pytest.mark.parametrize("nproc, batch, words", [(3, 32, "nproc 3 does not divide batch_size 32"),
                                                 (0, 32, "nproc must be a whole number >= 1")])
def test_bad_world_size_is_refused_before_anything_runs(tmp_path, capsys, nproc, batch, words):
    out = tmp_path / "runs"
    assert cli.main([*ARGS, "--nproc", str(nproc), "--batch-size", str(batch), "--out", str(out)]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="nproc"):
        parallel.check(True, 32)


def test_a_failing_rank_stops_the_run_with_its_error(tmp_path, capfd):
    out = tmp_path / "runs"
    missing = tmp_path / "no-such-data"
    code = cli.main(["experiment", "--task", "rsna", "--models", "mlp", "--settings", "baseline", "--seeds", "1",
                     "--epochs", "1", "--nproc", "2", "--quiet", "--out", str(out), "--set", "downsample.scales=[]",
                     "--set", f"data.rsna.root='{missing}'", "--set", "data.rsna.generate={}"])
    assert code == 2
    err = capfd.readouterr().err
    assert "no-such-data" in err and "failed (exit code 2)" in err
    assert not list(out.rglob("record.json"))


def test_grid_dry_run_lists_the_parallel_run(ddp_run, capsys):
    out, record = ddp_run
    assert cli.main([*ARGS, "--nproc", "2", "--batch-size", "32", "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == ["done", record["run_id"]]
    assert json.loads((out / record["run_id"] / "record.json").read_text())["run_id"] == record["run_id"]
