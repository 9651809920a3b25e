"""The stages of bench/gpu/check.sh that run in Python: bits, bench, profile, study, and the report.

    python bench/gpu/check.py STAGE --work DIR --out DIR [--smoke]

Each stage writes its findings to DIR/<stage>.json (the work folder); `report` turns every stage file there into
OUT/gpu_report.md and OUT/results.json. check.sh runs `report` after each stage, so a report exists even when a
later stage is killed by its time limit.

On a GPU machine every comparison runs on the GPU. With --smoke (a CPU-only machine, the mode the test suite
runs) the same code runs on CPU tensors at tiny sizes: the "device" backends are then the cpu backend and
Triton under its interpreter, and bitsandbytes runs its CPU kernels. Bit comparisons treat every NaN as equal
to every NaN (NaN payloads are not part of the contract: docs/numerics.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "--smoke" in sys.argv
if SMOKE:
    # Before triton is imported anywhere: Triton kernels run on CPU tensors through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import pyquant  # noqa: E402
from pyquant import backends  # noqa: E402
from pyquant import functional as F  # noqa: E402

DEVICE = torch.device("cpu" if SMOKE or not torch.cuda.is_available() else "cuda")
ON_GPU = DEVICE.type == "cuda"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COPY_BANDWIDTH_GBS = 4300.0  # the H200's device-to-device copy rate, bytes read + written (device/KINDS.md)


# ---- helpers ----
def _load_file_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interpreter_patches():
    """Under the Triton interpreter, its fma and sqrt made the device's (tests/triton_exact_fma.py says why)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return contextlib.nullcontext()
    return _load_file_module("triton_exact_fma", ROOT / "tests" / "triton_exact_fma.py").interpreter_as_device()


