"""The cuda backend (csrc/cuda, pyquant/backends/cuda) against the cpu backend, bit for bit.

The GPU tests skip with "needs a CUDA device" on machines without one. Where nvcc exists, the kernels are
always compile-checked (.ci/compile_cuda.sh: warnings as errors, and no approximate, flush-to-zero or
contracted float32 instruction in the PTX).

NaN payloads are the one thing the backends may legitimately differ in: x86 propagates an input NaN's
payload (and generates a negative default NaN), NVIDIA GPUs produce one canonical NaN. The contract fixes
where NaN appears, not its bits, so float comparisons here are bitwise except that NaN matches any NaN.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import pyquant
from pyquant import _contract, backends as registry, functional
from pyquant.backends import capi

ROOT = Path(__file__).resolve().parents[1]
COMPILE_SCRIPT = ROOT / ".ci" / "compile_cuda.sh"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


# ---- always run: the module imports without CUDA, and the CUDA source compiles ----
def test_cuda_module_imports_without_cuda_work():
    # Importing the backend registers its kernels (no CUDA call): the ops of the cpu library, all of them.
    hand_written = {"code_table", "quantize_blockwise", "dequantize_blockwise", "adam_step", "unscale_"}
    assert hand_written <= set(registry.kernels_of("cuda")) and hand_written <= set(registry.kernels_of("cpu"))
    # The descriptors are copied as raw bytes followed by 8-byte aligned int64s (csrc/cuda/adam.cu static_asserts this).
    assert ctypes.alignment(capi.AdamTensor) == 8 and ctypes.sizeof(capi.AdamTensor) % 8 == 0


def _run_compile_script(**env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(COMPILE_SCRIPT)], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_cuda_kernels_compile_with_exact_ieee_ptx():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    result = _run_compile_script()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CUDA compile check passed" in result.stdout


def test_compile_check_catches_fast_math():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    result = _run_compile_script(PYQUANT_CUDA_ARCHS="80", PYQUANT_NVCC_EXTRA_FLAGS="--use_fast_math")
    assert result.returncode != 0, result.stdout + result.stderr
    assert "FAILED" in result.stderr


def test_compile_script_skips_without_nvcc(tmp_path):
    # An empty PATH: the script decides with bash's builtin `command -v` before it needs any other tool.
    result = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(COMPILE_SCRIPT)], capture_output=True, text=True, timeout=60,
        env={"PATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nvcc not found: skipping the CUDA compile check" in result.stdout


# ---- GPU: cuda backend == cpu backend ----
@pytest.fixture
def backends():
    """(cpu ops, cuda ops); skips where they cannot both run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if capi.cpu_library() is None:
        pytest.skip("the C++ CPU library was not built (pip install -e .)")
    if capi.cuda_library() is None:
        pytest.skip("the CUDA library was not built (PYQUANT_CUDA=ON pip install -e .)")
    return registry.kernels_of("cpu"), registry.kernels_of("cuda")


def assert_same(cpu: torch.Tensor, gpu: torch.Tensor, what: str = "") -> None:
    """Bitwise equality, except that any NaN matches any NaN (see the module docstring)."""
    gpu = gpu.cpu()
    assert cpu.dtype == gpu.dtype and cpu.shape == gpu.shape, what
    if cpu.dtype in BITS_VIEW:
        nan_c, nan_g = torch.isnan(cpu), torch.isnan(gpu)
        assert torch.equal(nan_c, nan_g), f"{what}: NaN positions differ"
        view = BITS_VIEW[cpu.dtype]
        diff = (cpu.view(view) != gpu.view(view)) & ~nan_c
    else:
        diff = cpu != gpu
    if diff.any():
        idx = diff.reshape(-1).nonzero()[:5, 0].tolist()
        flat_c, flat_g = cpu.reshape(-1), gpu.reshape(-1)
        pairs = [(i, flat_c[i].item(), flat_g[i].item()) for i in idx]
        raise AssertionError(f"{what}: {int(diff.sum())} elements differ, e.g. (index, cpu, cuda) {pairs}")


def special_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values at many scales, with zeros, +-0, NaN, +-inf, subnormals and huge values sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    finfo = torch.finfo(dtype)
    specials = torch.tensor(
        [0.0, -0.0, float("nan"), float("inf"), -float("inf"), finfo.tiny / 4, -finfo.tiny / 2, finfo.max, -finfo.max,
         1.0, -1.0, finfo.eps, 1e-30]
    )
    pick = torch.rand(n, generator=g) < 0.02
    x[pick] = specials[torch.randint(0, len(specials), (int(pick.sum()),), generator=g)]
    return x.to(dtype)


