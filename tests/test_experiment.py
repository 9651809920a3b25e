"""The study harness: metrics against scikit-learn, settings, config, records, resuming, and a tiny grid end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pyquant import cli
from pyquant.experiment import config, measure, metrics, models, records, report, runner, settings

sklearn_metrics = pytest.importorskip("sklearn.metrics")


# ---- metrics against scikit-learn ----
def _cases():
    rng = np.random.default_rng(0)
    for i in range(40):
        n = int(rng.integers(2, 300))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        s = rng.random(n)
        if i % 3 == 0:
            s = np.round(s, 1)  # many ties
        if i % 5 == 0:
            s = (s + y * rng.random()) / 2  # some signal
        yield y, s


@pytest.mark.parametrize("case", list(range(40)))
def test_metrics_match_sklearn(case):
    y, s = list(_cases())[case]
    assert metrics.roc_auc(y, s) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = metrics.roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr[1:])
    np.testing.assert_allclose(tpr, sk_tpr[1:])
    np.testing.assert_allclose(thr, sk_thr[1:])
    t = metrics.youden_threshold(y, s)
    assert t in s
    m = metrics.binary_metrics(y, s, t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(np.max(sk_tpr - sk_fpr), abs=1e-12)
    pred = (s >= t).astype(int)
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(sklearn_metrics.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(sklearn_metrics.recall_score(y, pred, pos_label=1))
    assert m["specificity"] == pytest.approx(sklearn_metrics.recall_score(y, pred, pos_label=0))
    tn, fp, fn, tp = sklearn_metrics.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)


def test_metrics_one_class_is_nan_not_an_error():
    y, s = np.ones(5, int), np.linspace(0, 1, 5)
    assert math.isnan(metrics.roc_auc(y, s))
    m = metrics.binary_metrics(y, s, metrics.youden_threshold(y, s))
    assert math.isnan(m["specificity"]) and m["sensitivity"] == 0.6


def test_bootstrap_intervals_resample_patients():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(60), 2)  # two images per patient
    y = np.repeat(rng.integers(0, 2, 60), 2)
    s = y * 0.3 + rng.random(y.size)
    one = metrics.bootstrap_intervals([(y, s, ids, 0.6)], replicates=300)
    point = metrics.binary_metrics(y, s, 0.6)
    for key in ("auc", "balanced_accuracy"):
        low, high = one[key]
        assert low < point[key] < high and high - low < 0.4
    assert metrics.bootstrap_intervals([(y, s, ids, 0.6)], replicates=300) == one  # seeded
    # a patient's images are drawn together: repeating every image within its patient changes nothing (resampling
    # images would shrink the interval), nor does averaging a run with itself
    for same in (metrics.bootstrap_intervals([(np.tile(y, 3), np.tile(s, 3), np.tile(ids, 3), 0.6)], replicates=300),
                 metrics.bootstrap_intervals([(y, s, ids, 0.6)] * 2, replicates=300)):
        for key in one:
            assert same[key] == pytest.approx(one[key])
    assert metrics.bootstrap_intervals([(y, y + 0.0, ids, 0.5)], replicates=50) == {"auc": [1.0, 1.0],
                                                                                     "balanced_accuracy": [1.0, 1.0]}


def test_paired_difference_over_seeds():
    d = metrics.paired_difference([0.92, 0.93, 0.925], [0.90, 0.90, 0.90])  # +0.02..+0.03: consistent
    assert d["mean"] == pytest.approx(0.025) and d["seeds"] == 3 and not d["within_noise"]
    half = 4.302652729911275 * 0.005 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert d["ci"] == pytest.approx([0.025 - half, 0.025 + half])
    assert metrics.paired_difference([0.95, 0.88, 0.91], [0.90, 0.90, 0.90])["within_noise"]
    assert metrics.paired_difference([0.9], [0.8]) is None  # one seed: no spread to compare with


# ---- settings ----
def test_settings_resolve_per_device():
    amp_cpu = settings.resolve("amp", "cpu")
    assert amp_cpu.autocast_dtype == torch.bfloat16 and not amp_cpu.loss_scaling
    amp_fp16 = settings.resolve("amp", "cpu", amp_dtype="float16")
    assert amp_fp16.autocast_dtype == torch.float16 and amp_fp16.loss_scaling
    amp_cuda = settings.resolve("amp", "cuda")
    assert amp_cuda.autocast_dtype == torch.float16 and amp_cuda.loss_scaling
    half = settings.resolve("half+8bit", "cpu")
    assert half.model_dtype == torch.bfloat16 and half.autocast_dtype is None and not half.loss_scaling
    assert settings.resolve("half+8bit", "cpu", half_dtype="float16").loss_scaling
    assert settings.resolve("bf16", "cuda").autocast_dtype == torch.bfloat16
    assert settings.resolve("baseline", "cpu").record()["model_dtype"] == "float32"
    assert set(settings.PAPER_SETTINGS) | {"bnb-8bit", "bf16"} <= set(settings.SETTINGS)
    with pytest.raises(KeyError, match="unknown setting"):
        settings.resolve("fp8", "cpu")


@pytest.mark.parametrize("name, class_name, lr_factor", [
    ("lion8bit", "Lion8bit", 1 / 3), ("sgd8bit", "SGD8bit", 10.0), ("rmsprop8bit", "RMSprop8bit", 1.0),
    ("adagrad8bit", "Adagrad8bit", 10.0), ("ademamix8bit", "AdEMAMix8bit", 1.0), ("lamb8bit", "LAMB8bit", 1.0),
    ("lars8bit", "LARS8bit", 100.0)])
def test_family_settings_build_their_optimizer_and_take_a_step(name, class_name, lr_factor):
    import pyquant

    recipe = settings.resolve(name, "cpu")
    weight = torch.nn.Parameter(torch.randn(64, 128))  # above min_8bit_size: 8-bit states
    optimizer = recipe.make_optimizer([weight], 1e-5)
    assert type(optimizer) is getattr(pyquant, class_name)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * lr_factor, rel=1e-12)
    before = weight.detach().clone()
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert not torch.equal(weight, before)
    assert any(t.dtype == torch.uint8 for t in optimizer.state[weight].values() if torch.is_tensor(t))


def test_half_model_keeps_norms_in_float32_and_uses_8bit_states():
    model = models.create_model("densenet_small")
    recipe = settings.resolve("half+8bit", "cpu")
    recipe.prepare_model(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert norms and all(m.weight.dtype == torch.float32 and m.running_var.dtype == torch.float32 for m in norms)
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    optimizer = recipe.make_optimizer(model.parameters(), 1e-3)
    from pyquant import Adam8bit

    assert isinstance(optimizer, Adam8bit)


# ---- models ----
def test_model_registry_by_name_and_local_weights(tmp_path):
    @models.register_model("test_tiny_linear")
    def _tiny(in_chans=1, num_classes=2, img_size=None, pretrained=None):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))

    assert "test_tiny_linear" in models.list_models()
    assert models.create_model("test_tiny_linear")(torch.zeros(2, 1, 4, 4)).shape == (2, 2)
    with pytest.raises(KeyError, match="unknown model"):
        models.create_model("no_such_model")
    with pytest.raises(FileNotFoundError):
        models.create_model("densenet_small", pretrained=tmp_path / "missing.pth")
    a = models.create_model("densenet_small")
    torch.save(a.state_dict(), tmp_path / "w.pth")
    b = models.create_model("densenet_small", pretrained=tmp_path / "w.pth")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    # timm models: a local file goes through timm's loader (a 3-channel stem is adapted to 1 channel).
    import timm

    rgb = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.save(rgb.state_dict(), tmp_path / "resnet18.pth")
    gray = models.create_model("resnet18", in_chans=1, num_classes=2, pretrained=tmp_path / "resnet18.pth")
    assert torch.allclose(gray.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert gray.fc.out_features == 2


@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny", "efficientnet_b0", "mlp"])
def test_models_take_one_channel_and_a_small_image(name):
    model = models.create_model(name, in_chans=1, num_classes=2, img_size=32)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)


# ---- measurements ----
def test_flops_and_optimizer_state_bytes_are_exact():
    linear = torch.nn.Linear(10, 5)
    assert measure.count_flops(linear, torch.zeros(1, 10)) == 2 * 10 * 5
    model = torch.nn.Linear(100, 100)
    adam = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 100)).sum().backward()
    adam.step()
    params = 100 * 100 + 100
    # exp_avg and exp_avg_sq in float32 plus one float32 step counter per tensor
    assert measure.optimizer_state_bytes(adam) == 2 * 4 * params + 2 * 4


def test_peak_memory_sees_a_phase_allocation():
    with measure.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(1024 * 2**20 // 4)  # 1 GiB: more than earlier tests can leave resident
        del x
    assert mem.growth_bytes >= 900 * 2**20
    assert mem.method


def test_energy_meter_measures_or_estimates_on_cpu():
    meter = measure.EnergyMeter(torch.device("cpu"))
    info = meter.describe()
    assert meter.available and meter.read() is not None
    assert info["source"].startswith("rapl") and not info["estimated"] or info["estimated"] and info["model"]


def test_energy_estimate_without_counters_is_cpu_time_times_power_per_cpu(monkeypatch):
    """No RAPL counter: CodeCarbon's per-process model, CPU seconds x TDP / logical CPUs, marked estimated."""
    import os
    import time

    monkeypatch.setattr(measure.glob, "glob", lambda pattern: [])
    monkeypatch.delenv("PYQUANT_CPU_TDP_W", raising=False)
    meter = measure.EnergyMeter(torch.device("cpu"))
    info = meter.describe()
    assert meter.available and info["estimated"] and info["source"] == "estimate: " + measure.ESTIMATE
    assert info["model"]["tdp_w"] == measure.DEFAULT_CPU_TDP_W == 85 and info["model"]["logical_cpus"] == os.cpu_count()
    assert "RAPL" in info["model"]["no_counter"]  # why there is no measurement
    c0, e0 = time.process_time(), meter.read()
    x = torch.randn(256, 256)
    for _ in range(200):
        x = torch.tanh(x @ x)
    c1, e1 = time.process_time(), meter.read()
    assert c1 > c0 and e1 - e0 == pytest.approx((c1 - c0) * 85 / os.cpu_count(), rel=0.05)
    monkeypatch.setenv("PYQUANT_CPU_TDP_W", "170")
    assert measure.EnergyMeter(torch.device("cpu")).describe()["model"]["watts_per_cpu"] == 170 / os.cpu_count()
    monkeypatch.setenv("PYQUANT_CPU_TDP_W", "-3")
    with pytest.raises(ValueError, match="PYQUANT_CPU_TDP_W must be a positive number of watts, got '-3'"):
        measure.EnergyMeter(torch.device("cpu"))


