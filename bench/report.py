"""Run the benchmarks and write bench/RESULTS.md: one table per group with ratios, the machine and the date.

    python bench/report.py [extra pytest args, e.g. -k quantize]
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINES = ("pyquant", "bitsandbytes", "torch")  # ratios are taken against the first entry of each group
# RESULTS.md's sections from this line on are measured by hand (a session's before/after runs with their commands);
# a rewrite keeps them, where it regenerates the tables and the analysis above them.
HAND_MEASURED = "<!-- The sections below are measured by hand, session by session: bench/report.py keeps them. -->"


def hand_measured_sections(previous: str) -> list[str]:
    """The lines of a previous RESULTS.md from the HAND_MEASURED marker on (none without the marker)."""
    lines = previous.splitlines()
    return lines[lines.index(HAND_MEASURED):] if HAND_MEASURED in lines else []


def machine() -> str:
    import torch

    from pyquant.backends import capi

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    return (
        f"{cpu}, {os.cpu_count()} logical cores, OMP_NUM_THREADS={threads}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, pyquant CPU library: {capi.cpu_isa()}"
    )


def label(bench: dict) -> str:
    name = bench["name"].removeprefix("test_")
    return name


def table(group: str, benches: list[dict]) -> list[str]:
    benches = sorted(benches, key=lambda b: b["stats"]["median"])
    # Ratios against pyquant's entry; in a group of settings (the training step), against the baseline setting.
    reference, ref_name = next((b for b in benches if "pyquant" in b["name"]), None), "pyquant"
    if reference is None:
        reference = next((b for b in benches if b.get("extra_info", {}).get("setting") == "baseline"), None)
        ref_name = "baseline"
    pyquant_median = reference["stats"]["median"] if reference else None
    lines = [f"### {group}", "", f"| implementation | median ms | GB/s | time / {ref_name} | extra |",
             "|---|---:|---:|---:|---|"]
    for b in benches:
        median = b["stats"]["median"]
        info = dict(b.get("extra_info", {}))
        gbs = info.pop("GB/s", None)
        shown = ("state bytes/param", "samples/s", "optimizer_state MiB", "activations MiB")
        extra = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items() if k in shown)
        ratio = f"{median / pyquant_median:.2f}x" if pyquant_median else ""
        lines.append(f"| {label(b)} | {1e3 * median:.2f} | {gbs:.2f} | {ratio} | {extra} |" if gbs else f"| {label(b)} | {1e3 * median:.2f} | | {ratio} | {extra} |")
    return lines + [""]


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", str(HERE), "--benchmark-only", f"--benchmark-json={out}", "-q", *argv]
        subprocess.run(cmd, check=True)
        data = json.loads(out.read_text())
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    lines = [
        "# Benchmark results",
        "",
        f"Measured {datetime.date.today().isoformat()} with `python bench/report.py {' '.join(argv)}`".rstrip() + ".",
        "",
        f"Machine: {machine()}.",
        "",
        "Medians over the rounds of pytest-benchmark; GB/s counts the bytes each operation must move "
        "(8-bit Adam 16 B/param, float32 Adam 28 B/param, quantise/dequantise 5 B/element).",
        "",
    ]
    for group in sorted(groups):
        lines += table(group, groups[group])
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += ["## Analysis", "", notes.read_text().strip(), ""]
    results = HERE / "RESULTS.md"
    lines += hand_measured_sections(results.read_text() if results.exists() else "")
    text = "\n".join(lines)
    results.write_text(text if text.endswith("\n") else text + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
