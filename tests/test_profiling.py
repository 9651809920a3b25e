"""`pyquant profile` (torch.profiler, nsys, bad input), pyquant's kernel ranges in torch.profiler, and the memory
breakdown of a training step."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import pyquant
from pyquant import cli
from pyquant.experiment import measure

TINY = ["--task", "tabular", "--model", "mlp", "--setting", "8bit", "--steps", "2", "--warmup", "1", "--threads", "1"]


@pytest.fixture
def no_nsys_path(monkeypatch, tmp_path):
    """A PATH on which no nsys can be found (the interpreter is called by its full path)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def _adam8bit_step():
    p = torch.nn.Parameter(torch.randn(8192))
    p.grad = torch.randn(8192)
    pyquant.Adam8bit([p]).step()


def test_kernel_ranges_show_in_torch_profiler_and_nvtx(nvtx_names):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _adam8bit_step()
    assert "pyquant::adam_step" in {e.key for e in prof.key_averages()}
    _adam8bit_step()  # no profiler: the NVTX range still opens
    assert nvtx_names == [("pyquant::adam_step", "pyquant")] * 2


def test_profile_with_torch_profiler_writes_trace_and_summary(tmp_path, no_nsys_path, capsys):
    out = tmp_path / "prof"
    assert cli.main(["profile", *TINY, "--out", str(out)]) == 0  # auto, and no nsys on PATH: torch.profiler
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"pyquant::train_step", "pyquant::adam_step"} <= names
    assert sum(e.get("name") == "pyquant::train_step" for e in trace["traceEvents"]) == 2  # the profiled steps only
    summary = (out / "summary.txt").read_text()
    assert "setting 8bit" in summary and "pyquant::adam_step" in summary and "Top 25 operations" in summary
    assert "memory: parameters" in summary and "optimizer states" in summary
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt", "trace.json"]  # no temporary file left
    assert "wrote:" in capsys.readouterr().out


