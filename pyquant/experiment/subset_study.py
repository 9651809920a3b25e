"""The data-selection study in one command: run the ``subsets`` preset, then write the harness's report and this
study's table and plots.

    python -m pyquant.experiment.subset_study --report-dir docs/results/subsets

Finished runs are skipped (the harness resumes), so a second call only redraws. Writes, next to the harness's
table.md / radar plots: ``subsets.md`` and ``subsets.csv`` (one row per setting: mean ± std over seeds),
``accuracy_vs_fraction.png``, ``accuracy_vs_time.png`` and ``importance_vs_uniform.png`` (validation AUC against
wall-clock for the runs with a time budget).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path

from pyquant.experiment.settings import get_setting

METHOD_LABELS = {None: "all data", "random": "random", "moderate": "Moderate Coreset", "proxy": "via proxy (least conf.)"}
METRICS = [("auc", "AUC"), ("balanced_accuracy", "Bal. acc"), ("accuracy_argmax", "Acc")]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list[dict]) -> list[dict]:
    """One row per setting: method, fraction, sizes, and mean/std over seeds of the test metrics and the times."""
    groups = defaultdict(list)
    for r in records:
        groups[r["config"]["setting"]].append(r)
    rows = []
    for name, rs in groups.items():
        setting = get_setting(name)
        selections = [r["subsets"]["selection"] or {} for r in rs]
        row = {"setting": name, "method": setting.subset, "fraction": setting.subset_fraction,
               "importance_sampling": setting.importance_sampling, "budget_s": setting.time_budget_s,
               "seeds": len(rs), "train_samples": selections[0].get("train_after", rs[0]["data"]["train"])}
        columns = {key: [r["metrics"]["test"][key] for r in rs] for key, _ in METRICS}
        columns["selection_s"] = [s.get("selection_s", 0.0) for s in selections]
        columns["train_s"] = [r["resources"]["time"]["train_total_s"] for r in rs]
        columns["total_s"] = [a + b for a, b in zip(columns["selection_s"], columns["train_s"])]
        columns["epochs"] = [r["training"]["epochs_run"] for r in rs]
        columns["best_epoch"] = [r["training"]["best_epoch"] for r in rs]
        for key, values in columns.items():
            row[key], row[key + "_std"] = _mean_std(values)
        stats = [r["subsets"]["importance_sampling"] for r in rs if r["subsets"]["importance_sampling"]]
        row["importance_share"] = (statistics.fmean(s["importance_steps"] / s["steps"] for s in stats) if stats else None)
        rows.append(row)
    order = {m: i for i, m in enumerate(METHOD_LABELS)}
    return sorted(rows, key=lambda r: (r["budget_s"] is not None, r["importance_sampling"], order.get(r["method"], 9),
                                       -r["fraction"]))


def markdown(rows: list[dict]) -> str:
    head = ["Setting", "Data", "Train samples", "Seeds"] + [h for _, h in METRICS] + [
        "Selection (s)", "Training (s)", "Total (s)", "Epochs", "IS steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        data = f"{r['fraction']:.0%} {METHOD_LABELS.get(r['method'], r['method'])}"
        data += ", importance sampling" if r["importance_sampling"] else ""
        data += f", {r['budget_s']:g} s budget" if r["budget_s"] is not None else ""
        cells = [f"`{r['setting']}`", data,
                 f"{r['train_samples']}", f"{r['seeds']}"]
        cells += [f"{r[k]:.3f} ± {r[k + '_std']:.3f}" for k, _ in METRICS]
        cells += [f"{r[k]:.1f} ± {r[k + '_std']:.1f}" for k in ("selection_s", "train_s", "total_s")]
        cells += [f"{r['epochs']:.1f}", "-" if r["importance_share"] is None else f"{r['importance_share']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(ax, xlabel: str, ylabel: str, title: str, title_size: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=title_size)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    _plt().close(fig)
    return path


def _by_method(rows: list[dict]) -> dict:
    """Per selection method, its rows plus the all-data row (the 100 % point every curve shares)."""
    plain = [r for r in rows if not r["importance_sampling"] and r["budget_s"] is None]
    full = [r for r in plain if r["method"] is None]
    return {m: sorted([r for r in plain if r["method"] == m] + full, key=lambda r: r["fraction"])
            for m in METHOD_LABELS if m is not None and any(r["method"] == m for r in plain)}


def plot_fraction(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, label) in zip(axes, METRICS[:2]):
        for method, rs in _by_method(rows).items():
            ax.errorbar([100 * r["fraction"] for r in rs], [r[key] for r in rs], yerr=[r[key + "_std"] for r in rs],
                        marker="o", capsize=3, label=METHOD_LABELS[method])
        ax.set_xlabel("training data kept (%)")
        ax.set_ylabel(f"test {label}")
        ax.set_xticks([25, 50, 100])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Accuracy against data fraction (mean ± std over seeds)", fontsize=10)
    return _save(fig, path)


def plot_time(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rs in _by_method(rows).items():
        ax.errorbar([r["total_s"] for r in rs], [r["auc"] for r in rs], xerr=[r["total_s_std"] for r in rs],
                    yerr=[r["auc_std"] for r in rs], marker="o", capsize=3, label=METHOD_LABELS[method])
        for r in rs:
            ax.annotate(f"{r['fraction']:.0%}", (r["total_s"], r["auc"]), fontsize=7, textcoords="offset points",
                        xytext=(4, 4))
    _label(ax, "selection + training wall-clock (s)", "test AUC", "Accuracy against time (mean ± std over seeds)", 10)
    return _save(fig, path)


def plot_importance(records: list[dict], path: Path) -> Path | None:
    """Validation AUC against wall-clock (training and validation passes) for every run with a time budget."""
    budgeted = [r for r in records if get_setting(r["config"]["setting"]).time_budget_s is not None]
    if not budgeted:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for r in sorted(budgeted, key=lambda r: (r["config"]["setting"], r["config"]["seed"])):
        name = r["config"]["setting"]
        t, times = 0.0, []
        for epoch in r["training"]["history"]:
            t += epoch["train_s"] + epoch["val_s"]
            times.append(t)
        first = name not in colours
        colours.setdefault(name, f"C{len(colours)}")
        ax.plot(times, [e["val_auc"] for e in r["training"]["history"]], marker=".", color=colours[name], alpha=0.8,
                label=name if first else None)
    for budget in sorted({get_setting(r["config"]["setting"]).time_budget_s for r in budgeted}):
        ax.axvline(budget, color="grey", linestyle=":")
    _label(ax, "wall-clock since the start of training (s)", "validation AUC",
           "Importance sampling against uniform batches at equal budgets (dotted; one line per seed)", 8)
    return _save(fig, path)


def write_report(runs_dir: str | Path, out_dir: str | Path) -> list[Path]:
    from pyquant.experiment.report import load_records

    records = load_records(runs_dir)
    if not records:
        raise FileNotFoundError(f"{runs_dir}: no finished run records (record.json) found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    (out / "subsets.md").write_text(markdown(rows))
    (out / "subsets.csv").write_text(csv_text(rows))
    written = [out / "subsets.md", out / "subsets.csv", plot_fraction(rows, out / "accuracy_vs_fraction.png"),
               plot_time(rows, out / "accuracy_vs_time.png")]
    importance = plot_importance(records, out / "importance_vs_uniform.png")
    return written + ([importance] if importance else [])


def main(argv: list[str] | None = None) -> int:
    from pyquant.experiment import config, runner
    from pyquant.experiment.report import build_report

    parser = argparse.ArgumentParser(prog="python -m pyquant.experiment.subset_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="subsets", help="preset or config file (default: subsets)")
    parser.add_argument("--out", help="runs folder (default: the preset's, runs/subsets)")
    parser.add_argument("--report-dir", help="where the tables and plots go (default: <out>/report)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, as for pyquant experiment")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    cfg = config.load(args.preset, overrides={"out": args.out}, sets=args.set)
    code = runner.run_grid(cfg, progress=not args.quiet)
    if code:
        return code
    report_dir = Path(args.report_dir) if args.report_dir else Path(cfg["out"]) / "report"
    written = build_report(cfg["out"], report_dir) + write_report(cfg["out"], report_dir)
    print((report_dir / "subsets.md").read_text())
    print("report: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
