"""Tables and figures from run records: ``pyquant report RUNS_DIR``.

Groups records by their full config without the seed (runs that differ in anything else, epochs say, are never
averaged) and reports mean ± std over seeds (sample std, n-1) as markdown, CSV and LaTeX; when one (task, model)
has runs of several configs, each row names the config keys that differ. draws one radar plot per (task, model) and a down-sampling curve per (task, model) that has several
scales. Radar axes all use one normalisation: the best value among the plotted settings divided by the value
(lower is better) or the value divided by the best (higher is better), so every axis runs from 0 to 1, the outer
ring is the best setting on that axis, and outward is better everywhere.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import warnings
from collections import defaultdict
from pathlib import Path

from pyquant.experiment.config import identity
from pyquant.experiment.measure import ESTIMATE
from pyquant.experiment.metrics import bootstrap_intervals, paired_difference
from pyquant.experiment.settings import SETTINGS

MIB = 2**20


def train_memory_bytes(record: dict) -> int | None:
    """The headline training memory: the training step's parameters + buffers + gradients + optimizer states +
    activations (resources.memory.breakdown; on CUDA its activations are the allocator peak minus the rest, so the
    sum is the allocator's training peak). On CPU it is exact; the process's RSS, mostly Python and torch themselves,
    would hide the differences between settings, so it is only the secondary column."""
    return (record["resources"]["memory"].get("breakdown") or {}).get("total_bytes")


def rss_peak_bytes(record: dict) -> int | None:
    memory = record["resources"]["memory"]
    return memory["train_peak_bytes"] if "RSS" in memory["method"] else None


def _mib(value):
    return None if value is None else value / MIB

# (key, header, getter, digits, higher_is_better)
COLUMNS = [
    ("accuracy", "Acc", lambda r: r["metrics"]["test"]["accuracy_argmax"], 3, True),
    ("balanced_accuracy", "Bal. acc", lambda r: r["metrics"]["test"]["balanced_accuracy"], 3, True),
    ("auc", "AUC", lambda r: r["metrics"]["test"]["auc"], 3, True),
    ("sensitivity", "Sens", lambda r: r["metrics"]["test"]["sensitivity"], 3, True),
    ("specificity", "Spec", lambda r: r["metrics"]["test"]["specificity"], 3, True),
    ("train_memory_mib", "Train mem. (MiB)", lambda r: _mib(train_memory_bytes(r)), 1, False),
    ("rss_peak_mib", "RSS peak (MiB)", lambda r: _mib(rss_peak_bytes(r)), 0, False),
    ("train_growth_mib", "Train growth (MiB)", lambda r: r["resources"]["memory"]["train_growth_bytes"] / MIB, 0, False),
    ("eval_peak_mib", "Eval peak (MiB)", lambda r: r["resources"]["memory"]["eval_peak_bytes"] / MIB, 0, False),
    ("optimizer_state_mib", "Opt. state (MiB)", lambda r: r["resources"]["memory"]["optimizer_state_bytes"] / MIB, 2, False),
    ("time_to_best_s", "T best (s)", lambda r: r["resources"]["time"]["to_best_s"], 1, False),
    ("train_time_s", "T total (s)", lambda r: r["resources"]["time"]["train_total_s"], 1, False),
    ("best_epoch", "Best epoch", lambda r: r["training"]["best_epoch"], 1, False),
    ("inference_s", "Inference (s)", lambda r: r["resources"]["time"]["inference_s"], "3g", False),
    ("energy_train_wh", "Energy (Wh)", lambda r: r["resources"]["energy"].get("train_wh"), 2, False),
]
# The memory breakdown of a training step (record: resources.memory.breakdown): (key, header).
BREAKDOWN = [("parameters_bytes", "Params"), ("buffers_bytes", "Buffers"), ("gradients_bytes", "Grads"),
             ("optimizer_state_bytes", "Opt. states"), ("activations_bytes", "Activations"), ("total_bytes", "Sum")]
RADAR_AXES = ["auc", "balanced_accuracy", "train_memory_mib", "optimizer_state_mib", "time_to_best_s", "inference_s",
              "energy_train_wh"]
RULES = {"youden": "Youden's J", "fixed": "fixed 0.5"}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def load_records(runs_dir: str | Path) -> list[dict]:
    """The finished run records under ``runs_dir``. A record that cannot be read, or lacks a field the report
    needs, is skipped with a warning naming the file (unfinished runs, status other than "done", silently)."""
    records = []
    for path in sorted(Path(runs_dir).rglob("record.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            warnings.warn(f"{path}: skipped, the record cannot be read ({e})", RuntimeWarning, stacklevel=2)
            continue
        if not isinstance(record, dict) or record.get("status") != "done":
            continue
        try:
            summarize([record])  # reads every field the report uses
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            what = f"lacks the field {e.args[0]!r}" if isinstance(e, KeyError) else f"has a malformed field ({e})"
            warnings.warn(f"{path}: skipped, the record {what}", RuntimeWarning, stacklevel=2)
            continue
        records.append(record)
    return records


def precision(record: dict) -> str:
    s = record["setting"]
    parts = []
    if s.get("autocast_dtype"):
        parts.append(f"{SHORT.get(s['autocast_dtype'], s['autocast_dtype'])} autocast")
    parts.append(f"{SHORT.get(s['model_dtype'], s['model_dtype'])} model")
    if s.get("loss_scaling_used"):
        parts.append("loss scaling")
    return ", ".join(parts)


def _mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _order(setting: str) -> tuple:
    names = list(SETTINGS)
    return (names.index(setting) if setting in names else len(names), setting)


def _flat(config: dict, prefix: str = "") -> dict:
    """A run's config as dotted keys (data.root, ...), without the hash and the seed."""
    out = {}
    for key, value in (identity(config) if not prefix else config).items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        elif prefix or key != "seed":
            out[prefix + key] = value
    return out


# Shown as columns of their own; the other config keys that differ between the groups of a (task, model) are named.
SHOWN = ("task", "model", "setting", "scale")


def _differences(configs: list[dict]) -> list[str]:
    """Config keys (dotted) whose values differ between ``configs``, the columns excepted."""
    flats = [_flat(c) for c in configs]
    keys = sorted({k for f in flats for k in f} - set(SHOWN))
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]


