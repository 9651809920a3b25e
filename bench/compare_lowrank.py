"""Dense conv, unfused pair and fused LowRankConv2d forward, interleaved in one loop: for a machine shared with
other jobs, where separate pytest-benchmark sessions differ by more than the effects being measured.

    python bench/compare_lowrank.py [--rounds 200] [--dtypes float32 bfloat16] [shape names of test_lowrank.py]

Every round runs the three implementations back to back; the minimum over the rounds of each is reported (a
burst of load from elsewhere slows the three alike, and the minimum keeps the rounds it spared), with the
FLOP reduction, the speed-ups and the efficiency (speed-up against dense / FLOP reduction) as in
bench/test_lowrank.py, whose shapes, ranks and modules this uses.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_lowrank import DTYPES, IMPLS, RANK_FRACTIONS, SHAPES, _flops, _modules, _rank


def compare(shape_name: str, dtype: str, fraction: str, rounds: int) -> dict:
    shape = SHAPES[shape_name]
    n, cin, _, size, *_ = shape
    rank = _rank(shape, fraction)
    mods = _modules(shape, rank, DTYPES[dtype])
    x = torch.randn(n, cin, size, size, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    best = dict.fromkeys(IMPLS, float("inf"))
    with torch.no_grad():
        for module in mods.values():  # warm-up: buffers, oneDNN primitives
            module(x)
            module(x)
        for _ in range(rounds):
            for name, module in mods.items():
                start = time.perf_counter()
                module(x)
                best[name] = min(best[name], time.perf_counter() - start)
    dense, pair, fused = (best[name] for name in IMPLS)
    dense_flops, low_flops = _flops(shape, rank)
    reduction = dense_flops / low_flops
    return {"shape": shape_name, "dtype": dtype, "rank": f"{fraction}={rank}", "dense ms": 1e3 * dense,
            "pair ms": 1e3 * pair, "fused ms": 1e3 * fused, "FLOP red.": reduction,
            "fused vs dense": dense / fused, "eff.": dense / fused / reduction, "fused vs pair": pair / fused}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, min over {args.rounds} interleaved rounds\n")
    print("| shape | dtype | rank | dense ms | pair ms | fused ms | FLOP red. | fused vs dense | eff. | fused vs pair |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape_name in args.shapes:
        for dtype in args.dtypes:
            for fraction in RANK_FRACTIONS:
                r = compare(shape_name, dtype, fraction, args.rounds)
                print(f"| {r['shape']} | {r['dtype']} | {r['rank']} | {r['dense ms']:.3f} | {r['pair ms']:.3f} | "
                      f"{r['fused ms']:.3f} | {r['FLOP red.']:.2f} | {r['fused vs dense']:.2f}x | {r['eff.']:.2f} | "
                      f"{r['fused vs pair']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