def device_backends() -> list[str]:
    """The backends that run on DEVICE here, in the order they are compared."""
    names = [n for n in ("cuda", "triton", "cpu") if backends.available(n, DEVICE.type)]
    return names + ["reference"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view on the CPU, every NaN one pattern."""
    t = t.detach().cpu()
    if not t.is_floating_point():
        return t.to(torch.int64)
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    nan = torch.full((), float("nan"), dtype=t.dtype).view(view)
    return torch.where(torch.isnan(t), nan, t.view(view))


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Fraction of identical values (NaN = NaN) and the largest absolute difference among finite pairs."""
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    if a.shape != b.shape:
        return {"identical": 0.0, "max_abs_diff": None, "error": f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"}
    same = bits(a) == bits(b)
    finite = torch.isfinite(a.double()) & torch.isfinite(b.double()) if a.is_floating_point() else torch.ones_like(same)
    diff = (a.double() - b.double()).abs()[finite & ~same]
    return {"identical": float(same.double().mean()) if same.numel() else 1.0,
            "max_abs_diff": float(diff.max()) if diff.numel() else 0.0}


def equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def median_seconds(fn, reps: int, warmup: int = 3) -> float:
    """Median time of fn(): CUDA events on the GPU, the wall clock after a synchronise on the CPU."""
    if SMOKE:  # the smoke run checks the wiring, not the speed
        reps, warmup = 2, 1
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def special_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values with a zero block, NaN, +-inf and subnormals planted, built on the CPU, moved to DEVICE."""
    x = torch.randn(n, generator=generator(seed)) * 3
    x[:64] = 0  # a zero block (64 is the smallest block size)
    if n > 512:
        x[100], x[200], x[300] = float("nan"), float("inf"), -float("inf")
        x[400:410] = torch.finfo(dtype).tiny / 4  # subnormal in dtype
    return x.to(dtype).to(DEVICE)


def bnb_module():
    try:
        import bitsandbytes

        return bitsandbytes
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        return exc


class Stage:
    """Collects one stage's checks ({name, passed, detail}) and figures, written to WORK/<stage>.json."""

    def __init__(self, name: str, work: Path):
        self.name, self.path = name, work / f"{name}.json"
        self.data = {"stage": name, "checks": [], "figures": {}, "notes": []}

    def check(self, name: str, passed: bool, **detail) -> bool:
        self.data["checks"].append({"name": name, "passed": bool(passed), **detail})
        print(f"[{'PASS' if passed else 'FAIL'}] {name} {detail if detail else ''}", flush=True)
        self.save()
        return passed

    def figure(self, key: str, value) -> None:
        self.data["figures"][key] = value
        self.save()

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.data["notes"].append(text)
        self.save()

    def attempt(self, name: str, fn) -> None:
        """Run one part; an exception is a failed check, and the stage goes on with its next part."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported, never hidden
            self.check(name, False, error=f"{type(exc).__name__}: {exc}"[:500])

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


# ---- stage: environment ----
def stage_env(st: Stage, args) -> None:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if ON_GPU else platform.processor() or "cpu",
            "smoke": SMOKE, "pyquant": str(Path(pyquant.__file__).parent)}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"unavailable: {exc}"
    bnb = bnb_module()
    info["bitsandbytes"] = getattr(bnb, "__version__", f"unavailable: {bnb}")
    from pyquant.backends import capi

    info["cpu_library"] = str(capi.cpu_library() is not None)
    info["cuda_library"] = str(capi.cuda_library() is not None) if ON_GPU else "not loaded (no GPU)"
    info["backends_on_device"] = device_backends()
    if ON_GPU:
        props = torch.cuda.get_device_properties(0)
        info["sm"] = f"{props.major}.{props.minor}"
        info["multiprocessors"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    st.data["figures"].update(info)
    st.check("pyquant imports on this torch", True, torch=torch.__version__)
    if ON_GPU:
        st.check("the CUDA library loads", capi.cuda_library() is not None)
        st.check("Triton runs on the GPU", "triton" in info["backends_on_device"])


# ---- stage: bits ----
def _quantize_all(x, blocksize):
    out = {}
    for name in device_backends():
        with backends.use_backend(name), interpreter_patches():
            q, absmax = F.quantize_blockwise(x, blocksize=blocksize)
            out[name] = (q, absmax, F.dequantize_blockwise(q, absmax, blocksize=blocksize, dtype=x.dtype))
    return out


def bits_quantize(st: Stage) -> None:
    n = 5003 if SMOKE else (1 << 20) + 77
    for dtype in FLOAT_DTYPES:
        for blocksize in (64, 256, 4096):
            x = special_values(n, dtype, seed=blocksize)
            results = _quantize_all(x, blocksize)
            names = list(results)
            first = results[names[0]]
            same = all(equal_bits(r[i], first[i]) for r in results.values() for i in range(3))
            st.check(f"quantize/dequantize {dtype} blocksize {blocksize}: {' = '.join(names)}", same)
            if ON_GPU and backends.available("cpu", "cpu"):
                with backends.use_backend("cpu"):
                    q, absmax = F.quantize_blockwise(x.cpu(), blocksize=blocksize)
                st.check(f"quantize {dtype} blocksize {blocksize}: GPU = pyquant CPU",
                         equal_bits(q, first[0]) and equal_bits(absmax, first[1]))


def bits_quantize_bnb(st: Stage) -> None:
    bnb = bnb_module()
    if isinstance(bnb, Exception):
        st.note(f"bitsandbytes unavailable ({bnb}): no comparison with its quantize")
        return
    n = 5003 if SMOKE else (1 << 22) + 77
    for dtype in FLOAT_DTYPES:
        x = (torch.randn(n, generator=generator(7)) * 2).to(dtype).to(DEVICE)
        q, absmax = F.quantize_blockwise(x, blocksize=256)
        q_bnb, state = bnb.functional.quantize_blockwise(x, blocksize=256)
        codes = compare(q, q_bnb)
        scales = compare(absmax, state.absmax)
        st.figure(f"quantize codes vs bitsandbytes ({dtype})", {"codes": codes, "absmax": scales})
        # The contract on the CPU is bit equality; on the GPU bitsandbytes' CUDA kernel is a different
        # algorithm (binary search over the code), so codes may differ by one where a value sits on a midpoint.
        st.check(f"quantize {dtype} vs bitsandbytes {DEVICE.type}: absmax identical", scales["identical"] == 1.0,
                 codes_identical=codes["identical"])


def _param_set(dtype: torch.dtype) -> list[torch.Tensor]:
    """Tensors with 8-bit states (partial last block) and one below min_8bit_size (32-bit states)."""
    sizes = (4096 * 3 + 17, 1000) if SMOKE else (4096 * 3 + 17, 1000, 300_001)
    return [(torch.randn(s, generator=generator(s)) * 0.1).to(dtype).to(DEVICE) for s in sizes]


def _grads(params, step: int, with_nan: bool) -> list[torch.Tensor]:
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=generator(1000 * step + i)) * 0.01
        if with_nan and i == 0 and step == 1:
            g[5] = float("nan")  # the skip policy leaves element 5 alone; everything else updates
        out.append(g.to(p.dtype).to(p.device))
    return out


def _run_optimizer(cls, params0, steps: int, backend: str, device=None, with_nan=False, **kwargs):
    device = device or DEVICE
    params = [torch.nn.Parameter(p.detach().clone().to(device)) for p in params0]
    opt = cls(params, lr=1e-3, weight_decay=0.01, **kwargs)
    with backends.use_backend(backend), interpreter_patches():
        for step in range(steps):
            for p, g in zip(params, _grads(params0, step, with_nan)):
                p.grad = g.to(device)
            opt.step()
    states = [{k: v for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim() > 0} for p in params]
    return params, states


def bits_optimizers(st: Stage) -> None:
    steps = 3 if SMOKE else 5
    for cls in (pyquant.Adam8bit, pyquant.AdamW8bit):
        for dtype in FLOAT_DTYPES:
            params0 = _param_set(dtype)
            runs = {b: _run_optimizer(cls, params0, steps, b, with_nan=True) for b in device_backends()}
            names = list(runs)
            ref_p, ref_s = runs[names[0]]
            same = all(
                equal_bits(p, rp) and all(equal_bits(s[k], rs[k]) for k in rs)
                for run_p, run_s in runs.values() for p, rp, s, rs in zip(run_p, ref_p, run_s, ref_s)
            )
            st.check(f"{cls.__name__} {dtype}, {steps} steps with a NaN gradient: {' = '.join(names)}", same)
            if ON_GPU and backends.available("cpu", "cpu"):
                cpu_p, cpu_s = _run_optimizer(cls, params0, steps, "cpu", device=torch.device("cpu"), with_nan=True)
                params = compare(torch.cat([p.float().reshape(-1) for p in ref_p]),
                                 torch.cat([p.float().reshape(-1) for p in cpu_p]))
                st.figure(f"{cls.__name__} {dtype}: GPU vs pyquant CPU after {steps} steps", params)
                if params["identical"] < 1.0:
                    st.note(f"{cls.__name__} {dtype}: GPU and CPU differ on {1 - params['identical']:.2%} of parameters "
                            "(the CPU's square root is MKL's, up to 1 ulp from the GPU's IEEE sqrt: docs/numerics.md)")


def bits_unscale(st: Stage) -> None:
    from pyquant.amp import unscale_

    shapes = [(1000,), (4096 * 2 + 5,), (33, 17)]
    for with_inf in (False, True):
        results = {}
        for name in device_backends():
            grads = [(torch.randn(s, generator=generator(i)) * 1e4).to(d).to(DEVICE)
                     for i, (s, d) in enumerate(zip(shapes, FLOAT_DTYPES))]
            if with_inf:
                grads[1][7] = float("inf")
            found = torch.zeros(1, device=DEVICE)
            with backends.use_backend(name), interpreter_patches():
                unscale_(grads, found, torch.full((1,), 1 / 1024, device=DEVICE))
            results[name] = (grads, found)
        names = list(results)
        ref_g, ref_f = results[names[0]]
        same = all(equal_bits(f, ref_f) and all(equal_bits(a, b) for a, b in zip(g, ref_g)) for g, f in results.values())
        st.check(f"unscale_ ({'with' if with_inf else 'no'} inf): {' = '.join(names)}", same,
                 found_inf=float(ref_f.item()))


def bits_against_bnb_adam(st: Stage) -> None:
    """pyquant.Adam8bit against bitsandbytes' Adam8bit on DEVICE after 100 steps, and the loss curves of a small run."""
    bnb = bnb_module()
    if isinstance(bnb, Exception):
        st.note(f"bitsandbytes unavailable ({bnb}): no comparison with its Adam8bit")
        return
    steps, n = (10, 4096 * 4 + 17) if SMOKE else (100, (1 << 20) + 17)
    p0 = torch.randn(n, generator=generator(3)) * 0.1
    ours = torch.nn.Parameter(p0.clone().to(DEVICE))
    theirs = torch.nn.Parameter(p0.clone().to(DEVICE))
    opt_ours = pyquant.Adam8bit([ours], lr=1e-3, nonfinite="propagate")
    opt_theirs = bnb.optim.Adam8bit([theirs], lr=1e-3)
    for step in range(steps):
        g = (torch.randn(n, generator=generator(step)) * 0.01).to(DEVICE)
        ours.grad, theirs.grad = g.clone(), g.clone()
        with interpreter_patches():
            opt_ours.step()
        opt_theirs.step()
    result = {"parameters": compare(ours, theirs)}
    for key in ("state1", "state2", "absmax1", "absmax2"):
        result[key] = compare(opt_ours.state[ours][key], opt_theirs.state[theirs][key])
    st.figure(f"Adam8bit vs bitsandbytes {DEVICE.type}, {steps} steps, {n} parameters", result)
    if DEVICE.type == "cpu":  # the contract: bitsandbytes' CPU bits
        st.check(f"Adam8bit = bitsandbytes cpu after {steps} steps, parameters and states",
                 all(r["identical"] == 1.0 for r in result.values()))
    curves = _loss_curves(bnb)
    st.figure("loss curves (small MLP, every 10 steps)", curves)
    ours, theirs, fp32 = (curves[k][-1] for k in ("pyquant.Adam8bit", "bitsandbytes.Adam8bit", "torch.optim.Adam"))
    st.check("final loss of pyquant.Adam8bit within 10% of bitsandbytes' and torch's",
             abs(ours - theirs) <= 0.1 * theirs and abs(ours - fp32) <= 0.1 * fp32, pyquant=ours, bitsandbytes=theirs,
             torch=fp32)


def _loss_curves(bnb) -> dict:
    steps = 30 if SMOKE else 300
    data_gen = generator(11)
    x = torch.randn(512, 64, generator=data_gen)
    y = (x[:, :8].sum(1, keepdim=True) > 0).float()
    x, y = x.to(DEVICE), y.to(DEVICE)
    curves = {}
    makers = {"torch.optim.Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
              "pyquant.Adam8bit": lambda ps: pyquant.Adam8bit(ps, lr=1e-3),
              "bitsandbytes.Adam8bit": lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3)}
    for name, make in makers.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).to(DEVICE)
        opt = make(model.parameters())
        curve = []
        for step in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            with interpreter_patches():
                opt.step()
            if step % 10 == 0 or step == steps - 1:
                curve.append(round(loss.item(), 5))
        curves[name] = curve
    return curves