def row_label(row: dict) -> str:
    """The setting, followed by the config keys that set this row apart from others of its (task, model)."""
    return f"{row['setting']} ({row['config_differs']})" if row["config_differs"] else row["setting"]


def summarize(records: list[dict]) -> list[dict]:
    """One row per config without the seed: means and stds of COLUMNS over the seeds. Rows of one (task, model)
    whose configs differ in more than setting and scale say how (``config_differs``, e.g. "epochs=2")."""
    groups = defaultdict(list)
    for r in records:
        groups[json.dumps(_flat(r["config"]), sort_keys=True, default=str)].append(r)
    differing = defaultdict(set)
    for task, model in {(rs[0]["config"]["task"], rs[0]["config"]["model"]) for rs in groups.values()}:
        configs = [rs[0]["config"] for rs in groups.values()
                   if (rs[0]["config"]["task"], rs[0]["config"]["model"]) == (task, model)]
        differing[task, model] = _differences(configs)
    rows = []
    for rs in groups.values():
        c = rs[0]["config"]
        flat = _flat(c)
        task, model, setting, scale = (c[k] for k in SHOWN)
        differs = ", ".join(f"{k}={json.dumps(flat.get(k), default=str)}" for k in differing[task, model])
        row = {"task": task, "model": model, "setting": setting, "scale": scale, "config_differs": differs,
               "precision": precision(rs[0]),
               "seeds": sorted(r["config"]["seed"] for r in rs), "n": len(rs),
               "params_m": rs[0]["model"]["params"] / 1e6,
               "gflops": (rs[0]["model"]["flops_forward_per_sample"] or 0) / 1e9,
               "threshold_rule": rs[0]["metrics"]["threshold_rule"],
               "diverged": sum(bool(r["training"]["diverged"]) for r in rs),
               "energy_reason": rs[0]["resources"]["energy"].get("reason"),
               "energy_estimated": any(r["resources"]["energy"].get("estimated") for r in rs),
               "energy_model": rs[0]["resources"]["energy"].get("model"),
               "memory_method": rs[0]["resources"]["memory"]["method"],
               "device": rs[0]["environment"]["device"]}
        for key, _, get, _, _ in COLUMNS:
            row[key], row[key + "_std"] = _mean_std([get(r) for r in rs])
        predictions = [r["metrics"].get("test_predictions") for r in rs]  # absent in older records
        intervals = bootstrap_intervals([(p["label"], p["score"], p["patient_id"], r["metrics"]["threshold"])
                                         for p, r in zip(predictions, rs)]) if all(predictions) else {}
        for key in COMPARED:
            low, high = intervals.get(key, (None, None))
            row[key + "_ci_low"], row[key + "_ci_high"] = low, high
        row["per_seed"] = {r["config"]["seed"]: {key: r["metrics"]["test"][key] for key in COMPARED} for r in rs}
        row["peers"] = json.dumps({k: v for k, v in flat.items() if k != "setting"}, sort_keys=True, default=str)
        breakdowns = [r["resources"]["memory"].get("breakdown") or {} for r in rs]  # absent in older records
        for key, _ in BREAKDOWN:
            row["memory_" + key] = _mean_std([b.get(key) for b in breakdowns])[0]
        row["activations_method"] = breakdowns[0].get("activations_method")
        rows.append(row)
    _compare_with_baseline(rows)
    return sorted(rows, key=lambda r: (r["task"], r["model"], r["scale"], _order(r["setting"]), r["config_differs"]))