# ---- config ----
def test_config_layers_and_hash(tmp_path):
    cfg = config.load("quick", overrides={"epochs": 3, "seeds": [1, 2]}, sets=["data.rsna.size=32", "lr=0.01"])
    assert cfg["epochs"] == 3 and cfg["data"]["rsna"]["size"] == 32 and cfg["lr"] == 0.01
    assert cfg["data"]["rsna"]["max_age"] == 55  # from the defaults
    paper = config.load("paper")
    assert (paper["epochs"], paper["patience"], paper["batch_size"], paper["lr"], paper["seeds"]) == (50, 5, 32, 1e-5, [1, 10, 100])
    with pytest.raises(KeyError, match="unknown config key"):
        config.load("quick", sets=["epochz=3"])
    toml_file = tmp_path / "c.toml"
    toml_file.write_text(config.to_toml(cfg))
    assert config.load(str(toml_file)) == cfg
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("epochs: 7\nmodels: [mlp]\n")
    assert config.load(str(yaml_file))["epochs"] == 7
    runs = config.expand(cfg)
    # 5 settings x 2 seeds, plus the baseline at S = 2 and 4 for 2 seeds
    assert len(runs) == 5 * 2 + 2 * 2
    assert len({r["hash"] for r in runs}) == len(runs)
    again = config.expand(cfg)
    assert [r["hash"] for r in again] == [r["hash"] for r in runs]
    other = config.expand(config.set_key(cfg, "lr", 0.02))
    assert not {r["hash"] for r in other} & {r["hash"] for r in runs}


