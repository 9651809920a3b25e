"""The `pyquant` command."""

from __future__ import annotations

import argparse
import sys


def _experiment_parser(commands) -> None:
    p = commands.add_parser(
        "experiment",
        help="run the resource-efficiency study (a grid of task x model x setting x seed x scale runs)",
        usage="%(prog)s [--preset NAME|FILE] [--set data.rsna.root=DIR] [--set KEY=VALUE ...] [options]",
        description="Run the study; finished runs (same config hash) are skipped, so an interrupted grid resumes "
        "when the same command is run again. Writes one JSON record per run and, at the end, the report.",
        epilog="Data: the quick preset generates demo data into data/rsna-demo. For the real RSNA data give "
        "--set data.rsna.root=DIR (the folder holding train.csv and train_images/), for LIDC --set "
        "data.lidc.path=FILE (the patch pickle). A root that lacks its data is an error; add --generate-data to "
        "write generated data there instead.",
    )
    p.add_argument("--preset", default="quick", help="quick, paper, or a TOML/YAML config file (default: quick)")
    p.add_argument("--task", nargs="+", dest="tasks", help="rsna, lidc, tabular")
    p.add_argument("--models", nargs="+", help="registered model names (e.g. densenet121 vit_tiny swin_tiny mlp)")
    p.add_argument("--settings", nargs="+", help="baseline amp 8bit amp+8bit half+8bit lion8bit amp+lion8bit bnb-8bit "
                   "bf16, each optionally followed by +subset:<method>@<fraction> (random, moderate, proxy, ...), "
                   "+importance-sampling, +budget:<seconds>s, e.g. amp+8bit+subset:proxy@0.25 (docs/subsets.md)")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--scales", nargs="+", type=int, help="down-sampling factors S (1 2 4 8)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--monitor", choices=["val_loss", "val_auc"])
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--amp-dtype", dest="amp_dtype", choices=["auto", "bfloat16", "float16"])
    p.add_argument("--half-dtype", dest="half_dtype", choices=["auto", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    p.add_argument("--jobs", type=int, help="runs at a time, each in its own process (the quick preset: 2, one per "
                   "core of a 2-core machine)")
    p.add_argument("--nproc", type=int, help="data-parallel processes per run (DDP; gloo on CPU, nccl on CUDA); "
                   "--batch-size is the global batch, split evenly over them")
    p.add_argument("--out", help="runs folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, dotted, value in TOML syntax (e.g. data.rsna.root='/data/rsna')")
    p.add_argument("--generate-data", action="store_true", dest="generate_data",
                   help="write generated data (in the real format) into the data roots when they hold none; without "
                   "it, only the demo folders (data/rsna-demo) get generated data")
    p.add_argument("--report-dir", help="where to write the report (default: <out>/report)")
    p.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each is finished, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _experiment(args) -> int:
    from pathlib import Path

    from pyquant.experiment import config, records, runner

    overrides = {k: getattr(args, k) for k in ("tasks", "models", "settings", "seeds", "scales", "epochs", "patience",
                                               "monitor", "batch_size", "lr", "device", "amp_dtype", "half_dtype",
                                               "threads", "jobs", "nproc", "out")}
    cfg = config.load(args.preset, overrides=overrides, sets=args.set)
    if args.generate_data:
        from pyquant.experiment.tasks import DEMO_DATA

        for task in set(cfg["tasks"]) & set(DEMO_DATA):
            cfg = config.set_key(cfg, f"data.{task}.write_generated", True)
    if args.print_config:
        print(config.to_toml(cfg), end="")
        return 0
    if args.dry_run:
        runs = config.expand(cfg)
        runner.check_names(runs)  # an unknown model or setting is an error here too, not a "todo" run
        for run in runs:
            name = config.run_name(run)
            print(("done  " if records.is_finished(Path(cfg["out"]) / name, run["hash"]) else "todo  ") + name)
        return 0
    code = runner.run_grid(cfg, progress=not args.quiet)
    if code == 0 and not args.no_report:
        from pyquant.experiment.report import build_report

        from pyquant.experiment.report import load_records, summarize, terminal_table

        written = build_report(cfg["out"], args.report_dir)
        print(terminal_table(summarize(load_records(cfg["out"]))), end="")
        print(f"full table and plots: {next(p for p in written if p.name == 'table.md').parent}/")
    return code


def _message(e: Exception) -> str:
    """An exception's message: str() of a KeyError is its argument in quotes, so take the argument itself."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _kernel_matrix(matrix: dict[str, dict[str, bool]]) -> str:
    """The op x backend table of `pyquant info`: which backend has a kernel for which op."""
    names = list(next(iter(matrix.values())))
    width = max(len(op) for op in matrix)
    lines = [f"{'op':<{width}}  " + "  ".join(f"{n:<9}" for n in names)]
    for op, has in matrix.items():
        lines.append(f"{op:<{width}}  " + "  ".join(f"{'yes' if has[n] else '-':<9}" for n in names))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyquant", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small model with torch.optim.Adam and pyquant.Adam8bit side by side")
    demo.add_argument("--epochs", type=int, default=30)
    commands.add_parser("info", help="show the backends and the instruction set pyquant uses here")
    _experiment_parser(commands)
    report = commands.add_parser("report", help="tables (markdown, CSV, LaTeX) and radar plots from a runs folder",
                                 description="Tables (markdown, CSV, LaTeX), radar plots and down-sampling curves "
                                 "from the run records of `pyquant experiment`. Runs with the same config but the "
                                 "seed are summarised over seeds; different configs get separate rows.")
    report.add_argument("runs_dir", help="the runs folder of `pyquant experiment` (its --out, e.g. runs/quick); "
                        "every record.json under it is read")
    report.add_argument("--out", help="output folder (default: RUNS_DIR/report)")
    from pyquant import profiling

    profiling.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pyquant import demo as demo_module

        demo_module.main(epochs=args.epochs)
    elif args.command == "info":
        import torch

        from pyquant import backends
        from pyquant.backends import capi

        print(f"torch {torch.__version__}; CPU library: {capi.cpu_isa()}")
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            usable = [name for name in backends.BACKENDS if backends.available(name, device)]
            print(f"{device}: default backend {backends.select(device)}; available: {', '.join(usable)}")
        print(_kernel_matrix(backends.matrix()))
    elif args.command == "experiment":
        try:
            return _experiment(args)
        except KeyboardInterrupt:  # while torch was being imported, before a run started: no traceback either
            print("pyquant experiment: interrupted", file=sys.stderr)
            return 130
        except (KeyError, ValueError, OSError, RuntimeError) as e:
            print(f"pyquant experiment: error: {_message(e)}", file=sys.stderr)
            return 2
    elif args.command == "profile":
        try:
            return profiling.main(args)
        except (profiling.ProfileError, KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"pyquant profile: error: {_message(e)}", file=sys.stderr)
            return 2
    elif args.command == "report":
        from pyquant.experiment.report import build_report

        try:
            written = build_report(args.runs_dir, args.out)
        except FileNotFoundError as e:
            print(f"pyquant report: error: {e}", file=sys.stderr)
            return 2
        print(next(p for p in written if p.name == "table.md").read_text())
        print("wrote: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