def stage_bits(st: Stage, args) -> None:
    st.attempt("quantize/dequantize bits", lambda: bits_quantize(st))
    st.attempt("quantize against bitsandbytes", lambda: bits_quantize_bnb(st))
    st.attempt("optimizer step bits", lambda: bits_optimizers(st))
    st.attempt("unscale bits", lambda: bits_unscale(st))
    st.attempt("Adam8bit against bitsandbytes", lambda: bits_against_bnb_adam(st))


# ---- stage: bench ----
def _count(n: int) -> str:
    return f"{n / 2**20:g}Mi" if n >= 2**20 else f"{n / 2**10:g}Ki"


def _gbs(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def bench_adam(st: Stage) -> None:
    bnb = bnb_module()
    sizes = (1 << 16,) if SMOKE else (1 << 24, 1 << 28)
    reps = 5 if SMOKE else 20
    for n in sizes:
        rows = {}
        grad = torch.randn(n, device=DEVICE) * 0.01
        for backend in [b for b in device_backends() if b != "reference"]:
            def run(backend=backend):
                p = torch.nn.Parameter(torch.zeros(n, device=DEVICE))
                p.grad = grad
                opt = pyquant.Adam8bit([p])
                with backends.use_backend(backend), interpreter_patches():
                    rows[f"pyquant {backend}"] = (median_seconds(opt.step, reps), 16)
            st.attempt(f"8-bit step, pyquant {backend}, {_count(n)} parameters", run)
        if not isinstance(bnb, Exception):
            p = torch.nn.Parameter(torch.zeros(n, device=DEVICE))
            p.grad = grad
            opt = bnb.optim.Adam8bit([p])
            rows["bitsandbytes Adam8bit"] = (median_seconds(opt.step, reps), 16)
            del opt, p
        p = torch.nn.Parameter(torch.zeros(n, device=DEVICE))
        p.grad = grad
        opt = torch.optim.Adam([p], fused=True)
        rows["torch Adam(fused=True), float32 states"] = (median_seconds(opt.step, reps), 28)
        del opt, p, grad
        table = {k: {"ms": 1e3 * t, "GB/s": _gbs(b * n, t), "of copy bandwidth": _gbs(b * n, t) / COPY_BANDWIDTH_GBS}
                 for k, (t, b) in rows.items()}
        st.figure(f"8-bit step, {_count(n)} float32 parameters", table)
        if ON_GPU:
            torch.cuda.empty_cache()


def bench_quantize(st: Stage) -> None:
    bnb = bnb_module()
    n = 1 << 16 if SMOKE else 1 << 26
    reps = 5 if SMOKE else 20
    x = torch.randn(n, device=DEVICE)
    rows = {}
    for b in [b for b in device_backends() if b != "reference"]:
        with backends.use_backend(b), interpreter_patches():
            q, absmax = F.quantize_blockwise(x)
            rows[f"quantize pyquant {b}"] = (median_seconds(lambda: F.quantize_blockwise(x), reps), 5)
            rows[f"dequantize pyquant {b}"] = (
                median_seconds(lambda: F.dequantize_blockwise(q, absmax), reps), 5)
    if not isinstance(bnb, Exception):
        q, state = bnb.functional.quantize_blockwise(x, blocksize=256)
        rows["quantize bitsandbytes"] = (median_seconds(lambda: bnb.functional.quantize_blockwise(x, blocksize=256), reps), 5)
        rows["dequantize bitsandbytes"] = (median_seconds(lambda: bnb.functional.dequantize_blockwise(q, state), reps), 5)
    st.figure(f"quantize/dequantize, {_count(n)} float32, blocksize 256",
              {k: {"ms": 1e3 * t, "GB/s": _gbs(b * n, t)} for k, (t, b) in rows.items()})


def _densenet_grads() -> list[torch.Tensor]:
    import timm

    shapes = [p.shape for p in timm.create_model("densenet121", pretrained=False).parameters()]
    if SMOKE:
        shapes = shapes[:20]
    return [torch.randn(s, device=DEVICE) for s in shapes]


def bench_unscale(st: Stage) -> None:
    from pyquant.amp import unscale_

    grads = _densenet_grads()
    inv = torch.full((1,), 1 / 1024, device=DEVICE)
    found = torch.zeros(1, device=DEVICE)
    reps = 5 if SMOKE else 50
    n = sum(g.numel() for g in grads)
    rows = {"torch._amp_foreach_non_finite_check_and_unscale_":
            median_seconds(lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv), reps)}
    for b in [b for b in device_backends() if b != "reference"]:
        with backends.use_backend(b), interpreter_patches():
            rows[f"pyquant unscale_ ({b})"] = median_seconds(lambda: unscale_(grads, found, inv), reps)
    st.figure(f"unscale_ over {len(grads)} gradients ({n / 1e6:.1f}M float32)",
              {k: {"ms": 1e3 * t, "GB/s": _gbs(8 * n, t)} for k, t in rows.items()})


