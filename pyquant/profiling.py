"""``pyquant profile``: a few training steps of one harness setting under a profiler, and where memory goes.

The model, data, recipe, optimizer and training step are the harness's own (pyquant.experiment: the config
layers, ``create_model``, the setting's recipe, ``loop.train_step``), so the profile shows exactly what a
``pyquant experiment`` run does. Batches are loaded onto the device before profiling starts, so the trace shows the
step (forward, backward, optimizer), not the data loader.

- ``--profiler nsys`` (or ``auto`` when ``nsys`` is on PATH): the command runs itself again under ``nsys profile``
  with NVTX tracing; pyquant's kernels appear as NVTX ranges ``pyquant::<op>`` (domain ``pyquant``). Writes
  ``trace.nsys-rep`` and ``summary.txt`` (``nsys stats``' NVTX summary, plus the CUDA kernel summary on a GPU).
- ``--profiler torch`` (or ``auto`` without nsys): torch.profiler. Writes ``trace.json`` (Chrome trace: open it in
  https://ui.perfetto.dev or chrome://tracing) and ``summary.txt``: time per step, the memory breakdown, pyquant's
  kernels (the same ``pyquant::<op>`` names, as record_function ranges) and the top operations by self time.

Output files are written to a temporary name and moved into place, so a failed or interrupted profile leaves
earlier results as they were and never a half-written file.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pyquant._files import write_text_atomic

PROFILERS = ("auto", "torch", "nsys", "none")
STEP_RANGE = "pyquant::train_step"


class ProfileError(Exception):
    """Bad input for ``pyquant profile``: the message says what was wrong; nothing has been written."""


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def harness_run(task: str, model: str, setting: str, preset: str = "quick", batch_size: int | None = None,
                device: str | None = None, threads: int | None = None, seed: int = 1,
                sets: list[str] | None = None) -> dict:
    """The harness's run dict for (task, model, setting) from the config layers; unknown names raise KeyError."""
    from pyquant.experiment import config
    from pyquant.experiment.runner import check_names

    overrides = {"tasks": [task], "models": [model], "settings": [setting], "seeds": [seed], "scales": [1],
                 "batch_size": batch_size, "device": device, "threads": threads}
    cfg = config.load(preset, overrides=overrides, sets=[*(sets or []), "downsample.scales=[]"])
    [run] = config.expand(cfg)
    check_names([run])
    return run


def build(task: str, model: str, setting: str, preset: str = "quick", batch_size: int | None = None,
          device: str | None = None, threads: int | None = None, seed: int = 1, sets: list[str] | None = None) -> dict:
    """The harness's run for (task, model, setting), and its model, data, recipe, optimizer and loader."""
    from pyquant.amp import GradScaler
    from pyquant.experiment.models import create_model
    from pyquant.experiment.loop import Batches, data_loader, seed_everything
    from pyquant.experiment.settings import resolve
    from pyquant.experiment.tasks import get_task

    run = harness_run(task, model, setting, preset, batch_size, device, threads, seed, sets)
    if run["threads"]:
        torch.set_num_threads(int(run["threads"]))
    seed_everything(run["seed"])
    data = get_task(run["task"], run["data"])
    dev = torch.device(run["device"])
    recipe = resolve(run["setting"], dev.type, run["amp_dtype"], run["half_dtype"])
    size = data.image_size
    net = create_model(run["model"], in_chans=data.in_chans, num_classes=data.num_classes,
                       pretrained=run["pretrained"], img_size=size, **run["model_args"])
    net = recipe.prepare_model(net.to(dev))
    optimizer = recipe.make_optimizer(net.parameters(), float(run["lr"]))
    scaler = GradScaler(dev.type, enabled=recipe.loss_scaling)
    batches = Batches(dev, size, recipe.model_dtype)
    loader = data_loader(data.train, int(run["batch_size"]), 0, True, run["seed"])
    return {"run": run, "device": dev, "recipe": recipe, "model": net, "optimizer": optimizer, "scaler": scaler,
            "batches": batches, "loader": loader, "image_size": size}