# Metrics with bootstrap intervals and a comparison with the baseline.
COMPARED = ("auc", "balanced_accuracy")


def _compare_with_baseline(rows: list[dict]) -> None:
    """Each row's difference from the baseline row of the same config (setting aside), paired by seed, with its
    t interval over seeds: ``<metric>_vs_baseline`` (mean), ``_low``, ``_high`` and ``<metric>_within_noise``."""
    baselines = {r["peers"]: r for r in rows if r["setting"] == "baseline"}
    for r in rows:
        base = baselines.get(r["peers"]) if r["setting"] != "baseline" else None
        seeds = sorted(set(r["per_seed"]) & set(base["per_seed"])) if base else []
        for key in COMPARED:
            d = paired_difference([r["per_seed"][s][key] for s in seeds], [base["per_seed"][s][key] for s in seeds]) \
                if seeds else None
            r[key + "_vs_baseline"], (r[key + "_vs_baseline_low"], r[key + "_vs_baseline_high"]) = \
                (d["mean"], d["ci"]) if d else (None, (None, None))
            r[key + "_within_noise"] = d["within_noise"] if d else None


def _fmt(mean, std, digits, n) -> str:
    if mean is None:
        return "n/a"
    spec = digits if isinstance(digits, str) else f".{digits}f"  # "3g": three significant digits
    if n == 1:
        return f"{mean:.0f}" if float(mean).is_integer() and digits in (0, 1) else f"{mean:{'.' + spec if isinstance(digits, str) else spec}}"
    spec = "." + spec if isinstance(digits, str) else spec
    return f"{mean:{spec}} ± {std:{spec}}"


HEAD = ["Task", "Model", "Params (M)", "GFLOPs", "Setting", "Precision", "S", "Seeds"]


def _cells(row: dict) -> list[str]:
    cells = [row["task"], row["model"], f"{row['params_m']:.2f}", f"{row['gflops']:.3g}", row_label(row),
             row["precision"], str(row["scale"]), str(row["n"])]
    for key, _, _, digits, _ in COLUMNS:
        cell = _fmt(row[key], row[key + "_std"], digits, row["n"])
        if key == "accuracy" and row["diverged"]:
            cell += "*"
        if key == "energy_train_wh" and row["energy_estimated"] and row[key] is not None:
            cell += " est."
        cells.append(cell)
    for key in COMPARED:
        cells.append(_interval(row[key + "_ci_low"], row[key + "_ci_high"]))
    for key in COMPARED:
        cells.append(_versus(row, key))
    return cells


# headers of the cells _cells adds after COLUMNS
EXTRA = ["AUC 95% CI", "Bal. acc 95% CI", "ΔAUC vs baseline", "ΔBal. acc vs baseline"]


def _interval(low, high) -> str:
    return "n/a" if low is None else f"[{low:.3f}, {high:.3f}]"