def block_patterns(blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks that are special as a block: all zero, all NaN, subnormal absmax, inf absmax, constant."""
    tiny = torch.finfo(dtype).tiny
    rows = [
        torch.zeros(blocksize),
        torch.full((blocksize,), -0.0),
        torch.full((blocksize,), float("nan")),
        torch.linspace(-tiny / 2, tiny / 4, blocksize),  # subnormal absmax (in dtype): inv = inf for float32
        torch.linspace(-3.0, 3.0, blocksize).index_fill_(0, torch.tensor([blocksize // 2]), float("inf")),
        torch.full((blocksize,), 0.3),
        torch.full((blocksize,), -1e-38),
    ]
    return torch.cat(rows).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [1, 7, 32, 64, 255, 256, 257, 1000, 4096, 70000])
def test_quantize_matches_cpu(backends, dtype, blocksize):
    cpu, cuda = backends
    n = 3 * blocksize + blocksize // 3 + 5 if blocksize < 4096 else 200_003
    x = torch.cat([special_values(n, dtype, seed=blocksize), block_patterns(blocksize, dtype)])
    for signed in (True, False):
        code = functional.create_dynamic_map(signed)
        q_c, a_c = cpu["quantize_blockwise"](x, code, blocksize)
        q_g, a_g = cuda["quantize_blockwise"](x.cuda(), code.cuda(), blocksize)
        assert_same(a_c, a_g, f"absmax signed={signed}")
        assert_same(q_c, q_g, f"codes signed={signed}")


@pytest.mark.gpu
def test_quantize_custom_code_and_shapes(backends):
    cpu, cuda = backends
    code = torch.sort(torch.randn(256, generator=torch.Generator().manual_seed(0))).values
    code = code / code.abs().max()
    for shape in [(0,), (1,), (3, 5), (17, 33, 9)]:
        x = special_values(math.prod(shape), torch.float32, seed=len(shape)).reshape(shape)
        q_c, a_c = cpu["quantize_blockwise"](x, code, 64)
        q_g, a_g = cuda["quantize_blockwise"](x.cuda(), code.cuda(), 64)
        assert q_g.shape == shape and q_g.device.type == "cuda"
        assert_same(a_c, a_g, f"absmax {shape}")
        assert_same(q_c, q_g, f"codes {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [1, 64, 256, 333, 4096])
def test_dequantize_matches_cpu(backends, dtype, blocksize):
    cpu, cuda = backends
    g = torch.Generator().manual_seed(blocksize)
    n = 5 * blocksize + 17
    q = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    blocks = -(-n // blocksize)
    absmax = torch.rand(blocks, generator=g) * torch.exp2(torch.randint(-140, 100, (blocks,), generator=g).float())
    absmax[: min(blocks, 4)] = torch.tensor([0.0, float("inf"), float("nan"), 1e-45])[: min(blocks, 4)]
    for signed in (True, False):
        code = functional.create_dynamic_map(signed)
        out_c = cpu["dequantize_blockwise"](q, absmax, code, blocksize, dtype)
        out_g = cuda["dequantize_blockwise"](q.cuda(), absmax.cuda(), code.cuda(), blocksize, dtype)
        assert out_g.dtype == dtype
        assert_same(out_c, out_g, f"dequantize signed={signed}")


@pytest.mark.gpu
def test_public_api_uses_cuda_backend(backends):
    x = special_values(10_000, torch.float32, seed=7)
    with pyquant.use_backend("cpu"):
        q_c, a_c = functional.quantize_blockwise(x)
        out_c = functional.dequantize_blockwise(q_c, a_c, dtype=torch.bfloat16)
    with pyquant.use_backend("cuda"):
        q_g, a_g = functional.quantize_blockwise(x.cuda())
        out_g = functional.dequantize_blockwise(q_g, a_g, dtype=torch.bfloat16)
    assert_same(q_c, q_g, "codes")
    assert_same(a_c, a_g, "absmax")
    assert_same(out_c, out_g, "dequantized")


@pytest.mark.gpu
def test_kernels_run_on_the_current_stream(backends):
    cpu, cuda = backends
    x = special_values(1 << 20, torch.float16, seed=3)
    code = functional.create_dynamic_map(True)
    q_c, a_c = cpu["quantize_blockwise"](x, code, 256)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xg, codeg = x.cuda(non_blocking=True), code.cuda(non_blocking=True)
        q_g, a_g = cuda["quantize_blockwise"](xg, codeg, 256)
        out_g = cuda["dequantize_blockwise"](q_g, a_g, codeg, 256, torch.float32)
    stream.synchronize()
    assert_same(q_c, q_g, "codes")
    assert_same(a_c, a_g, "absmax")
    assert_same(cpu["dequantize_blockwise"](q_c, a_c, code, 256, torch.float32), out_g, "dequantized")


# ---- Adam ----
def constants_row(step: int, eight_bit: bool, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.0) -> list[float]:
    return _contract.adam_constants(dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd), step, eight_bit)


# (numel, 8-bit states, param dtype, grad dtype, weight decay): 8-bit and float32 states, partial last
# blocks, an empty tensor, mixed param/grad dtypes.
GROUP = [
    (5000, True, torch.float32, torch.float32, 0.0),
    (4096 * 2 + 77, True, torch.float16, torch.float16, 0.01),
    (300, False, torch.float32, torch.float32, 0.0),
    (0, False, torch.float32, torch.float32, 0.0),
    (4095, False, torch.bfloat16, torch.bfloat16, 0.1),
    (256 * 3, True, torch.bfloat16, torch.bfloat16, 0.0),
    (1, False, torch.float16, torch.float32, 0.0),
    (6000, True, torch.float32, torch.bfloat16, 0.05),
]


def make_group(seed: int):
    g = torch.Generator().manual_seed(seed)
    code1, code2 = functional.create_dynamic_map(True), functional.create_dynamic_map(False)
    tensors = {"params": [], "state1": [], "state2": [], "absmax1": [], "absmax2": []}
    for i, (n, eight_bit, pdt, _gdt, _wd) in enumerate(GROUP):
        tensors["params"].append((torch.randn(n, generator=g) * 0.1).to(pdt))
        if eight_bit:
            blocks = -(-n // 256)
            if i % 2:  # fresh states, as an optimizer creates them
                tensors["state1"].append(torch.zeros(n, dtype=torch.uint8))
                tensors["state2"].append(torch.zeros(n, dtype=torch.uint8))
                tensors["absmax1"].append(torch.zeros(blocks))
                tensors["absmax2"].append(torch.zeros(blocks))
            else:  # warm states
                quantize = registry.kernels_of("cpu")["quantize_blockwise"]
                q1, a1 = quantize(torch.randn(n, generator=g) * 1e-3, code1, 256)
                q2, a2 = quantize(torch.rand(n, generator=g) * 1e-6, code2, 256)
                for key, val in (("state1", q1), ("absmax1", a1), ("state2", q2), ("absmax2", a2)):
                    tensors[key].append(val)
        else:
            tensors["state1"].append(torch.randn(n, generator=g) * 1e-3)
            tensors["state2"].append(torch.rand(n, generator=g) * 1e-6)
            tensors["absmax1"].append(torch.zeros(0))
            tensors["absmax2"].append(torch.zeros(0))
    return tensors, code1, code2


def make_grads(step: int, bad_fraction: float):
    g = torch.Generator().manual_seed(1000 + step)
    grads = []
    for n, _eight_bit, _pdt, gdt, _wd in GROUP:
        grad = torch.randn(n, generator=g) * torch.exp2(torch.randint(-12, 2, (n,), generator=g).float())
        if bad_fraction and n:
            pick = torch.rand(n, generator=g) < bad_fraction
            bad = torch.tensor([float("nan"), float("inf"), -float("inf")])
            grad[pick] = bad[torch.randint(0, 3, (int(pick.sum()),), generator=g)]
        grads.append(grad.to(gdt))
    return grads


@pytest.fixture
def ieee_cpu_sqrt(backends):
    """The CPU library with IEEE sqrtf in Adam's denominator, as the CUDA kernels (and torch on a GPU) use.

    The CPU library may take sqrt(v) from torch's CPU sqrt routine (MKL's vsSqrt, up to 1 ulp from IEEE,
    see pyquant.backends.capi._torch_cpu_sqrt) to match torch and bitsandbytes on a CPU; the GPU has IEEE sqrt.
    The kernels' own logic is compared with the CPU drivers under the same (IEEE) square root.
    """
    setter = capi.cpu_library().pq_set_cpu_sqrt
    setter(None)
    try:
        yield backends
    finally:
        setter(capi._torch_cpu_sqrt())


def run_adam_steps(ops_a, device_a, ops_b, device_b, nonfinite, bad_fraction, steps=5):
    """Run the same steps on two backends (each on its own copies) and compare everything after each step."""
    host, code1, code2 = make_group(seed=nonfinite)
    a = {k: [t.to(device_a) for t in v] for k, v in host.items()}
    b = {k: [t.to(device_b) for t in v] for k, v in host.items()}
    for step in range(1, steps + 1):
        # Per-tensor step counts may differ inside a group: offset some tensors' counts.
        constants = torch.tensor(
            [constants_row(step + (i % 3), eight_bit, wd=wd) for i, (_n, eight_bit, _p, _g, wd) in enumerate(GROUP)],
            dtype=torch.float32,
        )
        grads = make_grads(step, bad_fraction if step in (2, 4) else 0.0)
        counts = []
        for ops, dev, st in ((ops_a, device_a, a), (ops_b, device_b, b)):
            counts.append(int(ops["adam_step"](
                st["params"], [g.to(dev) for g in grads], st["state1"], st["state2"], st["absmax1"], st["absmax2"],
                constants, code1.to(dev), code2.to(dev), nonfinite,
            )))
        assert counts[0] == counts[1], f"step {step}: non-finite counts differ"
        if nonfinite == 0 and bad_fraction and step in (2, 4):
            assert counts[1] > 0
        for key in host:
            for i, (x, y) in enumerate(zip(a[key], b[key])):
                assert_same(x.cpu(), y, f"step {step}, {key}[{i}] {GROUP[i]}")


@pytest.mark.gpu
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
@pytest.mark.parametrize("bad_fraction", [0.0, 0.01], ids=["finite", "nonfinite"])
def test_adam_step_matches_cpu(ieee_cpu_sqrt, nonfinite, bad_fraction):
    cpu, cuda = ieee_cpu_sqrt
    run_adam_steps(cpu, "cpu", cuda, "cuda", nonfinite, bad_fraction)


@pytest.mark.gpu
@pytest.mark.parametrize("nonfinite", [0, 1], ids=["skip", "propagate"])
def test_adam_step_matches_reference_on_gpu(backends, nonfinite):
    """The torch specification on CUDA tensors (torch's GPU sqrt and division are IEEE) against the kernels."""
    _cpu_ops, cuda = backends
    run_adam_steps(registry.kernels_of("reference"), "cuda", cuda, "cuda", nonfinite, 0.01)


@pytest.mark.gpu
def test_adam_step_large_group_one_launch(ieee_cpu_sqrt):
    """Many tensors and many blocks in one launch (the block -> tensor search over the prefix sums)."""
    cpu, cuda = ieee_cpu_sqrt
    g = torch.Generator().manual_seed(11)
    sizes = [int(s) for s in torch.randint(1, 40_000, (60,), generator=g)] + [4_000_000]
    code1, code2 = functional.create_dynamic_map(True), functional.create_dynamic_map(False)
    params = [torch.randn(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g) * 1e-2 for n in sizes]
    eight = [n >= 4096 for n in sizes]
    s1 = [torch.zeros(n, dtype=torch.uint8) if e else torch.zeros(n) for n, e in zip(sizes, eight)]
    s2 = [torch.zeros(n, dtype=torch.uint8) if e else torch.zeros(n) for n, e in zip(sizes, eight)]
    a1 = [torch.zeros(-(-n // 256) if e else 0) for n, e in zip(sizes, eight)]
    a2 = [torch.zeros(-(-n // 256) if e else 0) for n, e in zip(sizes, eight)]
    constants = torch.tensor([constants_row(1, e) for e in eight], dtype=torch.float32)
    dev = [[t.cuda() for t in ts] for ts in (params, s1, s2, a1, a2)]
    cpu["adam_step"](params, grads, s1, s2, a1, a2, constants, code1, code2, 0)
    bad = cuda["adam_step"](dev[0], [t.cuda() for t in grads], *dev[1:], constants, code1.cuda(), code2.cuda(), 0)
    assert int(bad) == 0
    names = ("params", "state1", "state2", "absmax1", "absmax2")
    for name, host_list, dev_list in zip(names, (params, s1, s2, a1, a2), dev):
        for i, (c, d) in enumerate(zip(host_list, dev_list)):
            assert_same(c, d, f"{name}[{i}] (numel {sizes[i]})")


# ---- GradScaler's unscale_ ----
@pytest.mark.gpu
@pytest.mark.parametrize("inv", [1.0, 2.0**-16, 1 / 3])
def test_unscale_kernel_is_the_cpu_rule_in_one_launch(backends, inv):
    """Mixed dtypes, chunk edges, specials: the CUDA kernel's gradients and flag equal the reference's."""
    unscale_reference, unscale_cuda = registry.kernels_of("reference")["unscale_"], backends[1]["unscale_"]
    sizes = [1, 4095, 4096, 4097, 70_001]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float32]
    grads = [special_values(n, torch.float32, seed=n).to(dt) for n, dt in zip(sizes, dtypes)]
    finite = [torch.nan_to_num(g, nan=0.0, posinf=1.0, neginf=-1.0) for g in grads]
    inv_scale = torch.tensor(inv)
    for case in (grads, finite):
        expected = [g.clone() for g in case]
        flag = torch.zeros(())
        unscale_reference(expected, flag, inv_scale)
        on_gpu = [g.cuda() for g in case]
        flag_gpu = torch.zeros((), device="cuda")
        unscale_cuda(on_gpu, flag_gpu, inv_scale.cuda())
        assert flag_gpu.item() == flag.item() == (1.0 if case is grads else 0.0)
        for i, (e, d) in enumerate(zip(expected, on_gpu)):
            same = (e.cpu() == d.cpu()) | (torch.isnan(e.cpu()) & torch.isnan(d.cpu()))
            assert bool(same.all()), f"grad {i} ({dtypes[i]})"