def _preload(ctx: dict, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if len(ctx["loader"]) == 0:
        raise ProfileError(f"the training set of task {ctx['run']['task']!r} gives no batch of {ctx['run']['batch_size']}")
    out = []
    while len(out) < n:
        for x, y in ctx["loader"]:
            out.append((ctx["batches"](x), y.to(ctx["device"])))
            if len(out) == n:
                break
    return out


def _steps(ctx: dict, batches: list) -> list[float]:
    """Run one training step per batch; the wall time of each (synchronised)."""
    from pyquant.experiment.measure import synchronize
    from pyquant.experiment.loop import train_step

    times = []
    for x, y in batches:
        synchronize(ctx["device"])
        t0 = time.perf_counter()
        with torch.profiler.record_function(STEP_RANGE):
            train_step(ctx["model"], x, y, ctx["optimizer"], ctx["scaler"], ctx["recipe"])
        synchronize(ctx["device"])
        times.append(time.perf_counter() - t0)
    return times


def _header(ctx: dict, steps: int, warmup: int, times: list[float], profiler: str) -> list[str]:
    from pyquant.experiment.measure import memory_breakdown, saved_activation_bytes

    run, recipe = ctx["run"], ctx["recipe"]
    x = _preload(ctx, 1)[0][0]
    saved = saved_activation_bytes(ctx["model"], x, recipe.autocast())
    b = memory_breakdown(ctx["model"], ctx["optimizer"], activations_saved_bytes=saved)
    setting = recipe.record()
    return [
        f"pyquant profile ({profiler}): task {run['task']}, model {run['model']}, setting {run['setting']} "
        f"(optimizer {setting['optimizer']}, autocast {setting['autocast_dtype'] or '-'}, model {setting['model_dtype']}), "
        f"batch {run['batch_size']}, " + (f"image {ctx['image_size']} px, " if ctx["image_size"] else "")
        + f"device {ctx['device']}, "
        f"{torch.get_num_threads()} threads",
        (f"{steps} profiled steps after {warmup} warm-up steps; wall time per step (under the profiler): "
         f"median {1e3 * statistics.median(times):.1f} ms, min {1e3 * min(times):.1f} ms"),
        (f"memory: parameters {_mib(b['parameters_bytes'])}, buffers {_mib(b['buffers_bytes'])}, gradients "
         f"{_mib(b['gradients_bytes'])}, optimizer states {_mib(b['optimizer_state_bytes'])}, activations "
         f"{_mib(b['activations_bytes'])} ({b['activations_method']})"),
        "",
    ]


def _torch_profile(ctx: dict, steps: int, warmup: int, out: Path, top: int) -> list[Path]:
    from torch.profiler import ProfilerActivity, profile

    _steps(ctx, _preload(ctx, warmup))
    work = _preload(ctx, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx["device"].type == "cuda" else [])
    with profile(activities=activities) as prof:
        times = _steps(ctx, work)
    events = prof.key_averages()
    self_key = "self_device_time_total" if ctx["device"].type == "cuda" else "self_cpu_time_total"
    step_total = sum(e.cpu_time_total for e in events if e.key == STEP_RANGE)
    kernels = sorted((e for e in events if e.key.startswith("pyquant::") and e.key != STEP_RANGE),
                     key=lambda e: -e.cpu_time_total)
    lines = _header(ctx, steps, warmup, times, "torch.profiler")
    lines.append("pyquant's ops: the custom ops torch.ops.pyquant.* and, inside them, the ranges pyquant::<op> around "
                 "each kernel launch (CPU time, including what they launch):")
    if kernels:
        for e in kernels:
            share = f"{100 * e.cpu_time_total / step_total:.1f} % of the steps" if step_total else ""
            lines.append(f"  {e.key:<32} {e.count:>6} calls {e.cpu_time_total / 1e3:>10.2f} ms  {share}")
    else:
        lines.append("  none: this setting launches no pyquant kernel (torch's Adam, no pyquant loss scaling)")
    lines += ["", f"Top {top} operations by {self_key.replace('_', ' ')}:",
              events.table(sort_by=self_key, row_limit=top, max_name_column_width=48)]
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    tmp = out / f".trace.json.{os.getpid()}.tmp"
    prof.export_chrome_trace(str(tmp))
    os.replace(tmp, trace)
    summary = out / "summary.txt"
    write_text_atomic(summary, "\n".join(lines) + "\n")
    return [trace, summary]


def _nsys_profile(nsys: str, args, out: Path) -> list[Path]:
    """Run this command again, with ``--profiler none``, under ``nsys profile``; then summarise with ``nsys stats``."""
    inner = [sys.executable, "-m", "pyquant.cli", "profile", "--profiler", "none", "--task", args.task, "--model",
             args.model, "--setting", args.setting, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--preset", args.preset, "--seed", str(args.seed)]
    for flag, value in (("--batch-size", args.batch_size), ("--device", args.device), ("--threads", args.threads)):
        if value is not None:
            inner += [flag, str(value)]
    for item in args.set:
        inner += ["--set", item]
    trace = "nvtx,osrt,cuda" if torch.cuda.is_available() else "nvtx,osrt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".nsys-") as tmp:
        stem = Path(tmp) / "trace"
        cmd = [nsys, "profile", f"--trace={trace}", "--force-overwrite=true", f"--output={stem}", *inner]
        done = subprocess.run(cmd, check=False)
        report = stem.with_suffix(".nsys-rep")
        if done.returncode != 0 or not report.is_file():
            raise RuntimeError(f"nsys profile failed (exit code {done.returncode}); its output is above; nothing written")
        reports = "nvtx_sum,cuda_gpu_kern_sum" if torch.cuda.is_available() else "nvtx_sum"
        stats = subprocess.run([nsys, "stats", f"--report={reports}", str(report)], check=False, capture_output=True,
                               text=True)
        lines = [(f"pyquant profile (nsys): task {args.task}, model {args.model}, setting {args.setting}, "
                  f"{args.steps} steps after {args.warmup} warm-up steps; NVTX ranges pyquant::<op> in domain pyquant"),
                 f"trace: {out / 'trace.nsys-rep'} (open in Nsight Systems)", ""]
        lines.append(stats.stdout if stats.returncode == 0 else f"nsys stats failed (exit code {stats.returncode}):\n"
                     f"{stats.stderr}")
        out.mkdir(parents=True, exist_ok=True)
        os.replace(report, out / "trace.nsys-rep")
    summary = out / "summary.txt"
    write_text_atomic(summary, "\n".join(lines) + "\n")
    return [out / "trace.nsys-rep", summary]


def main(args) -> int:
    """``pyquant profile`` with parsed arguments; raises ProfileError (bad input) before writing anything."""
    if args.steps < 1 or args.warmup < 0:
        raise ProfileError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.profiler not in PROFILERS:
        raise ProfileError(f"--profiler must be one of {', '.join(PROFILERS)}, got {args.profiler!r}")
    nsys = shutil.which("nsys")
    if args.profiler == "nsys" and nsys is None:
        raise ProfileError("--profiler nsys: nsys (Nsight Systems) is not on PATH; install it, or use "
                           "--profiler torch (or auto) for torch.profiler")
    out = Path(args.out or f"runs/profile/{args.task}_{args.model}_{args.setting}")
    if args.profiler == "nsys" or (args.profiler == "auto" and nsys is not None):
        # Names and config are checked here, so that bad input fails before nsys starts.
        harness_run(args.task, args.model, args.setting, args.preset, args.batch_size, args.device, args.threads,
                    args.seed, args.set)
        written = _nsys_profile(nsys, args, out)
    else:
        ctx = build(args.task, args.model, args.setting, args.preset, args.batch_size, args.device, args.threads,
                    args.seed, args.set)
        if args.profiler == "none":  # the process nsys watches: the steps and nothing else
            _steps(ctx, _preload(ctx, args.warmup))
            times = _steps(ctx, _preload(ctx, args.steps))
            print(f"{args.steps} steps, median {1e3 * statistics.median(times):.1f} ms per step")
            return 0
        written = _torch_profile(ctx, args.steps, args.warmup, out, args.top)
    print(written[-1].read_text())
    print("wrote: " + ", ".join(str(p) for p in written))
    return 0


def add_parser(commands) -> None:
    p = commands.add_parser(
        "profile", help="profile a few training steps of one setting (nsys when installed, else torch.profiler)",
        description="Build the harness's model, data and recipe for one setting, warm up, and run --steps training "
        "steps under nsys (when on PATH) or torch.profiler; write the trace and summary.txt to --out.")
    p.add_argument("--setting", default="8bit", help="a registered setting (default: 8bit)")
    p.add_argument("--model", default="densenet_small", help="a registered model (default: densenet_small)")
    p.add_argument("--task", default="rsna", help="rsna, lidc, tabular (default: rsna)")
    p.add_argument("--steps", type=int, default=5, help="profiled training steps (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (default: 2)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="default: the preset's")
    p.add_argument("--preset", default="quick", help="config preset or file for data and protocol (default: quick)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, as for experiment")
    p.add_argument("--profiler", default="auto", choices=PROFILERS,
                   help="auto (nsys when on PATH, else torch), torch, nsys; none: just run the steps")
    p.add_argument("--top", type=int, default=25, help="operations in the summary table (default: 25)")
    p.add_argument("--out", help="output folder (default: runs/profile/<task>_<model>_<setting>)")