def _versus(row: dict, key: str) -> str:
    """"-0.004 [-0.020, 0.012] noise": the difference from baseline, its interval over seeds, and whether it is
    within seed noise ("noise") or not ("differs")."""
    if row[key + "_vs_baseline"] is None:
        return "-" if row["setting"] == "baseline" else "n/a"
    return (f"{row[key + '_vs_baseline']:+.3f} {_interval(row[key + '_vs_baseline_low'], row[key + '_vs_baseline_high'])} "
            + ("noise" if row[key + "_within_noise"] else "differs"))


def _notes(rows: list[dict]) -> list[str]:
    notes = [
        "Mean ± sample std over seeds (a single value: one seed). Acc: argmax accuracy (the paper's P_T). Bal. acc, Sens, Spec: at the "
        f"threshold chosen on validation ({', '.join(sorted({RULES.get(r['threshold_rule'], r['threshold_rule']) for r in rows}))}) "
        "applied to test. All on the best-on-validation checkpoint, reloaded from disk.",
        "T best: wall time from the start of training to the end of the best epoch; T total: until early stopping "
        "(both include validation passes). Inference: one synchronised pass over the pre-loaded test set, median "
        "of repeats after warm-up. Train growth: peak minus memory in use when the training phase began. "
        "* = at least one seed diverged.",
        "95% CI: percentile bootstrap of the mean over seeds, resampling test patients (all images of a drawn "
        "patient; the same draw for every seed; 1,000 replicates). Δ vs baseline: mean over seeds of the per-seed "
        "difference from baseline (same seeds), with a 95% t interval over seeds; \"noise\" when that interval "
        "holds 0 (the difference is within what the seeds alone vary), \"differs\" otherwise; n/a with one seed.",
    ]
    notes.append("Train mem.: one training step's parameters + buffers + gradients + optimizer states + activations "
                 "(the breakdown below); on CPU counted exactly from the tensors, on CUDA the allocator's training "
                 "peak. RSS peak: the process's peak resident memory in training (Python, torch and the data "
                 "included), shown second because it hides the differences between settings.")
    notes += sorted({f"Measured peaks on {r['device']}: {r['memory_method']}." for r in rows})
    if any(r["config_differs"] for r in rows):
        notes.append("A setting followed by keys in parentheses: runs of a different config (never averaged together); "
                     "the keys are those that differ between the configs of that task and model.")
    notes += sorted({_estimate_note(r["energy_model"]) for r in rows if r["energy_estimated"]})
    notes += sorted({f"Energy: unavailable ({r['energy_reason']})." for r in rows if r["energy_train_wh"] is None and r["energy_reason"]})
    return notes


def _estimate_note(model: dict | None) -> str:
    note = f"Energy est.: estimated, not measured (no energy counter on this machine): {ESTIMATE}"
    if model:
        note += (f", with TDP {model['tdp_w']:g} W ({model['tdp_source']}) / {model['logical_cpus']} logical CPUs "
                 f"= {model['watts_per_cpu']:.3g} W per CPU-second")
    return note + "."


def markdown_table(rows: list[dict]) -> str:
    head = HEAD + [c[1] for c in COLUMNS] + EXTRA
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in _notes(rows)) + "\n"


