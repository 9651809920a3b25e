"""Dense conv, unfused pair and fused LowRankConv2d forward, interleaved in one loop: for a machine shared with
other jobs, where separate pytest-benchmark sessions differ by more than the effects being measured.

    python bench/compare_lowrank.py [--rounds 200] [--dtypes float32 bfloat16] [shape names of lowrank_cases.py]
    python bench/compare_lowrank.py --train [...]      # the same for forward+backward (training step)
    python bench/compare_lowrank.py --backward [...]   # where the fused layer's forward+backward time goes
    python bench/compare_lowrank.py --weight-grad      # the 1 x 1 weight-gradient kernel against oneDNN's

Every round runs the three implementations back to back; the minimum over the rounds of each is reported (a
burst of load from elsewhere slows the three alike, and the minimum keeps the rounds it spared), with the
FLOP reduction, the speed-ups and the efficiency (speed-up against dense / FLOP reduction) as in
bench/test_lowrank.py; the shapes, ranks and modules are bench/lowrank_cases.py's.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import lowrank_cases as cases  # bench/ is the script's folder, so on sys.path
from lowrank_cases import DTYPES, IMPLS, RANK_FRACTIONS, SHAPES
from timing import interleaved_minimum


def compare(shape_name: str, dtype: str, fraction: str, rounds: int, train: bool = False) -> dict:
    shape = SHAPES[shape_name]
    n, cin, _, size, *_ = shape
    rank = cases.rank(shape, fraction)
    mods = cases.modules(shape, rank, DTYPES[dtype])
    x = torch.randn(n, cin, size, size, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    if train:
        x.requires_grad_()
    best = interleaved_minimum({name: cases.step(module, x, train) for name, module in mods.items()}, rounds)
    dense, pair, fused = (best[name] for name in IMPLS)
    dense_flops, low_flops = cases.flops(shape, rank)
    reduction = dense_flops / low_flops
    return {"shape": shape_name, "dtype": dtype, "rank": f"{fraction}={rank}", "dense ms": 1e3 * dense,
            "pair ms": 1e3 * pair, "fused ms": 1e3 * fused, "FLOP red.": reduction,
            "fused vs dense": dense / fused, "eff.": dense / fused / reduction, "fused vs pair": pair / fused}


def _first(ours, torchs):
    """What the backward runs: pyquant's kernel (`ours`, None where it does not apply), else torch's."""
    out = ours()
    return torchs() if out is None else out


def backward_split(shape_name: str, dtype: str, fraction: str, rounds: int) -> dict:
    """The fused layer's forward+backward (parameters and input require grad) and, timed alone in the same
    rounds, each product of its backward twice: oneDNN's (`aten.convolution_backward`, what the unfused pair
    runs) and what pyquant._autograd.lowrank_backward_math runs (pyquant's kernel where it pays, else
    oneDNN's): the rank channels' gradient g_t = W2^T g_y (for a 1x1 first factor with the input gradient in the
    same call), the weight gradients of W2 and W1, the input gradient. "W2 oneDNN" is the 1x1 backward with W2
    and bias less the one without. "W1 % peak": the W1 gradient that runs, its FLOPs against 240 GFLOP/s per
    core (docs/compress.md)."""
    from pyquant import _autograd as A

    shape = SHAPES[shape_name]
    n, cin, cout, size, k, _, _ = shape
    rank = cases.rank(shape, fraction)
    layer = cases.modules(shape, rank, DTYPES[dtype])[IMPLS[2]]
    x = torch.randn(n, cin, size, size, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    w1, w2 = layer.weight_first.detach(), layer.weight_second.detach().reshape(cout, rank)
    st, pd, dl = list(layer.stride), list(layer.padding), list(layer.dilation)
    cd = A.backward_dtype(x.dtype)
    x, w1, w2 = x.to(cd), w1.to(cd), w2.to(cd)
    w2_4d = w2.reshape(cout, rank, 1, 1)
    t = F.conv2d(x, w1, None, st, pd, dl)
    gy = torch.randn(n, cout, *t.shape[2:], generator=torch.Generator().manual_seed(2)).to(cd)
    conv_bwd = torch.ops.aten.convolution_backward
    gt = conv_bwd(gy, t, w2_4d, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0]
    xr = x.clone().requires_grad_()
    fused_x = [False]

    def rank_grad():  # what the backward runs for g_t (and, fused, g_x)
        ours = A.rank_grad(gy, w1, w2, st, pd, True)
        fused_x[0] = ours is not None and ours[1] is not None
        return ours if ours is not None else conv_bwd(gy, t, w2_4d, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                      [True, False, False])

    parts = {
        "fwd+bwd": cases.step(layer, xr, True),
        "g_t oneDNN": lambda: conv_bwd(gy, t, w2_4d, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                       [True, False, False]),
        "g_t": rank_grad,
        "1x1 oneDNN with W2, bias": lambda: conv_bwd(gy, t, w2_4d, [cout], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                     [True, True, True]),
        "W2": lambda: _first(lambda: A.weight_grad(t, gy, (cout, rank, 1, 1), [1, 1], [0, 0], [1, 1]),
                             lambda: conv_bwd(gy, t, w2_4d, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                              [False, True, False])),
        "W1 oneDNN": lambda: conv_bwd(gt, x, w1, None, st, pd, dl, False, [0, 0], 1, [False, True, False]),
        "W1": lambda: _first(lambda: A.weight_grad(x, gt, w1.shape, st, pd, dl),
                             lambda: conv_bwd(gt, x, w1, None, st, pd, dl, False, [0, 0], 1, [False, True, False])),
        "x oneDNN": lambda: conv_bwd(gt, x, w1, None, st, pd, dl, False, [0, 0], 1, [True, False, False]),
        "x": lambda: _first(lambda: A.input_grad(gt, x, w1, st, pd, dl),
                            lambda: conv_bwd(gt, x, w1, None, st, pd, dl, False, [0, 0], 1, [True, False, False])),
    }
    best = interleaved_minimum(parts, rounds)
    ms = {name: 1e3 * value for name, value in best.items()}
    w1_flops = 2 * t.numel() * cin * k * k
    return {"shape": shape_name, "dtype": dtype, "rank": f"{fraction}={rank}", "fwd+bwd ms": ms["fwd+bwd"],
            "g_t oneDNN": ms["g_t oneDNN"], "g_t": ms["g_t"],
            "W2 oneDNN": max(0.0, ms["1x1 oneDNN with W2, bias"] - ms["g_t oneDNN"]), "W2": ms["W2"],
            "W1 oneDNN": ms["W1 oneDNN"], "W1": ms["W1"], "x oneDNN": ms["x oneDNN"],
            "x": 0.0 if fused_x[0] else ms["x"],  # fused: in g_t's time
            "W1 % peak": 100.0 * w1_flops / best["W1"] / (240e9 * torch.get_num_threads())}


# 1 x 1 weight gradients of the benchmark shapes' factors, (input channels, output channels, size): the second
# factors (x = the intermediate, rank channels; g = the layer's output gradient) and the EfficientNet-B0 first ones
WEIGHT_GRAD_1X1 = [(4, 32, 56), (8, 32, 56), (16, 32, 56), (4, 32, 28), (16, 32, 28), (4, 32, 14), (16, 32, 14),
                   (5, 240, 28), (10, 240, 28), (20, 240, 28), (14, 112, 14), (28, 112, 14), (56, 112, 14),
                   (40, 1280, 7), (40, 5, 28), (40, 20, 28), (672, 14, 14), (672, 28, 14), (320, 40, 7)]


def weight_grad_grid(rounds: int) -> None:
    """pyquant's weight-gradient kernel against oneDNN's for the 1 x 1 convolutions above, float32 and bfloat16,
    batch 8 and 32 (the measurements behind pyquant.backends.cpu.conv.weight_grad_pays)."""
    from pyquant.backends.cpu import conv as L

    conv_bwd = torch.ops.aten.convolution_backward
    print("| dtype | batch | in | out | size | pyquant ms | oneDNN ms | oneDNN / pyquant | kernel used |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for dtype in DTYPES.values():
        for n in (8, 32):
            for c, r, h in WEIGHT_GRAD_1X1:
                gen = torch.Generator().manual_seed(0)
                x, g = (torch.randn(n, ch, h, h, generator=gen).to(dtype) for ch in (c, r))
                w = torch.empty(r, c, 1, 1, dtype=dtype)
                best = interleaved_minimum({
                    "pyquant": lambda: L.weight_grad(x, g, (1, 1), (1, 1), (0, 0), (1, 1)),
                    "oneDNN": lambda: conv_bwd(g, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                               [False, True, False]),
                }, rounds)
                used = "pyquant" if L.weight_grad_pays(r, c, 1) else "oneDNN"
                print(f"| {str(dtype)[6:]} | {n} | {c} | {r} | {h}x{h} | {1e3 * best['pyquant']:.3f} | "
                      f"{1e3 * best['oneDNN']:.3f} | {best['oneDNN'] / best['pyquant']:.2f} | {used} |", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--backward", action="store_true", help="split the fused layer's forward+backward time")
    parser.add_argument("--train", action="store_true", help="forward+backward instead of the forward")
    parser.add_argument("--weight-grad", action="store_true", help="the 1 x 1 weight-gradient kernel against oneDNN's")
    args = parser.parse_args(argv)
    what = ("1x1 weight gradients" if args.weight_grad else "backward split" if args.backward
            else "forward+backward" if args.train else "forward")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, min over {args.rounds} interleaved rounds, {what}\n")
    if args.weight_grad:
        weight_grad_grid(args.rounds)
        return 0
    if args.backward:
        keys = None
        for shape_name in args.shapes:
            for dtype in args.dtypes:
                for fraction in RANK_FRACTIONS:
                    r = backward_split(shape_name, dtype, fraction, args.rounds)
                    if keys is None:
                        keys = list(r)
                        print("| " + " | ".join(keys) + " |")
                        print("|" + "---|" * 3 + "---:|" * (len(keys) - 3))
                    print("| " + " | ".join(v if isinstance(v, str) else f"{v:.3f}" for v in r.values()) + " |",
                          flush=True)
        return 0
    print("| shape | dtype | rank | dense ms | pair ms | fused ms | FLOP red. | fused vs dense | eff. | fused vs pair |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape_name in args.shapes:
        for dtype in args.dtypes:
            for fraction in RANK_FRACTIONS:
                r = compare(shape_name, dtype, fraction, args.rounds, args.train)
                print(f"| {r['shape']} | {r['dtype']} | {r['rank']} | {r['dense ms']:.3f} | {r['pair ms']:.3f} | "
                      f"{r['fused ms']:.3f} | {r['FLOP red.']:.2f} | {r['fused vs dense']:.2f}x | {r['eff.']:.2f} | "
                      f"{r['fused vs pair']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