# ---- resuming ----
def _tabular_cfg(out: Path, **kw) -> dict:
    cfg = config.load("quick", overrides={"tasks": ["tabular"], "models": ["mlp"], "settings": ["baseline", "8bit"],
                                          "seeds": [1], "epochs": 2, "out": str(out), "lr": 1e-3, "isolate": False,
                                          **kw},
                      sets=["downsample.scales=[]"])
    return cfg


def test_finished_runs_are_skipped_and_interrupted_ones_rerun(tmp_path, monkeypatch):
    cfg = _tabular_cfg(tmp_path / "runs")
    real = runner.run_one
    calls = []

    def interrupted_second(run, run_dir, data, progress=True):
        calls.append(run["setting"])
        if len(calls) == 2:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / "best.pt").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(run, run_dir, data, progress)

    monkeypatch.setattr(runner, "run_one", interrupted_second)
    assert runner.run_grid(cfg, progress=False, log=lambda *a: None) == 130
    runs = config.expand(cfg)
    dirs = [tmp_path / "runs" / config.run_name(r) for r in runs]
    assert (dirs[0] / "record.json").is_file() and not (dirs[1] / "record.json").exists()
    first_record = (dirs[0] / "record.json").read_text()

    calls.clear()
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: (calls.append(a[0]["setting"]), real(*a, **k))[1])
    assert runner.run_grid(cfg, progress=False, log=lambda *a: None) == 0
    assert calls == ["8bit"]  # only the interrupted run ran again
    assert (dirs[0] / "record.json").read_text() == first_record
    assert torch.load(dirs[1] / "best.pt", weights_only=True)["config_hash"] == runs[1]["hash"]

    calls.clear()
    assert runner.run_grid(cfg, progress=False, log=lambda *a: None) == 0
    assert calls == []  # everything finished: nothing runs
    # A changed config is a new run.
    assert runner.run_grid(config.set_key(cfg, "epochs", 1), progress=False, log=lambda *a: None) == 0
    assert calls == ["baseline", "8bit"]