def terminal_table(rows: list[dict], width: int = 100) -> str:
    """The end-of-run summary for a terminal, lines of at most ``width`` columns: per row the setting, test AUC
    [95% CI], balanced accuracy, training memory, training time and energy; which settings differ from baseline
    beyond seed noise. The full table is table.md."""
    import textwrap

    def cell(row, key, digits, unit="", spread=False):  # the spread only where it matters: the metrics
        return "n/a" if row[key] is None else _fmt(row[key], row[key + "_std"], digits, row["n"] if spread else 1) + unit

    head = f"  {'Setting':<22} {'AUC [95% CI]':<20} {'Bal. acc':<13} {'Train mem.':>11} {'T total':>8} {'Energy':>13}"
    lines = []
    for task, model in sorted({(r["task"], r["model"]) for r in rows}):
        mine = [r for r in rows if (r["task"], r["model"]) == (task, model)]
        seeds = max(r["n"] for r in mine)
        lines += [f"{task} / {model} ({seeds} seed{'s' if seeds > 1 else ''}: mean ± std over seeds)", head]
        for r in mine:
            label = row_label(r) + (f", S={r['scale']}" if r["scale"] != min(x["scale"] for x in mine) else "")
            auc = "n/a" if r["auc"] is None else f"{r['auc']:.3f} {_interval(r['auc_ci_low'], r['auc_ci_high'])}"
            seconds = "n/a" if r["train_time_s"] is None else f"{r['train_time_s']:.0f} s"
            energy = cell(r, "energy_train_wh", 2, " Wh") + (" est." if r["energy_estimated"] and r["energy_train_wh"] else "")
            lines.append(f"  {textwrap.shorten(label, 22, placeholder='…'):<22} {auc:<20} "
                         f"{cell(r, 'balanced_accuracy', 3, spread=True):<13} {cell(r, 'train_memory_mib', 1, ' MiB'):>11} "
                         f"{seconds:>8} {energy:>13}")
        for key, name in (("auc", "AUC"), ("balanced_accuracy", "balanced accuracy")):
            verdicts = {v: [row_label(r) for r in mine if r[key + "_within_noise"] is v] for v in (True, False)}
            if verdicts[True] or verdicts[False]:
                text = (f"{name} vs baseline (paired over seeds, 95%): within seed noise: "
                        f"{', '.join(verdicts[True]) or 'none'}; differs: {', '.join(verdicts[False]) or 'none'}.")
                lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"


def breakdown_table(rows: list[dict]) -> str:
    """Markdown: where each setting's training-step memory goes, in MiB (mean over seeds)."""
    rows = [r for r in rows if r["memory_total_bytes"] is not None]
    if not rows:
        return ""
    head = ["Task", "Model", "Setting", "S"] + [f"{h} (MiB)" for _, h in BREAKDOWN]
    lines = ["### Memory of a training step", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["task"], r["model"], row_label(r), str(r["scale"])]
        cells += ["n/a" if r["memory_" + k] is None else f"{r['memory_' + k] / MIB:.2f}" for k, _ in BREAKDOWN]
        lines.append("| " + " | ".join(cells) + " |")
    methods = sorted({r["activations_method"] for r in rows if r["activations_method"]})
    notes = ["Parameters, buffers (batch-norm statistics), gradients and optimizer states are counted exactly from "
             "the tensors; activations: " + "; ".join(methods) + "."]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def csv_table(rows: list[dict]) -> str:
    keys = ["task", "model", "params_m", "gflops", "setting", "config_differs", "precision", "scale", "n", "diverged"]
    for key, *_ in COLUMNS:
        keys += [key, key + "_std"]
    keys.append("energy_estimated")
    for key in COMPARED:
        keys += [key + "_ci_low", key + "_ci_high", key + "_vs_baseline", key + "_vs_baseline_low",
                 key + "_vs_baseline_high", key + "_within_noise"]
    keys += ["memory_" + key for key, _ in BREAKDOWN]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _tex(text: str) -> str:
    for a, b in [("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("±", r"$\pm$"),
                 ("Δ", r"$\Delta$")]:
        text = text.replace(a, b)
    return text


def latex_table(rows: list[dict]) -> str:
    head = HEAD + [c[1] for c in COLUMNS] + EXTRA
    lines = [r"\begin{tabular}{" + "l" * len(HEAD) + "r" * (len(COLUMNS) + len(EXTRA)) + "}", r"\hline",
             " & ".join(_tex(h) for h in head) + r" \\", r"\hline"]
    lines += [" & ".join(_tex(c) for c in _cells(r)) + r" \\" for r in rows]
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def radar(rows: list[dict], title: str, path_stem: Path) -> list[Path]:
    """One polygon per setting; every axis = best/value (lower is better) or value/best (higher is better)."""
    plt = _plt()
    spec = {c[0]: c for c in COLUMNS}
    axes = [k for k in RADAR_AXES if all(r[k] is not None and r[k] > 0 for r in rows)]
    if len(axes) < 3:
        return []
    labels, scores = [], {row_label(r): [] for r in rows}
    for key in axes:
        _, header, _, digits, higher = spec[key]
        values = [r[key] for r in rows]
        best = max(values) if higher else min(values)
        estimated = " (estimated)" if key == "energy_train_wh" and any(r["energy_estimated"] for r in rows) else ""
        labels.append(f"{header}{estimated} {'↑' if higher else '↓'}\nbest {_fmt(best, 0.0, digits, 1)}")
        for r in rows:
            scores[row_label(r)].append(r[key] / best if higher else best / r[key])
    angles = [2 * math.pi * i / len(axes) for i in range(len(axes))]
    fig, ax = plt.subplots(figsize=(8, 6.5), subplot_kw={"projection": "polar"})
    for setting, vals in scores.items():
        ax.plot(angles + angles[:1], vals + vals[:1], linewidth=1.8, label=setting)
        ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.04)
    ax.set_xticks(angles)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax.set_yticklabels(["0.25", "0.5", "0.75", "1 = best"], fontsize=7)
    ax.set_title(title, fontsize=10, pad=18)
    ax.legend(loc="upper left", bbox_to_anchor=(1.12, 1.05), fontsize=8, title="setting")
    missing = [spec[k][1] for k in RADAR_AXES if k not in axes]
    note = "Each axis: value/best (↑) or best/value (↓) over the settings shown; outward is better."
    if missing:
        note += f"\nNot plotted (unavailable): {', '.join(missing)}."
    if "energy_train_wh" in axes and any(r["energy_estimated"] for r in rows):
        note += f"\nEnergy estimated, not measured: {ESTIMATE}."
    ax.text(0.5, -0.09, note, ha="center", va="top", fontsize=7.5, transform=ax.transAxes)
    out = []
    for ext in ("png", "pdf"):
        path = path_stem.with_suffix(f".{ext}")
        fig.savefig(path, dpi=130, bbox_inches="tight")
        out.append(path)
    plt.close(fig)
    return out