def bench_matmul(st: Stage) -> None:
    from pyquant.ops import matmul

    sizes = (128,) if SMOKE else (4096, 8192)
    dtypes = (torch.bfloat16,) if SMOKE else (torch.float16, torch.bfloat16)
    for dtype in dtypes:
        for s in sizes:
            a = torch.randn(s, s, device=DEVICE).to(dtype)
            b = torch.randn(s, s, device=DEVICE).to(dtype)
            flop = 2 * s**3
            reps = 3 if SMOKE else 10
            with interpreter_patches():
                ours = median_seconds(lambda: matmul(a, b), reps)
                err = (matmul(a, b).double() - a.double() @ b.double()).abs().max().item()
            theirs = median_seconds(lambda: torch.matmul(a, b), reps)
            st.figure(f"matmul {dtype} {s}^3", {"pyquant ms": 1e3 * ours, "pyquant TFLOP/s": flop / ours / 1e12,
                                                 "torch ms": 1e3 * theirs, "torch TFLOP/s": flop / theirs / 1e12,
                                                 "pyquant max abs error vs float64": err})


def bench_lowrank(st: Stage) -> None:
    cases = _load_file_module("bench_lowrank_cases", ROOT / "bench" / "lowrank_cases.py")
    names = list(cases.SHAPES)[:1] if SMOKE else list(cases.SHAPES)
    dtype = torch.float32 if SMOKE else torch.float16
    reps = 3 if SMOKE else 30
    rows = {}
    for name in names:
        shape = cases.SHAPES[name]
        rank = cases.rank(shape, "C/8")
        n, cin, _, size, *_ = shape
        mods = {k: m.to(DEVICE).to(dtype) for k, m in cases.modules(shape, rank, torch.float32).items()}
        x = torch.randn(n, cin, size, size, generator=generator(1)).to(dtype).to(DEVICE)
        row = {}
        for label, module in mods.items():
            with torch.no_grad(), interpreter_patches():
                row[label + " ms"] = 1e3 * median_seconds(lambda: module(x), reps)
        row["fused vs dense"] = row[cases.IMPLS[0] + " ms"] / row[cases.IMPLS[2] + " ms"]
        row["fused vs pair"] = row[cases.IMPLS[1] + " ms"] / row[cases.IMPLS[2] + " ms"]
        rows[f"{name} rank {rank}"] = row
    st.figure(f"LowRankConv2d forward ({dtype}, rank C/8)", rows)


