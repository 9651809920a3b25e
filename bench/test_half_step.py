"""The quick preset's training step in float32, float16 and bfloat16: what the study's "half+8bit" setting costs on a
CPU. The model, batch and image size are those of the quick preset until 2026-12-04 (densenet_small, batch 32, 64 px,
one torch thread; it now trains at 32 px, batch 64, two runs at a time), kept so the figures stay comparable; the
step is the harness's own (``pyquant.experiment.loop.train_step``: forward, backward, loss scaling where float16,
``pyquant.Adam8bit``) on one fixed batch in memory, with the model prepared by the harness (``Recipe.prepare_model``):

- ``float32``: the "8bit" setting, torch's float32 layers;
- ``float16``: "half+8bit" with ``--half-dtype float16``: on a CPU without FP16 arithmetic, ``pyquant.amp.half``
  (Conv2d16 / Linear16 on pyquant's kernels, norms in float32) and dynamic loss scaling;
- ``bfloat16``: "half+8bit" with ``--half-dtype bfloat16``: a plain cast onto torch's bfloat16 layers.

    python -m pytest bench/test_half_step.py --benchmark-only
    python bench/test_half_step.py [rounds] [threads]   # interleaved best-of-N, with the ratios to float32
    python bench/test_half_step.py products             # the step's heaviest float16 products, 1 thread
    python bench/test_half_step.py convs                # its 3x3 convolution products: implicit / explicit im2col

The script form runs the three steps round-robin and keeps each one's best time, which is what docs/low_precision.md
(section 8) quotes: on a machine shared with other jobs, medians of consecutive rounds measure the neighbours.
"""

import sys
import time

import pytest
import torch

pytest.importorskip("timm")

from pyquant.amp import GradScaler
from pyquant.experiment.models import create_model
from pyquant.experiment.loop import train_step
from pyquant.experiment.settings import resolve

MODEL, BATCH, IMAGE, LR = "densenet_small", 32, 64, 3e-4  # the quick preset until 2026-12-04
CASES = {"float32": ("8bit", "auto"), "float16": ("half+8bit", "float16"), "bfloat16": ("half+8bit", "bfloat16")}


def make_step(case: str):
    """A closure running one training step of `case` (same initial weights and batch for every case)."""
    setting, half_dtype = CASES[case]
    recipe = resolve(setting, "cpu", half_dtype=half_dtype)
    torch.manual_seed(0)
    model = recipe.prepare_model(create_model(MODEL, in_chans=1, num_classes=2)).train()
    optimizer = recipe.make_optimizer(model.parameters(), LR)
    scaler = GradScaler("cpu", enabled=recipe.loss_scaling)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 1, IMAGE, IMAGE, generator=g).to(recipe.model_dtype)
    y = torch.arange(BATCH) % 2
    return lambda: train_step(model, x, y, optimizer, scaler, recipe)


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the quick preset's threads = 1 (each of its two runs at a time)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("case", list(CASES))
def test_half_step(benchmark, one_thread, case):
    step = make_step(case)
    benchmark.group = f"train step {MODEL} batch {BATCH} {IMAGE}px, 1 thread"
    loss = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert torch.isfinite(loss)
    benchmark.extra_info.update(case=case, **{"samples/s": BATCH / benchmark.stats.stats.median})


# The step's heaviest float16 products (1 thread; M x N x K, whether A / B are stored transposed), from a per-call
# timing of pyquant.ops.matmul inside the step: a 3x3 convolution to 16 channels (the dense layers' growth rate) on
# the first and second dense block, its weight gradient (16 rows, K = every output position), and its input gradient.
PRODUCTS = {
    "3x3 conv fwd, block 1": (8192, 16, 576, False, True),
    "3x3 conv fwd, block 2": (2048, 16, 576, False, True),
    "3x3 grad_W, block 1": (16, 576, 8192, True, False),
    "3x3 grad_W, block 2": (16, 576, 2048, True, False),
    "3x3 grad_x, block 1": (8192, 64, 144, False, True),
}


