"""Half-precision matrix multiply on the CPU: pyquant.ops.matmul in float16 and bfloat16 against torch's
matmul in float16, bfloat16 and float32, in the same process, at 512^3, 2048^3 and 6272x3072x768 (a ViT-B
MLP layer: 32 images x 196 tokens); and a 3x3 convolution (64 -> 64 channels, 28x28, batch 8) with
pyquant.nn.Conv2d16 against torch's conv2d. `extra_info` has the flop count and GFLOP/s (2*M*N*K / median).

torch's float16 matmul on a CPU without native FP16 arithmetic takes seconds at the larger shapes (about
0.3 to 3 GFLOP/s): those cases run one round.

    python -m pytest bench/test_matmul.py --benchmark-only
    python bench/test_matmul.py [rounds] [threads]   # interleaved best-of-N table (robust on a shared machine)

The script form runs the same cases round-robin and keeps each one's best time: on a machine shared with
other jobs, a busy core costs any multi-threaded product (torch's or pyquant's) a scheduler tick at every
barrier, and medians over consecutive rounds then measure the neighbours more than the kernels.
"""

import pytest
import torch
import torch.nn.functional as F

from pyquant.ops.gemm import matmul as pyquant_matmul
from pyquant.nn.half_precision import Conv2d16, native_fp16_cpu

SHAPES = {"512^3": (512, 512, 512), "2048^3": (2048, 2048, 2048), "6272x3072x768": (6272, 3072, 768)}
IMPLS = ["pyquant-float16", "pyquant-bfloat16", "torch-float16", "torch-bfloat16", "torch-float32"]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _rounds(impl: str, flops: float) -> dict:
    if impl == "torch-float16" and not native_fp16_cpu():
        # ~1.5 GFLOP/s: one call of 2048^3 takes ~10 s
        return dict(rounds=1, iterations=1, warmup_rounds=0 if flops > 1e10 else 1)
    return dict(rounds=5 if flops > 1e10 else 20, iterations=1, warmup_rounds=1)


def _record(benchmark, flops: float) -> None:
    benchmark.extra_info["flops"] = flops
    benchmark.extra_info["GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matmul(benchmark, shape, impl):
    m, n, k = SHAPES[shape]
    library, dtype_name = impl.split("-")
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    fn = pyquant_matmul if library == "pyquant" else torch.matmul
    flops = 2.0 * m * n * k
    benchmark.group = f"matmul {shape} (CPU)"
    benchmark.pedantic(fn, args=(a, b), **_rounds(impl, flops))
    _record(benchmark, flops)


CONV = dict(batch=8, channels=64, size=28, kernel=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_conv3x3(benchmark, impl):
    library, dtype_name = impl.split("-")
    dtype = DTYPES[dtype_name]
    c, s, kk = CONV["channels"], CONV["size"], CONV["kernel"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(CONV["batch"], c, s, s, generator=g).to(dtype)
    conv = torch.nn.Conv2d(c, c, kk, padding=kk // 2)
    if library == "pyquant":
        layer = Conv2d16.from_conv(conv, dtype, impl="pyquant")
        x = x.contiguous(memory_format=torch.channels_last)  # as a preceding Conv2d16 leaves it
        fn = lambda: layer(x)  # noqa: E731
    else:
        w, bias = conv.weight.detach().to(dtype), conv.bias.detach().to(dtype)
        fn = lambda: F.conv2d(x, w, bias, padding=kk // 2)  # noqa: E731
    flops = 2.0 * CONV["batch"] * c * s * s * c * kk * kk
    benchmark.group = "conv2d 3x3 64->64 28x28 batch 8 (CPU)"
    with torch.no_grad():
        benchmark.pedantic(fn, **_rounds(impl, 1.0))
    _record(benchmark, flops)


# ---- script form: interleaved best-of-N ----
def _cases():
    g = torch.Generator().manual_seed(0)
    for shape, (m, n, k) in SHAPES.items():
        a32, b32 = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        row = {}
        for impl in IMPLS:
            library, dtype_name = impl.split("-")
            a, b = a32.to(DTYPES[dtype_name]), b32.to(DTYPES[dtype_name])
            fn = pyquant_matmul if library == "pyquant" else torch.matmul
            row[impl] = (lambda fn=fn, a=a, b=b: lambda: fn(a, b))()
        yield f"matmul {shape}", 2.0 * m * n * k, row
    c, s, kk = CONV["channels"], CONV["size"], CONV["kernel"]
    x32 = torch.randn(CONV["batch"], c, s, s, generator=g)
    conv = torch.nn.Conv2d(c, c, kk, padding=kk // 2)
    row = {}
    for impl in IMPLS:
        library, dtype_name = impl.split("-")
        dtype = DTYPES[dtype_name]
        if library == "pyquant":
            layer = Conv2d16.from_conv(conv, dtype, impl="pyquant")
            x = x32.to(dtype).contiguous(memory_format=torch.channels_last)  # as a preceding Conv2d16 leaves it
            row[impl] = (lambda layer=layer, x=x: lambda: layer(x))()
        else:
            x, w, bias = x32.to(dtype), conv.weight.detach().to(dtype), conv.bias.detach().to(dtype)
            row[impl] = (lambda x=x, w=w, bias=bias: lambda: F.conv2d(x, w, bias, padding=kk // 2))()
    yield "conv2d 3x3 64->64 28x28 b8", 2.0 * CONV["batch"] * c * s * s * c * kk * kk, row


def main(rounds: int = 10) -> None:
    import time

    print(f"threads {torch.get_num_threads()}, best of {rounds} interleaved rounds (torch float16: of 1-2)")
    print("| case | " + " | ".join(IMPLS) + " |")
    print("|---|" + "---:|" * len(IMPLS))
    with torch.no_grad():
        for name, flops, row in _cases():
            best = {}
            slow = "torch-float16" if not native_fp16_cpu() else None
            for impl, fn in row.items():  # warm-up (not the slow case at the large shapes: seconds per call)
                if impl != slow or flops < 1e10:
                    fn()
            for r in range(rounds):
                for impl, fn in row.items():
                    if impl == slow and (r >= (2 if flops < 1e10 else 1)):
                        continue
                    start = time.perf_counter()
                    fn()
                    best[impl] = min(best.get(impl, float("inf")), time.perf_counter() - start)
            ref = best["torch-float32"]
            cells = [f"{1e3 * best[i]:.2f} ms, {flops / best[i] / 1e9:.0f} GF/s, {ref / best[i]:.2f}x" for i in IMPLS]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