def test_a_run_held_by_another_live_process_is_left_alone(tmp_path):
    """Two processes on one --out: a run whose lock a live process holds is skipped (its folder kept, the
    holder named); a lock left by a dead process is taken over."""
    import json
    import socket
    import subprocess
    import sys

    from pyquant.experiment import lock

    cfg = _tabular_cfg(tmp_path / "runs", settings=["baseline"])
    (run,) = config.expand(cfg)
    out = tmp_path / "runs"
    run_dir, lock_path = out / config.run_name(run), out / f".{config.run_name(run)}.lock"
    run_dir.mkdir(parents=True)
    (run_dir / "best.pt").write_bytes(b"the other process is writing this")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "since": "earlier"}))
        lines = []
        assert runner.run_grid(cfg, progress=False, log=lines.append) == runner.HELD_ELSEWHERE
        assert (run_dir / "best.pt").read_bytes() == b"the other process is writing this"
        assert any(f"skipped, run by pid {other.pid} on {socket.gethostname()}" in line for line in lines), lines
        assert lock.acquire(lock_path) == json.loads(lock_path.read_text())  # still held: not ours
    finally:
        other.kill()
        other.wait()
    # the holder is gone: its lock is stale, taken over, and the run is done from scratch
    assert runner.run_grid(cfg, progress=False, log=lambda *a: None) == 0
    assert records.is_finished(run_dir, run["hash"]) and not lock_path.exists()
    assert lock.acquire(lock_path) is None and json.loads(lock_path.read_text())["pid"] == __import__("os").getpid()
    assert lock.acquire(lock_path)["pid"] == __import__("os").getpid()  # a second taker is refused
    lock.release(lock_path)
    assert not lock_path.exists()