def downsampling_curve(rows: list[dict], title: str, path_stem: Path) -> list[Path]:
    """Test AUC and balanced accuracy against the down-sampling factor S, per setting: the mean over seeds, with
    ± one std shaded when there are several."""
    plt = _plt()
    by_setting = defaultdict(list)
    for r in rows:
        by_setting[row_label(r)].append(r)
    by_setting = {s: sorted(v, key=lambda r: r["scale"]) for s, v in by_setting.items() if len(v) > 1}
    if not by_setting:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in [(axes[0], "auc", "test AUC"), (axes[1], "balanced_accuracy", "test balanced accuracy")]:
        for setting, rs in by_setting.items():
            s = [r["scale"] for r in rs]
            m = [r[key] for r in rs]
            sd = [r[key + "_std"] or 0.0 for r in rs]
            ax.plot(s, m, marker="o", label=setting)
            ax.fill_between(s, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["scale"] for rs in by_setting.values() for r in rs})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlabel("down-sampling factor S (image side / S)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = max(r["n"] for rs in by_setting.values() for r in rs)
    fig.suptitle(title + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else " (one seed: no spread shown)"),
                 fontsize=10)
    fig.tight_layout()
    out = []
    for ext in ("png", "pdf"):
        path = path_stem.with_suffix(f".{ext}")
        fig.savefig(path, dpi=130)
        out.append(path)
    plt.close(fig)
    return out


def build_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write table.md/.csv/.tex, radar_<task>_<model>.png/.pdf and downsampling_<task>_<model>.png/.pdf."""
    records = load_records(runs_dir)
    if not records:
        raise FileNotFoundError(f"{runs_dir}: no finished run records (record.json) found")
    out = Path(out_dir) if out_dir else Path(runs_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    written = []
    breakdown = breakdown_table(rows)
    for name, text in [("table.md", markdown_table(rows) + ("\n" + breakdown if breakdown else "")),
                       ("table.csv", csv_table(rows)), ("table.tex", latex_table(rows))]:
        (out / name).write_text(text)
        written.append(out / name)
    pairs = sorted({(r["task"], r["model"]) for r in rows})
    for task, model in pairs:
        mine = [r for r in rows if r["task"] == task and r["model"] == model]
        base_scale = min(r["scale"] for r in mine)
        main = [r for r in mine if r["scale"] == base_scale]
        n = max(r["n"] for r in main)
        written += radar(main, f"{task} / {model} (S={base_scale}, {n} seed{'s' if n > 1 else ''})",
                         out / f"radar_{task}_{model}")
        written += downsampling_curve(mine, f"{task} / {model}: down-sampling", out / f"downsampling_{task}_{model}")
    return written
