"""Before/after comparison of two checkouts on the same benchmarks: each checkout's own
`pytest bench/... --benchmark-only` in its own `.venv`, alternating between the two for a number of rounds (so
that a busy machine slows both alike), then after/before of each benchmark's median (the smallest median over the
rounds):

    python bench/compare_trees.py BEFORE_CHECKOUT AFTER_CHECKOUT [--rounds 2] -- bench/test_quantize.py ...

A checkout is a folder with a `.venv` set up by README's test command. Ratios above 1 are slowdowns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_round(checkout: Path, selection: list[str], out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    cmd = [str(checkout / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--benchmark-only", f"--benchmark-json={out}", *selection]
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    print(f"{checkout}: {tail}", flush=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed in {checkout}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def best_medians(files: list[Path]) -> dict[str, float]:
    medians: dict[str, list[float]] = {}
    for f in files:
        for b in json.loads(f.read_text())["benchmarks"]:
            medians.setdefault(b["fullname"].split("::", 1)[1], []).append(b["stats"]["median"])
    return {name: min(values) for name, values in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("selection", nargs="+", help="pytest arguments, relative to each checkout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"before": [], "after": []}
        for r in range(args.rounds):
            for side in ("before", "after"):
                out = Path(tmp) / f"{side}-{r}.json"
                run_round(getattr(args, side).resolve(), args.selection, out)
                files[side].append(out)
        before, after = best_medians(files["before"]), best_medians(files["after"])
    ratios = []
    for name in sorted(before.keys() & after.keys()):
        ratios.append(after[name] / before[name])
        print(f"{ratios[-1]:6.3f}  {before[name] * 1e3:10.3f} ms -> {after[name] * 1e3:10.3f} ms  {name}")
    if ratios:
        print(f"{len(ratios)} benchmarks: after/before geometric mean {statistics.geometric_mean(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}")
    for side, names in (("before", before.keys() - after.keys()), ("after", after.keys() - before.keys())):
        if names:
            print(f"only in {side}: {sorted(names)}")


if __name__ == "__main__":
    main()