def test_runs_that_cannot_work_are_refused_up_front(tmp_path, capsys):
    base = ["experiment", "--task", "tabular", "--models", "mlp", "--settings", "baseline", "--seeds", "1",
            "--out", str(tmp_path / "runs"), "--quiet"]
    for extra, message in ((["--epochs", "0"], "epochs must be a whole number >= 1, got 0"),
                           (["--batch-size", "0"], "batch_size must be a whole number >= 1, got 0"),
                           (["--set", "data.tabular.fractions=[1, 0, 0]"], "data.tabular.fractions must be three positive")):
        assert cli.main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    (tmp_path / "file").write_text("")
    assert cli.main(base[:-3] + ["--out", str(tmp_path / "file" / "runs"), "--quiet"]) == 2
    assert f"cannot write the runs folder {tmp_path / 'file' / 'runs'}" in capsys.readouterr().err
    # narrowing the grid narrows the preset's down-sampling grid too: no RSNA runs for --task tabular
    for overrides in ({"tasks": ["tabular"]}, {"tasks": ["tabular"], "models": ["mlp"]}):
        runs = config.expand(config.load("quick", overrides=overrides))
        assert {r["task"] for r in runs} == {"tabular"} and {r["scale"] for r in runs} == {1}
    assert {r["scale"] for r in config.expand(config.load("quick"))} == {1, 2, 4}


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("iostream error")],
                         ids=["ENOSPC", "other"])
def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "best.pt"
    records.save_checkpoint(path, {"epoch": 1})

    def failing(obj, f, *a, **k):
        f.write(b"PK partial") if hasattr(f, "write") else Path(f).write_bytes(b"PK partial")  # partial, then the failure
        raise error

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(type(error)) as caught:
        records.save_checkpoint(path, {"epoch": 2})
    if isinstance(error, OSError):
        assert caught.value.errno == 28 and f"no space left on {path} (device full; the previous file is kept)" in str(caught.value)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # the temporary file is gone
    assert torch.load(path, weights_only=True) == {"epoch": 1}


# ---- a tiny grid end to end, through the command line ----
@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    out, root = base / "runs", base / "rsna-tiny"
    code = cli.main([
        "experiment", "--preset", "quick", "--models", "densenet_small", "--settings", "baseline", "half+8bit",
        "--seeds", "1", "--epochs", "2", "--out", str(out), "--quiet", "--jobs", "2",
        "--set", f"data.rsna.root='{root}'", "--set", "data.rsna.generate={n_patients=30, size=48, seed=0}",
        "--generate-data", "--set", "data.rsna.size=32", "--set", "downsample.scales=[2]",
    ])
    assert code == 0
    return out, root


def test_tiny_grid_writes_records_checkpoints_and_report(tiny_grid):
    out, root = tiny_grid
    assert (root / "train.csv").is_file()  # the data set was generated on first use, as --generate-data asked
    records = report.load_records(out)
    assert sorted((r["config"]["setting"], r["config"]["scale"]) for r in records) == [
        ("baseline", 1), ("baseline", 2), ("half+8bit", 1)]
    for name in ("table.md", "table.csv", "table.tex", "radar_rsna_densenet_small.png", "radar_rsna_densenet_small.pdf",
                 "downsampling_rsna_densenet_small.png"):
        assert (out / "report" / name).stat().st_size > 0
    table = (out / "report" / "table.md").read_text()
    assert "| rsna | densenet_small |" in table and "half+8bit" in table and "bf16 model" in table