def products(rounds: int = 15) -> None:
    """GFLOP/s of the products above: pyquant float16 and torch float32 on the same layouts, interleaved best-of."""
    from pyquant.ops.gemm import matmul

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("| product | M x N x K | pyquant float16 | torch float32 |\n|---|---|---:|---:|")
    for name, (m, n, k, a_t, b_t) in PRODUCTS.items():
        a = torch.randn(k, m, generator=g).t() if a_t else torch.randn(m, k, generator=g)
        b = torch.randn(n, k, generator=g).t() if b_t else torch.randn(k, n, generator=g)
        runs = {"f16": (matmul, a.half(), b.half()), "f32": (torch.matmul, a, b)}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(rounds):
            for key, (fn, x, y) in runs.items():
                start = time.perf_counter()
                fn(x, y)
                best[key] = min(best[key], time.perf_counter() - start)
        gflops = {key: 2 * m * n * k / t / 1e9 for key, t in best.items()}
        print(f"| {name} | {m} x {n} x {k} | {best['f16'] * 1e3:.2f} ms, {gflops['f16']:.0f} GF/s "
              f"| {best['f32'] * 1e3:.2f} ms, {gflops['f32']:.0f} GF/s |")


def convs(rounds: int = 15) -> None:
    """The dense layers' 3x3 convolution (64 -> 16 channels, batch 32) as Conv2d16 runs it: forward, weight gradient
    and input gradient on pyquant::im2col_matmul with the columns gathered while packing (implicit) against the
    explicit copy of the columns + pyquant::matmul (the same bits), and torch's float32 forward; 1 thread,
    interleaved best-of."""
    import torch.nn.functional as F
    from timing import interleaved_minimum

    from pyquant.backends.cpu import gemm as cpu_gemm
    from pyquant.backends.reference.gemm import im2col_operands

    def explicit(x, other, bias, bias_dim, geometry, columns_first, out_dtype):
        return cpu_gemm.matmul(*im2col_operands(x, other, geometry, columns_first), bias, bias_dim, out_dtype)

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    geometry = (3, 3, 1, 1, 1, 1, 1, 1)
    print("| product | implicit im2col | explicit im2col | torch float32 conv |\n|---|---:|---:|---:|")
    for block, size in ((1, 16), (2, 8)):
        x = torch.randn(32, size, size, 64, generator=g).half()
        w, w_flip = torch.randn(16, 576, generator=g).half(), torch.randn(64, 144, generator=g).half()
        grad = torch.randn(32 * size * size, 16, generator=g).half()
        x32, w32 = x.float().permute(0, 3, 1, 2), torch.randn(16, 64, 3, 3, generator=g)
        flops = 2 * 32 * size * size * 576 * 16
        products = {
            "fwd": (x, w.t(), True),
            "grad_W": (x, grad.t(), False),
            "grad_x": (grad.view(32, size, size, 16), w_flip.t(), True),
        }
        for name, (inp, other, first) in products.items():
            runs = {
                "implicit": lambda: cpu_gemm.im2col_matmul(inp, other, None, -1, geometry, first, torch.float16),
                "explicit": lambda: explicit(inp, other, None, -1, geometry, first, torch.float16),
            }
            if name == "fwd":
                runs["torch"] = lambda: F.conv2d(x32, w32, None, 1, 1)
            best = interleaved_minimum(runs, rounds, warmup=0)
            cells = [f"{best[k] * 1e3:.2f} ms, {flops / best[k] / 1e9:.0f} GF/s" if k in best else "" for k in
                     ("implicit", "explicit", "torch")]
            print(f"| 3x3 {name}, block {block} | " + " | ".join(cells) + " |")


def main(rounds: int = 10, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    steps = {case: make_step(case) for case in CASES}
    best = dict.fromkeys(CASES, float("inf"))
    for step in steps.values():
        step()  # warm-up
    for _ in range(rounds):
        for case, step in steps.items():
            start = time.perf_counter()
            step()
            best[case] = min(best[case], time.perf_counter() - start)
    print(f"{MODEL}, batch {BATCH}, {IMAGE} px, {threads} thread(s), best of {rounds} (interleaved)")
    print("| case | step | samples/s | time / float32 |\n|---|---:|---:|---:|")
    for case, seconds in best.items():
        print(f"| {case} | {seconds * 1e3:.1f} ms | {BATCH / seconds:.0f} | {seconds / best['float32']:.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["products"]:
        products()
    elif sys.argv[1:2] == ["convs"]:
        convs()
    else:
        main(*(int(a) for a in sys.argv[1:3]))