def test_profile_nsys_missing_is_a_clear_error_and_writes_nothing(tmp_path, no_nsys_path, capsys):
    out = tmp_path / "prof"
    assert cli.main(["profile", *TINY, "--profiler", "nsys", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nsys" in err and "not on PATH" in err and "--profiler torch" in err
    assert not out.exists()


@pytest.mark.parametrize("bad, words", [(["--setting", "fp7"], "fp7"), (["--model", "no_such_net"], "no_such_net"),
                                        (["--steps", "0"], "--steps")])
def test_profile_bad_input(tmp_path, no_nsys_path, capsys, bad, words):
    out = tmp_path / "prof"
    assert cli.main(["profile", *TINY, *bad, "--profiler", "torch", "--out", str(out)]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


FAKE_NSYS = """#!/bin/sh
# Stands in for Nsight Systems: `profile` runs the command and writes <output>.nsys-rep, `stats` prints a table.
echo "$@" >> "{log}"
if [ "$1" = profile ]; then
  shift
  out=""
  while [ $# -gt 0 ]; do
    case "$1" in --output=*) out="${{1#--output=}}"; shift;; --*) shift;; *) break;; esac
  done
  "$@" || exit $?
  echo fake-report > "$out.nsys-rep"
elif [ "$1" = stats ]; then
  echo "fake nvtx_sum: pyquant::adam_step"
fi
"""


def test_profile_runs_itself_under_nsys_when_installed(tmp_path, monkeypatch, capfd):
    bin_dir, log = tmp_path / "bin", tmp_path / "nsys.log"
    bin_dir.mkdir()
    nsys = bin_dir / "nsys"
    nsys.write_text(FAKE_NSYS.format(log=log))
    nsys.chmod(nsys.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "prof"
    assert cli.main(["profile", *TINY, "--setting", "fp7", "--out", str(out)]) == 2  # checked before nsys starts
    assert not log.exists() and not out.exists()
    assert cli.main(["profile", *TINY, "--out", str(out)]) == 0
    profile_call, stats_call = log.read_text().splitlines()
    assert profile_call.startswith("profile --trace=nvtx") and "pyquant.cli profile --profiler none" in profile_call
    assert "--setting 8bit" in profile_call and "--steps 2" in profile_call
    assert stats_call.startswith("stats --report=nvtx_sum")
    assert (out / "trace.nsys-rep").read_text() == "fake-report\n"
    summary = (out / "summary.txt").read_text()
    assert "fake nvtx_sum: pyquant::adam_step" in summary and "setting 8bit" in summary
    assert "2 steps, median" in capfd.readouterr().out  # the inner run under nsys ran the steps


# ---- memory breakdown ----
def test_saved_activation_bytes_are_exact_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(100, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    x = torch.randn(8, 100)
    # Linear saves its input (8x100), ReLU its output (8x10), which the second Linear saves too (counted once).
    assert measure.saved_activation_bytes(mlp, x) == 4 * (8 * 100 + 8 * 10)
    # Under bfloat16 autocast the same in bfloat16, plus the second Linear's bfloat16 weight copy (2x10), which
    # its backward needs for the gradient of its input; the first Linear's input needs no gradient.
    bf16 = measure.saved_activation_bytes(mlp, x, torch.autocast("cpu", dtype=torch.bfloat16))
    assert bf16 == 2 * (8 * 100 + 8 * 10 + 2 * 10)

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    image = torch.randn(2, 1, 8, 8)
    state = torch.random.get_rng_state()
    saved = measure.saved_activation_bytes(net, image)
    assert saved > 0 and not net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # running stats restored
    assert torch.equal(torch.random.get_rng_state(), state)  # dropout's draws did not move the seed's stream


@pytest.mark.parametrize("optimizer, per_param", [("adam", 8.0), ("8bit", 2 + 2 * 4 / 256)])
def test_memory_breakdown_counts_parameters_gradients_and_states(optimizer, per_param):
    from pyquant.experiment.settings import OPTIMIZERS

    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 2))
    opt = OPTIMIZERS[optimizer](model.parameters(), 1e-3)
    x = torch.randn(16, 512)
    torch.nn.functional.cross_entropy(model(x), torch.zeros(16, dtype=torch.long)).backward()
    opt.step()
    saved = measure.saved_activation_bytes(model, x)
    b = measure.memory_breakdown(model, opt, activations_saved_bytes=saved)
    n_params = sum(p.numel() for p in model.parameters())
    assert b["parameters_bytes"] == b["gradients_bytes"] == 4 * n_params
    assert b["buffers_bytes"] == 4 * (256 + 256) + 8  # running mean and var, num_batches_tracked (int64)
    assert b["optimizer_state_bytes"] == measure.optimizer_state_bytes(opt)
    big = 512 * 256  # the one tensor large enough for 8-bit states; the others stay float32 under both optimizers
    small_bytes = 8 * (n_params - big)
    assert b["optimizer_state_bytes"] - small_bytes == pytest.approx(per_param * big, rel=0.02)
    assert b["activations_bytes"] == saved > 0 and b["activations_method"].startswith("tensors saved")
    assert b["total_bytes"] == sum(b[k] for k in ("parameters_bytes", "buffers_bytes", "gradients_bytes",
                                                  "optimizer_state_bytes", "activations_bytes"))
    # With an allocator peak (CUDA), activations are the peak minus everything else.
    rest = b["total_bytes"] - saved
    peaked = measure.memory_breakdown(model, opt, activations_saved_bytes=saved, allocator_peak_bytes=rest + 12345)
    assert peaked["activations_bytes"] == 12345 and peaked["saved_for_backward_bytes"] == saved


def test_profile_summary_memory_matches_the_breakdown(tmp_path, no_nsys_path):
    from pyquant import profiling

    ctx = profiling.build("tabular", "mlp", "baseline", threads=1)
    assert ctx["run"]["setting"] == "baseline" and isinstance(ctx["optimizer"], torch.optim.Adam)
    times = profiling._steps(ctx, profiling._preload(ctx, 2))
    assert len(times) == 2 and all(t > 0 for t in times)
    header = "\n".join(profiling._header(ctx, 2, 0, times, "test"))
    n_params = sum(p.numel() for p in ctx["model"].parameters())
    assert f"parameters {4 * n_params / 2**20:.2f} MiB" in header
    assert f"optimizer states {(8 * n_params + 4 * len(list(ctx['model'].parameters()))) / 2**20:.2f} MiB" in header