def test_record_contents(tiny_grid):
    out, _ = tiny_grid
    by_setting = {(r["config"]["setting"], r["config"]["scale"]): r for r in report.load_records(out)}
    for (setting, scale), r in by_setting.items():
        assert r["format"] == records.RECORD_FORMAT and r["status"] == "done"
        assert r["config_hash"] == config.run_hash(r["config"])
        c = r["config"]
        assert (c["task"], c["model"], c["seed"], c["batch_size"], c["epochs"]) == ("rsna", "densenet_small", 1, 64, 2)
        test = r["metrics"]["test"]
        for key in ("accuracy", "accuracy_argmax", "balanced_accuracy", "auc", "sensitivity", "specificity", "threshold"):
            assert key in test
        assert r["metrics"]["threshold_rule"] == "youden" and r["metrics"]["threshold"] == test["threshold"]
        mem, t = r["resources"]["memory"], r["resources"]["time"]
        assert mem["train_peak_bytes"] > 0 and mem["eval_peak_bytes"] > 0 and mem["optimizer_state_bytes"] > 0
        assert 0 < t["to_best_s"] <= t["train_total_s"] and t["inference_s"] > 0 and t["synchronised"]
        energy = r["resources"]["energy"]
        assert energy["available"] is True and energy["train_wh"] >= 0 or energy["available"] is False and energy["reason"]
        assert r["model"]["params"] > 0 and r["model"]["flops_forward_per_sample"] > 0
        assert r["model"]["input_shape"] == [1, 1, 32 // scale, 32 // scale]
        env = r["environment"]
        assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"].startswith("2.")
        assert "revision" in env["git"] and env["device"] == "cpu"
        run_dir = out / r["run_id"]
        ckpt = torch.load(run_dir / "best.pt", weights_only=True)
        assert ckpt["epoch"] == r["training"]["best_epoch"] and ckpt["config_hash"] == r["config_hash"]
        from pyquant.data import load_split

        split = load_split(run_dir / "split.json")
        assert set(split) == {"train", "val", "test"}
        assert sum(map(len, split.values())) == r["data"]["train"] + r["data"]["val"] + r["data"]["test"]
    base, half = by_setting[("baseline", 1)], by_setting[("half+8bit", 1)]
    assert half["setting"]["model_dtype"] == "bfloat16" and half["setting"]["optimizer"] == "8bit"
    assert base["setting"]["model_dtype"] == "float32" and base["setting"]["autocast_dtype"] is None
    assert half["resources"]["memory"]["optimizer_state_bytes"] < base["resources"]["memory"]["optimizer_state_bytes"] / 3


def test_report_command_and_mean_std(tiny_grid, tmp_path, capsys):
    out, _ = tiny_grid
    assert cli.main(["report", str(out), "--out", str(tmp_path)]) == 0
    assert "| Task | Model |" in capsys.readouterr().out
    assert report._mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert report._mean_std([0.5]) == (0.5, 0.0)
    assert report._mean_std([None, float("nan")]) == (None, None)
    rows = list(__import__("csv").DictReader(open(tmp_path / "table.csv")))
    assert len(rows) == 3 and {"auc", "auc_std", "train_memory_mib", "rss_peak_mib", "energy_estimated"} <= set(rows[0])
    assert "\\begin{tabular}" in (tmp_path / "table.tex").read_text()


def test_report_warns_about_records_it_cannot_use(tiny_grid, tmp_path):
    """An unreadable record and one without a field the report needs are skipped, each with a warning naming
    its file; the others make the report."""
    import json

    out, _ = tiny_grid
    good = report.load_records(out)[0]
    runs = tmp_path / "runs"
    for name, text in (("good", json.dumps(good)), ("torn", json.dumps(good)[:100]),
                       ("old", json.dumps({k: v for k, v in good.items() if k != "metrics"}))):
        (runs / name).mkdir(parents=True)
        (runs / name / "record.json").write_text(text)
    with pytest.warns(RuntimeWarning) as caught:
        assert cli.main(["report", str(runs), "--out", str(tmp_path / "report")]) == 0
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
    assert messages[0] == f"{runs / 'old' / 'record.json'}: skipped, the record lacks the field 'metrics'"
    assert messages[1].startswith(f"{runs / 'torn' / 'record.json'}: skipped, the record cannot be read")
    assert len(list(__import__("csv").DictReader(open(tmp_path / "report" / "table.csv")))) == 1


# ---- issue 16: the report never averages different configs; memory and energy headlines; CLI messages ----
def _texts_of_saved_figures(monkeypatch) -> list:
    """Every text drawn on the figures the report saves (titles, axis labels, notes)."""
    import matplotlib.figure
    import matplotlib.text

    texts = []
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **k):
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return real(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return texts


def test_report_groups_by_the_full_config_without_the_seed(tiny_grid, tmp_path):
    """Two seed-1 runs of 2 and 20 epochs are two rows naming epochs, never one row of "2 seeds"; two seeds of one
    config are one row."""
    import copy
    import json

    out, _ = tiny_grid
    base = next(r for r in report.load_records(out) if r["config"]["setting"] == "baseline" and r["config"]["scale"] == 1)
    variants = []
    for epochs, seed, auc in ((2, 1, 0.6), (20, 1, 0.9), (20, 2, 0.8)):
        r = copy.deepcopy(base)
        r["config"].update(epochs=epochs, seed=seed)
        r["metrics"]["test"]["auc"] = auc
        variants.append(r)
    rows = report.summarize(variants)
    assert [(r["config_differs"], r["n"], r["auc"]) for r in rows] == [("epochs=2", 1, 0.6), ("epochs=20", 2, pytest.approx(0.85))]
    assert report.summarize(variants[1:])[0]["config_differs"] == ""  # one config: nothing to name
    runs = tmp_path / "runs"
    for i, r in enumerate(variants):
        (runs / str(i)).mkdir(parents=True)
        (runs / str(i) / "record.json").write_text(json.dumps(r))
    report.build_report(runs, tmp_path / "report")
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| baseline (epochs=2) |" in table and "| baseline (epochs=20) |" in table and "never averaged" in table


def test_memory_headline_is_the_training_step_breakdown_and_rss_is_secondary(tiny_grid):
    out, _ = tiny_grid
    records = {r["config"]["setting"]: r for r in report.load_records(out) if r["config"]["scale"] == 1}
    rows = {r["setting"]: r for r in report.summarize(list(records.values()))}
    for setting, r in records.items():
        mem = r["resources"]["memory"]
        assert rows[setting]["train_memory_mib"] == mem["breakdown"]["total_bytes"] / 2**20
        assert rows[setting]["rss_peak_mib"] == mem["train_peak_bytes"] / 2**20  # CPU: the process's RSS
        assert mem["breakdown"]["total_bytes"] == sum(mem["breakdown"][k] for k in (
            "parameters_bytes", "buffers_bytes", "gradients_bytes", "optimizer_state_bytes", "activations_bytes"))
    assert rows["half+8bit"]["train_memory_mib"] < rows["baseline"]["train_memory_mib"]  # what RSS hid
    head = report.markdown_table(list(rows.values())).splitlines()[0]
    assert head.index("Train mem. (MiB)") < head.index("RSS peak (MiB)") and "Train peak" not in head
    assert "train mem. " in runner._summary_line(records["baseline"])


def test_estimated_energy_is_marked_in_tables_and_plots(tiny_grid, tmp_path, monkeypatch):
    import copy
    import json

    out, _ = tiny_grid
    runs = tmp_path / "runs"
    for i, r in enumerate(report.load_records(out)):
        r = copy.deepcopy(r)
        r["resources"]["energy"] = {"available": True, "estimated": True, "source": "estimate: " + measure.ESTIMATE,
                                    "reason": None, "train_wh": 0.5 + i, "inference_wh": 0.01,
                                    "model": {"tdp_w": 85.0, "tdp_source": "CodeCarbon's default", "logical_cpus": 2,
                                              "watts_per_cpu": 42.5}}
        (runs / str(i)).mkdir(parents=True)
        (runs / str(i) / "record.json").write_text(json.dumps(r))
    texts = _texts_of_saved_figures(monkeypatch)
    report.build_report(runs, tmp_path / "report")
    table = (tmp_path / "report" / "table.md").read_text()
    assert " est. |" in table and "Energy est.: estimated, not measured" in table and "42.5 W per CPU-second" in table
    assert " est. " in (tmp_path / "report" / "table.tex").read_text()
    assert {r["energy_estimated"] for r in __import__("csv").DictReader(open(tmp_path / "report" / "table.csv"))} == {"True"}
    assert any("Energy (Wh) (estimated)" in t for t in texts)  # the radar axis


def test_report_intervals_comparison_with_baseline_and_terminal_summary(tiny_grid, tmp_path):
    """Three seeds (copies of the tiny grid's records with other test scores): a setting 0.1 better on every
    seed differs from baseline, one that varies around it is within noise; the terminal summary fits 100 columns."""
    import copy
    import json

    out, _ = tiny_grid
    runs = tmp_path / "runs"
    records = [r for r in report.load_records(out) if r["config"]["scale"] == 1]
    for setting, shifts in (("baseline", (0.0, 0.0, 0.0)), ("half+8bit", (0.1, 0.1, 0.1)), ("amp", (0.1, -0.1, 0.0))):
        for seed, shift in zip((1, 2, 3), shifts):
            r = copy.deepcopy(next(x for x in records if x["config"]["setting"] == setting.replace("amp", "baseline")))
            r["config"].update(seed=seed, setting=setting)
            p = r["metrics"]["test_predictions"]
            y = np.asarray(p["label"])
            p["score"] = list(0.3 * y + 0.7 * np.random.default_rng(seed).random(y.size))
            for key in ("auc", "balanced_accuracy"):
                r["metrics"]["test"][key] = 0.7 + 0.02 * seed + shift
            (runs / f"{setting}{seed}").mkdir(parents=True)
            (runs / f"{setting}{seed}" / "record.json").write_text(json.dumps(r))
    rows = {r["setting"]: r for r in report.summarize(report.load_records(runs))}
    base = rows["baseline"]
    assert base["auc_vs_baseline"] is None and base["n"] == 3
    assert 0 <= base["auc_ci_low"] < base["auc_ci_high"] <= 1
    assert rows["half+8bit"]["auc_vs_baseline"] == pytest.approx(0.1) and rows["half+8bit"]["auc_within_noise"] is False
    assert rows["amp"]["auc_vs_baseline"] == pytest.approx(0.0, abs=1e-12) and rows["amp"]["auc_within_noise"] is True
    report.build_report(runs, tmp_path / "report")
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| AUC 95% CI |" in table and "+0.100 [" in table and " differs |" in table and " noise |" in table
    csv_rows = list(__import__("csv").DictReader(open(tmp_path / "report" / "table.csv")))
    assert {"auc_ci_low", "auc_vs_baseline", "balanced_accuracy_within_noise"} <= set(csv_rows[0])
    summary = report.terminal_table(list(rows.values()))
    assert max(map(len, summary.splitlines())) <= 100
    assert "AUC [95% CI]" in summary and "within seed noise: amp; differs: half+8bit" in summary


def test_jobs_apply_to_runs_in_a_process_of_their_own():
    assert config.concurrent_runs(config.load("quick")) == 2  # one per core of the project's 2-core machine
    assert config.concurrent_runs(config.load("quick", overrides={"nproc": 2})) == 1  # a run uses both already
    assert config.concurrent_runs(config.load("quick", sets=["isolate=false"])) == 1
    with pytest.raises(ValueError, match="jobs must be a whole number >= 1"):
        config.expand(config.load("quick", overrides={"jobs": 0}))


def test_downsampling_title_claims_no_spread_over_one_seed(tiny_grid, tmp_path, monkeypatch):
    out, _ = tiny_grid
    texts = _texts_of_saved_figures(monkeypatch)
    report.build_report(out, tmp_path)
    title = next(t for t in texts if t.startswith("rsna / densenet_small: down-sampling"))
    assert "over seeds" not in title and "one seed" in title


def test_dry_run_refuses_unknown_models_and_settings(tmp_path, capsys):
    base = ["experiment", "--task", "tabular", "--seeds", "1", "--out", str(tmp_path / "runs"), "--dry-run"]
    assert cli.main(base + ["--models", "nosuchnet", "--settings", "baseline"]) == 2
    assert "unknown model(s) nosuchnet" in capsys.readouterr().err
    assert cli.main(base + ["--models", "mlp", "--settings", "fp7"]) == 2
    assert "unknown setting" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_cli_messages(capsys):
    assert cli.main(["experiment", "--preset", "nosuch", "--dry-run"]) == 2
    assert "error: 'nosuch' is neither a preset (quick, " in capsys.readouterr().err
    for argv, words in ((["experiment", "--help"], ["--set data.rsna.root=DIR", "--generate-data"]),
                        (["report", "--help"], ["runs_dir", "the runs folder of `pyquant experiment`"])):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert all(w in text for w in words), text
    assert cli.main(["experiment", "--models", "nosuchnet", "--dry-run"]) == 2
    assert "error: unknown model(s) nosuchnet" in capsys.readouterr().err  # a KeyError's text, without its quotes


def test_ctrl_c_while_a_run_process_imports_is_one_line(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the spawned run process still
    imports torch: the command says "interrupted" in one line and exits with 130, no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "pyquant.cli", "experiment", "--task", "tabular", "--models", "mlp",
               "--settings", "baseline", "--seeds", "1", "--epochs", "1", "--quiet", "--out", str(tmp_path / "runs")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def run_process_started() -> bool:
        for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:  # a short-lived helper that is already gone
                pass
        return False

    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not run_process_started():
        time.sleep(0.01)
    time.sleep(0.3)  # the run process is now starting Python and importing torch
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err and "interrupted" in out + err and len(err.splitlines()) <= 2, err
