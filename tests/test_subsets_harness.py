"""pyquant.subsets in the study harness: composite setting names, and runs that select, importance-sample and
stop on a time budget, end to end on the tabular task (fast)."""

from __future__ import annotations

import pytest
import torch

from pyquant.experiment import config, report, runner, settings, subset_settings
from pyquant.subsets import moderate_coreset


def test_composite_setting_names():
    s = settings.get_setting("amp+8bit+subset:proxy@0.25")
    assert (s.optimizer, s.autocast, s.subset, s.subset_fraction, s.importance_sampling) == ("8bit", "auto", "proxy", 0.25, False)
    assert s.name == "amp+8bit+subset:proxy@0.25"
    s = settings.get_setting("subset:moderate@0.5")
    assert (s.optimizer, s.autocast, s.subset, s.subset_fraction) == ("adam", None, "moderate", 0.5)
    s = settings.get_setting("8bit+importance-sampling")
    assert s.optimizer == "8bit" and s.importance_sampling and s.subset is None
    s = settings.get_setting("half+8bit+subset:random@1+importance-sampling+budget:30s")
    assert (s.model_dtype, s.subset, s.subset_fraction, s.importance_sampling, s.time_budget_s) == ("auto", "random", 1.0, True, 30.0)
    recipe = settings.resolve("amp+8bit+subset:proxy@0.25", "cpu")
    assert recipe.autocast_dtype == torch.bfloat16
    assert recipe.record()["subset"] == "proxy" and recipe.record()["subset_fraction"] == 0.25
    assert "amp+8bit+subset:proxy@0.25" not in settings.SETTINGS  # composites are resolved, not registered


@pytest.mark.parametrize("name, error, match", [
    ("subset:moderate@1.5", ValueError, r"fraction must be in \(0, 1\]"),
    ("subset:moderate@0", ValueError, r"fraction must be in \(0, 1\]"),
    ("subset:moderate@nan", ValueError, r"fraction must be in \(0, 1\]"),
    ("subset:moderate", ValueError, "needs a fraction"),
    ("subset:clusters@0.5", ValueError, "unknown subset method 'clusters'"),
    ("fp8+importance-sampling", KeyError, "unknown setting 'fp8'"),
    ("importance-sampling+8bit", ValueError, "modifiers come after"),
    ("subset:random@0.5+subset:moderate@0.5", ValueError, "repeats a modifier"),
    ("baseline+budget:0s", ValueError, "positive number of seconds"),
    ("baseline+budget:10", ValueError, "positive number of seconds"),
])
def test_bad_setting_names(name, error, match):
    with pytest.raises(error, match=match):
        settings.get_setting(name)


def _cfg(out, settings_, epochs=3, **kw):
    return config.load("quick", overrides={"tasks": ["tabular"], "models": ["mlp"], "settings": settings_, "seeds": [1],
                                           "epochs": epochs, "patience": 50, "out": str(out), "lr": 1e-3, "isolate": False,
                                           "batch_size": 16, **kw},
                       sets=["downsample.scales=[]"])


@pytest.fixture(scope="module")
def tabular_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("subsets") / "runs"
    names = ["baseline", "subset:random@0.25", "subset:moderate@0.5", "8bit+subset:proxy-forgetting@0.5",
             "importance-sampling"]
    assert runner.run_grid(_cfg(out, names), progress=False, log=lambda *a: None) == 0
    return out, {r["config"]["setting"]: r for r in report.load_records(out)}


def test_runs_train_on_the_selected_subset(tabular_runs):
    _, records = tabular_runs
    n = records["baseline"]["data"]["train"]
    assert records["baseline"]["subsets"] == {"selection": None, "importance_sampling": None}
    rand = records["subset:random@0.25"]["subsets"]["selection"]
    assert rand["train_before"] == n and rand["train_after"] == round(n * 0.25) and rand["proxy"] is None
    moderate = records["subset:moderate@0.5"]["subsets"]["selection"]
    assert moderate["train_after"] == round(n * 0.75) - round(n * 0.25)
    assert moderate["proxy"]["epochs"] == subset_settings.PROXY_EPOCHS and moderate["proxy"]["features"] == 128
    assert moderate["selection_s"] > 0 and sum(moderate["class_counts_after"]) == moderate["train_after"]
    proxy = records["8bit+subset:proxy-forgetting@0.5"]
    assert proxy["subsets"]["selection"]["train_after"] == round(n * 0.5) and proxy["setting"]["optimizer"] == "8bit"
    for r in records.values():
        assert r["metrics"]["test"]["auc"] > 0.8  # every run learned the (easy) task


def test_selection_leaves_the_global_rng_alone(tabular_runs):
    # The proxy is built and trained under a forked RNG, so the target's dropout masks (and anything else drawn from
    # the global RNG after the selection) are those of the run without a subset.
    from pyquant.experiment.tasks import get_task

    _, records = tabular_runs
    run = records["subset:moderate@0.5"]["config"]
    data = get_task("tabular", run["data"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    subset_settings.training_subset(run, settings.get_setting(run["setting"]), data, lambda x: x.float(), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)


def test_moderate_run_selects_what_the_api_selects(tabular_runs):
    from pyquant.experiment.tasks import get_task

    _, records = tabular_runs
    record = records["subset:moderate@0.5"]
    run = record["config"]
    data = get_task("tabular", run["data"])
    setting = settings.get_setting(run["setting"])
    subset, selection = subset_settings.training_subset(run, setting, data, lambda x: x.float(), torch.device("cpu"))
    assert selection["train_after"] == record["subsets"]["selection"]["train_after"]
    assert selection["class_counts_after"] == record["subsets"]["selection"]["class_counts_after"]  # deterministic
    # Same proxy again, and the kept indices are the moderate band of its features.
    torch.manual_seed(run["seed"])
    from pyquant.experiment.models import create_model
    from pyquant.subsets import penultimate_features, train_proxy

    proxy = create_model("mlp", in_chans=data.in_chans, num_classes=2)
    train_proxy(proxy, data.train, subset_settings.PROXY_EPOCHS, run["lr"], run["batch_size"], run["seed"], lambda x: x.float())
    features, _, labels = penultimate_features(proxy, torch.utils.data.DataLoader(data.train, batch_size=2 * run["batch_size"]))
    assert subset.indices == moderate_coreset(features, labels, 0.5).tolist()


def test_importance_sampling_run_records_its_sampler(tabular_runs):
    _, records = tabular_runs
    stats = records["importance-sampling"]["subsets"]["importance_sampling"]
    n = records["importance-sampling"]["data"]["train"]
    assert stats["batch_size"] == 16 and stats["presample_size"] == 48 and stats["tau_threshold"] == 2.0
    assert stats["steps"] == 3 * -(-n // 16) and 0 <= stats["importance_steps"] <= stats["steps"] and stats["tau"] > 0


def test_time_budget_stops_training(tmp_path):
    cfg = _cfg(tmp_path / "runs", ["baseline+budget:0.001s"], epochs=5)
    assert runner.run_grid(cfg, progress=False, log=lambda *a: None) == 0
    (record,) = report.load_records(tmp_path / "runs")
    assert record["training"]["epochs_run"] == 1
    assert record["subsets"]["time_budget_s"] == 0.001 and record["subsets"]["stopped_by_budget"] is True


def test_grid_refuses_a_bad_setting_before_running(tmp_path):
    with pytest.raises(ValueError, match="fraction must be in"):
        runner.run_grid(_cfg(tmp_path / "runs", ["subset:moderate@2"]), progress=False, log=lambda *a: None)
    assert not list((tmp_path / "runs").glob("*/record.json"))