def stage_bench(st: Stage, args) -> None:
    for name, fn in (("8-bit step", bench_adam), ("quantize", bench_quantize), ("unscale", bench_unscale),
                     ("matmul", bench_matmul), ("low-rank conv", bench_lowrank)):
        st.attempt(f"benchmark: {name}", lambda fn=fn: fn(st))
    st.check("benchmarks ran", not any(c for c in st.data["checks"] if not c["passed"]))


# ---- stage: profile ----
def stage_profile(st: Stage, args) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 32 * 32, 2)).to(DEVICE)
    opt = pyquant.Adam8bit(model.parameters())
    scaler = pyquant.amp.GradScaler(DEVICE.type)
    x = torch.randn(8, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 2, (8,), device=DEVICE)

    def train_step():
        with torch.autocast(DEVICE.type, dtype=torch.float16 if ON_GPU else torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # an explicit unscale, so that pyquant::unscale_ shows in the trace too
        scaler.step(opt)
        scaler.update()

    with interpreter_patches():
        train_step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
        with profile(activities=activities) as prof:
            train_step()
            sync()
    trace = Path(args.work) / "trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(Path(args.out) / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    names = sorted({e.name for e in prof.events() if e.name.startswith("pyquant::")})
    st.figure("pyquant ranges in the trace", names)
    if ON_GPU:
        kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
        st.figure("GPU kernels in the trace", kernels[:40])
    st.check("torch.profiler trace holds pyquant::adam_step and pyquant::unscale_ ranges",
             any("adam" in n for n in names) and any("unscale" in n for n in names), ranges=names)
    _ncu(st, args)


def _ncu(st: Stage, args) -> None:
    ncu = shutil.which("ncu")
    if not ON_GPU:
        st.note("Nsight Compute: not run (no GPU)")
        return
    if ncu is None:
        st.note("Nsight Compute: ncu is not on PATH")
        return
    report = Path(args.out) / "ncu.txt"
    command = [ncu, "--target-processes", "all", "--kernel-name", "regex:adam", "--launch-count", "1",
               "--section", "SpeedOfLight", "--section", "MemoryWorkloadAnalysis",
               sys.executable, "-P", str(Path(__file__)), "adam-once", "--work", str(args.work), "--out", str(args.out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        report.write_text(done.stdout[-200_000:] + "\n--- stderr ---\n" + done.stderr[-20_000:])
        ok = done.returncode == 0 and "Duration" in done.stdout
        st.check("Nsight Compute metrics of the Adam kernel", ok, returncode=done.returncode, report="ncu.txt")
    except subprocess.TimeoutExpired:
        st.check("Nsight Compute metrics of the Adam kernel", False, error="ncu ran past 60 s")


def stage_adam_once(st: Stage, args) -> None:
    """One 16M-parameter 8-bit step (what ncu profiles)."""
    p = torch.nn.Parameter(torch.zeros(1 << 24, device=DEVICE))
    p.grad = torch.randn_like(p)
    opt = pyquant.Adam8bit([p])
    opt.step()
    opt.step()
    sync()


# ---- stage: study ----
def stage_study(st: Stage, args) -> None:
    runs = Path(args.work) / "study"
    data = Path(args.work) / "rsna-demo"
    command = [sys.executable, "-P", "-m", "pyquant.cli", "experiment", "--preset", "quick", "--out", str(runs),
               "--quiet", "--no-report", "--set", f"data.rsna.root={data}", "--generate-data",
               "--device", DEVICE.type, "--seeds", "1", "--jobs", "1"]  # one run at a time: the GPU's figures its own
    if SMOKE:
        command += ["--settings", "baseline", "8bit", "--epochs", "1", "--set", "downsample.scales=[]",
                    "--set", "data.rsna.generate.n_patients=40", "--set", "data.rsna.size=32"]
    else:
        command += ["--epochs", str(args.study_epochs), "--set", "downsample.scales=[]", "--threads", "0"]
    st.figure("command", " ".join(command))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.study_timeout)
    st.figure("output (last lines)", (done.stdout + done.stderr)[-3000:])
    table = {}
    for record_file in sorted(runs.rglob("record.json")):
        record = json.loads(record_file.read_text())
        resources = record.get("resources", {})
        energy = resources.get("energy", {})
        table[record["config"]["setting"]] = {
            "test AUC": record["metrics"]["test"].get("auc"),
            "train s": resources["time"]["train_total_s"],
            "epochs": record["training"]["epochs_run"],
            "train peak MiB": resources["memory"]["train_peak_bytes"] / 2**20,
            "optimizer state MiB": resources["memory"]["optimizer_state_bytes"] / 2**20,
            "energy train Wh": energy.get("train_wh"),
            "energy source": energy.get("source") or energy.get("reason"),
        }
    st.figure("runs", table)
    st.check("the quick preset's runs finished", done.returncode == 0 and len(table) > 0,
             returncode=done.returncode, runs=len(table))


# ---- stage: tests (check.sh runs pytest; this reads its log) ----
def stage_tests_summary(st: Stage, args) -> None:
    import re

    log = Path(args.out) / "pytest.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    for part in text.split("--- pytest ")[1:]:
        command, _, body = part.partition("\n")
        summary = [line for line in body.splitlines() if re.search(r"\d+ (passed|failed|skipped|error|deselected)", line)]
        last = summary[-1].strip("= ") if summary else "no summary (pytest did not finish)"
        failures = [line for line in body.splitlines() if line.startswith(("FAILED", "ERROR"))]
        st.check(f"pytest {command}", bool(summary) and not re.search(r"\d+ (failed|error)", last),
                 summary=last, failures=failures[:20])
        skips = sorted({line.split(": ", 1)[-1] for line in body.splitlines() if line.startswith("SKIPPED")})
        if skips:
            st.figure(f"skip reasons ({command})", "\n".join(skips[:15]))


# ---- report ----
def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _markdown_table(rows: dict) -> list[str]:
    columns = []
    for row in rows.values():
        for k in row:
            if k not in columns:
                columns.append(k)
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return lines


def stage_report(st: Stage | None, args) -> None:
    work, out = Path(args.work), Path(args.out)
    stages = []
    log = work / "stages.tsv"
    status = {}
    if log.exists():
        for line in log.read_text().splitlines():
            name, code, milliseconds, limit = line.split("\t")
            status[name] = {"exit": int(code), "seconds": int(milliseconds) / 1e3, "limit_s": int(limit)}
    order = ["setup", "tests", "env", "bits", "bench", "profile", "study"]
    for name in order:
        path = work / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else {"stage": name, "checks": [], "figures": {}, "notes": []}
        data["run"] = status.get(name)
        if name == "setup" and (out / "setup.log").exists():
            data["figures"]["setup.log (last lines)"] = "\n".join(
                (out / "setup.log").read_text(errors="replace").splitlines()[-25:])
        stages.append(data)
    results = {"smoke": SMOKE, "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": stages}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    lines = [f"# pyquant GPU check{' (smoke: CPU only, tiny sizes)' if SMOKE else ''}", "",
             f"Generated {results['generated']} by `bench/gpu/check.sh{' --smoke' if SMOKE else ''}`. "
             "Raw figures: results.json; trace: trace.json.gz; logs: pytest.log, setup.log.", "",
             "| stage | exit | seconds (limit) | checks passed |", "|---|---|---|---|"]
    for data in stages:
        run = data["run"]
        passed = sum(c["passed"] for c in data["checks"])
        exit_text = "not run" if run is None else ("timed out" if run["exit"] == 124 else str(run["exit"]))
        seconds = "" if run is None else f"{run['seconds']:.0f} ({run['limit_s']})"
        lines.append(f"| {data['stage']} | {exit_text} | {seconds} | {passed}/{len(data['checks'])} |")
    for data in stages:
        lines += ["", f"## {data['stage']}", ""]
        for c in data["checks"]:
            detail = {k: v for k, v in c.items() if k not in ("name", "passed")}
            lines.append(f"- {'PASS' if c['passed'] else '**FAIL**'} {c['name']}" + (f" `{detail}`" if detail else ""))
        for note in data["notes"]:
            lines.append(f"- note: {note}")
        for key, value in data["figures"].items():
            if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                lines += ["", f"**{key}**", ""] + _markdown_table(value)
            elif isinstance(value, str) and "\n" in value:
                lines += ["", f"**{key}**", "", "```", value.strip()[-2000:], "```"]
            else:
                lines.append(f"- {key}: {_fmt(value) if not isinstance(value, (dict, list)) else json.dumps(value, default=str)}")
    (out / "gpu_report.md").write_text("\n".join(lines) + "\n")


STAGES = {"env": stage_env, "bits": stage_bits, "bench": stage_bench, "profile": stage_profile,
          "study": stage_study, "tests-summary": stage_tests_summary, "adam-once": stage_adam_once, "report": stage_report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--study-epochs", type=int, default=5)
    parser.add_argument("--study-timeout", type=int, default=100)
    args = parser.parse_args()
    if args.stage in ("report", "adam-once"):
        STAGES[args.stage](None, args)
        return 0
    st = Stage("tests" if args.stage == "tests-summary" else args.stage, Path(args.work))
    st.save()
    st.attempt(args.stage, lambda: STAGES[args.stage](st, args))
    return 0 if all(c["passed"] for c in st.data["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
