"""pyquant.amp.GradScaler side by side with torch.amp.GradScaler("cpu"), the `pyquant::unscale_` op against
torch's `_amp_foreach_non_finite_check_and_unscale_`, and its Triton, C++ and CUDA kernels against the reference.

"Bit equality" is torch.equal on integer views. The one relaxation: the NaN bits of float16/bfloat16
gradients are compared by position only (torch's own CPU kernel writes a bfloat16 NaN as 0xFFFF or 0x7FC0
depending on whether the element falls in its vectorised body or its scalar tail).
"""

from __future__ import annotations

import copy
import functools
import io
import os
import pickle
import warnings

import pytest
import torch
from torch import nn

import pyquant.amp as amp
from pyquant import backends
from pyquant.amp import GradScaler
from pyquant.backends.cpu.amp import unscale_ as unscale_cpu
from pyquant.backends.reference.amp import unscale_ as unscale_reference

import conftest
from conftest import TRITON_DEVICE, bits, cpu_isa, needs_cpu_library, special_values

# The NaNs of 16-bit gradients compare by position only (see the module docstring).
assert_same_bits = functools.partial(conftest.assert_same_bits, nan_blind=(torch.float16, torch.bfloat16))


# ---- the op: reference against torch's kernel ----
def every_value(dtype: torch.dtype, n32: int = 1 << 17) -> torch.Tensor:
    """All 65536 patterns of a 16-bit float, or random float32 patterns plus the special values."""
    if dtype == torch.float32:
        g = torch.Generator().manual_seed(1)
        rand = torch.randint(-(2**31), 2**31 - 1, (n32,), dtype=torch.int32, generator=g).view(torch.float32)
        special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 3.4e38, 1.0])
        return torch.cat([rand, special])
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


INV_SCALES = (1.0, 0.5, 2.0**-16, 2.0**-24, 1e-30, 1e30, float(torch.tensor(3.0).double().reciprocal().float()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_torchs_kernel_on_every_value(dtype):
    x = every_value(dtype)
    for inv in INV_SCALES:
        inv_t = torch.tensor(inv, dtype=torch.float32)
        want, found_want = x.clone(), torch.zeros(())
        torch._amp_foreach_non_finite_check_and_unscale_([want], found_want, inv_t)
        got, found_got = x.clone(), torch.zeros(())
        unscale_reference([got], found_got, inv_t)
        assert_same_bits(got, want, f"{dtype} inv={inv}")
        if dtype == torch.float32:  # even the NaN payloads
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert found_got.item() == found_want.item() == 1.0


def test_op_one_call_mixed_dtypes_shapes_and_strides():
    g = torch.Generator().manual_seed(2)
    grads = [
        torch.randn(7, 5, generator=g),
        torch.randn(33, generator=g, dtype=torch.float16) * 1000,
        torch.randn(4, 4, generator=g).to(torch.bfloat16).t(),  # non-contiguous
        torch.randn((), generator=g, dtype=torch.float64),
        torch.randn(0),
        torch.randn(3, 8, generator=g)[:, ::2],  # non-contiguous
    ]
    inv = torch.tensor(1 / 1024, dtype=torch.float32)
    want = [t.clone() for t in grads]
    for t in want:
        found = torch.zeros(())
        torch._amp_foreach_non_finite_check_and_unscale_([t], found, inv)
    found = torch.zeros(())
    amp.unscale_(grads, found, inv)
    assert_same_bits(grads, want)
    assert found.item() == 0.0  # all finite: found_inf is left alone
    grads[1][5] = float("inf")
    amp.unscale_(grads, found, inv)
    assert found.item() == 1.0
    grads[1][5] = 1.0
    amp.unscale_(grads, found, inv)
    assert found.item() == 1.0  # never cleared by the op


def test_op_errors_and_fake_kernel():
    with pytest.raises(TypeError, match="only floating-point"):
        amp.unscale_([torch.ones(3), torch.ones(3, dtype=torch.int32)], torch.zeros(()), torch.tensor(0.5))
    with pytest.raises(TypeError, match="found_inf"):
        amp.unscale_([torch.ones(3)], torch.zeros((), dtype=torch.float64), torch.tensor(0.5))
    with pytest.raises(TypeError, match="inv_scale"):
        amp.unscale_([torch.ones(3)], torch.zeros(()), torch.tensor(0.5, dtype=torch.float64))
    args = ([torch.randn(5), torch.randn(3, dtype=torch.float16)], torch.zeros(()), torch.tensor(0.25))
    torch.library.opcheck(
        torch.ops.pyquant.unscale_.default, args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_eager_call_checks_each_gradient_and_marks_them_written(backend):
    """Eager calls skip the custom op's dispatch: every backend still refuses a bad gradient by its index, and the
    gradients' version counters move as the op's `mutates_args` makes them (autograd sees the in-place write)."""
    with backends.use_backend(backend):
        with pytest.raises(TypeError, match="gradient 2 is torch.int64"):
            amp.unscale_([torch.ones(3), torch.ones(2), torch.ones(2, dtype=torch.int64)], torch.zeros(()),
                         torch.tensor(0.5))
        grads = [torch.ones(5), torch.ones(4, 2).t()]  # a contiguous gradient and a transposed one
        found = torch.zeros(())
        versions = [g._version for g in grads] + [found._version]
        amp.unscale_(grads, found, torch.tensor(0.5))
    assert all(torch.equal(g, torch.full_like(g, 0.5)) for g in grads)
    assert all(after > before for after, before in zip([g._version for g in grads] + [found._version], versions))
    # Meta tensors take the op (its fake kernel): shapes only, nothing is computed.
    amp.unscale_([torch.empty(3, device="meta")], torch.empty((), device="meta"), torch.empty((), device="meta"))


def test_op_runs_in_a_named_nvtx_range(nvtx_names):
    p = nn.Parameter(torch.randn(4))
    scaler = GradScaler("cpu")
    scaler.scale(p.sum()).backward()
    scaler.step(torch.optim.SGD([p], lr=0.1))
    assert nvtx_names == [("pyquant::unscale_", "pyquant")]


# ---- the Triton kernel against the reference ----
def _kernel_inputs():
    g = torch.Generator().manual_seed(3)
    out = []
    for dtype, n in ((torch.float32, 2500), (torch.float16, 1100), (torch.bfloat16, 700), (torch.float64, 40)):
        if dtype == torch.float64:
            x = torch.randn(n, dtype=dtype, generator=g) * 1e300  # some overflow to inf when scaled up
            x[3], x[7] = float("nan"), float("-inf")
        else:
            x = every_value(dtype, n)[torch.randperm(65536 if dtype != torch.float32 else n + 9, generator=g)[:n]]
        out.append(x.to(TRITON_DEVICE))
    out.append(torch.randn(6, 9, generator=g).t().to(TRITON_DEVICE))  # non-contiguous
    out.append(torch.randn(0, device=TRITON_DEVICE))
    return out


@pytest.mark.triton
@pytest.mark.parametrize("inv", [1.0, 2.0**-16, 1e30])
def test_triton_kernel_is_the_reference(inv):
    import pyquant.kernels.amp as K

    grads = _kernel_inputs()
    inv_t = torch.tensor(inv, dtype=torch.float32, device=TRITON_DEVICE)
    want, found_want = [t.clone() for t in grads], torch.zeros((), device=TRITON_DEVICE)
    unscale_reference(want, found_want, inv_t)
    got, found_got = [t.clone() for t in grads], torch.zeros((), device=TRITON_DEVICE)
    K.unscale_(got, found_got, inv_t)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), i
        keep = ~torch.isnan(b)
        assert torch.equal(bits(a)[keep.cpu()], bits(b)[keep.cpu()]), i
    assert found_got.item() == found_want.item() == 1.0
    # all finite: found_inf untouched
    clean = [torch.randn(300, device=TRITON_DEVICE).to(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    found = torch.zeros((), device=TRITON_DEVICE)
    K.unscale_(clean, found, inv_t.new_tensor(0.5))
    assert found.item() == 0.0


@pytest.mark.triton
def test_scaler_uses_the_triton_kernel_in_one_launch_when_forced(monkeypatch):
    import pyquant.kernels.amp as K

    launches = []
    kernel = K._unscale_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(K, "_unscale_kernel", Counting())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 2))
    model[1].half()
    model[0].bias.data = model[0].bias.data.bfloat16()
    model.to(TRITON_DEVICE)
    twin = copy.deepcopy(model)
    for m, backend in ((model, "triton"), (twin, "reference")):
        for p in m.parameters():
            p.grad = torch.linspace(-3, 3, p.numel(), device=TRITON_DEVICE).reshape(p.shape).to(p.dtype) * 4096
        m[1].weight.grad[0, 0] = float("nan")
        scaler = GradScaler(TRITON_DEVICE, init_scale=4096.0)
        scaler.scale(torch.ones((), device=TRITON_DEVICE))
        with backends.use_backend(backend):
            scaler.unscale_(torch.optim.SGD(m.parameters(), lr=0.1))
        assert scaler._found_inf_per_device  # recorded
    assert len(launches) == 1  # float32, float16 and bfloat16 grads: one launch
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_same_bits(p.grad, q.grad)


def test_backends_find_the_implementations():
    with backends.use_backend("reference"):
        assert backends.implementation("unscale_", "cpu") is unscale_reference
    if os.environ.get("TRITON_INTERPRET") == "1":
        with backends.use_backend("triton"):
            assert backends.implementation("unscale_", "cpu") is backends.kernels_of("triton")["unscale_"]
    # the default CPU backend: the C++ kernel, or the reference without the library
    want = unscale_cpu if backends.available("cpu", "cpu") else unscale_reference
    assert backends.implementation("unscale_", "cpu") is want
    if backends.available("cpu", "cpu"):
        with backends.use_backend("cpu"):
            assert backends.implementation("unscale_", "cpu") is unscale_cpu


def test_forced_triton_without_interpreter_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA tensors can run triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backends.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        amp.unscale_([torch.ones(2)], torch.zeros(()), torch.tensor(0.5))


# ---- the C++ CPU kernel (csrc/cpu/amp.cpp) against the reference and torch's kernel ----
def _exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(bits(a), bits(b))


def _float64_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-(2**63), 2**63 - 1, (1 << 15,), dtype=torch.int64, generator=g).view(torch.float64)
    return torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 5e-324, 1e300])])


@needs_cpu_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_kernel_is_the_reference_and_torchs_kernel_bit_for_bit(dtype):
    x = _float64_values() if dtype == torch.float64 else every_value(dtype)
    for inv in INV_SCALES:
        inv_t = torch.tensor(inv, dtype=torch.float32)
        ref, found_ref = x.clone(), torch.zeros(())
        unscale_reference([ref], found_ref, inv_t)
        outs = {}
        for vector in (True, False):  # the AVX-512 code and the element-by-element rule: identical bits
            got, found = x.clone(), torch.zeros(())
            unscale_cpu([got], found, inv_t, vector=vector)
            assert found.item() == found_ref.item() == 1.0
            assert_same_bits(got, ref, f"{dtype} inv={inv} vector={vector}")
            outs[vector] = got
        assert _exact(outs[True], outs[False]), f"{dtype} inv={inv}: vector and scalar code differ (NaNs included)"
        if dtype in (torch.float32, torch.float64):  # even the NaN payloads
            assert _exact(outs[True], ref)
        if dtype != torch.float16:  # torch refuses float16
            want, found_want = x.clone(), torch.zeros(())
            torch._amp_foreach_non_finite_check_and_unscale_([want], found_want, inv_t)
            assert_same_bits(outs[True], want, f"{dtype} inv={inv} vs torch")
            if dtype == torch.float32:
                assert _exact(outs[True], want)


@needs_cpu_library
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 33, (1 << 15) - 1, (1 << 15) + 5, 100_003])
def test_cpu_kernel_tails_and_chunk_edges(n):
    g = torch.Generator().manual_seed(n)
    inv = torch.tensor(2.0**-10, dtype=torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = (torch.randn(n, generator=g) * 1e3).to(dtype)
        ref, got, f1, f2 = x.clone(), x.clone(), torch.zeros(()), torch.zeros(())
        unscale_reference([ref], f1, inv)
        unscale_cpu([got], f2, inv)
        assert _exact(got, ref) and f1.item() == f2.item() == 0.0, (dtype, n)
        if n:  # one inf, at the last element (a masked tail for most n)
            x[-1] = float("inf")
            f = torch.zeros(())
            unscale_cpu([x], f, inv)
            assert f.item() == 1.0, (dtype, n)


def _mixed_grads(seed=5):
    g = torch.Generator().manual_seed(seed)
    grads = [
        torch.randn(70_001, generator=g) * 1e4,
        torch.randn(3, 33, generator=g).to(torch.float16) * 100,
        torch.randn(40_000, generator=g).to(torch.bfloat16),
        torch.randn(17, generator=g, dtype=torch.float64),
        torch.randn(0),
        torch.randn(9, 8, generator=g)[:, ::2],  # non-contiguous: the reference
        torch.randn(6, 5, generator=g).to(torch.bfloat16).t(),  # non-contiguous
        torch.randn((), generator=g),
        torch.randn(100_000, generator=g).to(torch.float16),
    ]
    grads[1][2, 7] = float("inf")
    grads[8][-3] = 1e-7  # float16 subnormal region after scaling: kept, not flushed
    return grads


@needs_cpu_library
@pytest.mark.parametrize("inv", [1.0, 2.0**-7, 1 / 3])
def test_cpu_kernel_mixed_list_one_call(inv):
    grads = _mixed_grads()
    inv_t = torch.tensor(inv, dtype=torch.float32)
    ref = [t.clone() for t in grads]
    f_ref = torch.zeros(())
    unscale_reference(ref, f_ref, inv_t)
    f = torch.zeros(())
    with backends.use_backend("cpu"):
        amp.unscale_(grads, f, inv_t)
    assert_same_bits(grads, ref)
    assert f.item() == f_ref.item() == 1.0
    clean = _mixed_grads()
    clean[1][2, 7] = 1.0
    f = torch.zeros(())
    unscale_cpu(clean, f, inv_t)
    assert f.item() == 0.0
    clean[6][1, 1] = float("nan")  # in a non-contiguous grad: found by the reference fallback
    unscale_cpu(clean, f, inv_t)
    assert f.item() == 1.0


@needs_cpu_library
def test_cpu_kernel_isa_builds_agree():
    inv = torch.tensor(1 / 3, dtype=torch.float32)
    outs = []
    for isa in (0, 1, 2):
        with cpu_isa(isa):
            grads, f = _mixed_grads(), torch.zeros(())
            unscale_cpu(grads, f, inv)
            outs.append((grads, f.item()))
    for grads, f in outs[1:]:
        assert f == outs[0][1]
        assert all(_exact(a.contiguous(), b.contiguous()) for a, b in zip(grads, outs[0][0]))


@needs_cpu_library
def test_cpu_kernel_bits_do_not_depend_on_the_thread_count(outputs_by_thread_count):
    script = """
import hashlib, torch
from pyquant.backends.cpu.amp import unscale_ as unscale_cpu
g = torch.Generator().manual_seed(0)
grads = [torch.randn(n, generator=g).to(dt) * 1e4 for n, dt in
         ((300_001, torch.float32), (200_003, torch.float16), (150_000, torch.bfloat16), (70_000, torch.float64))]
grads[2][149_999] = float("nan")
f = torch.zeros(())
unscale_cpu(grads, f, torch.tensor(1 / 3, dtype=torch.float32))
h = hashlib.sha256()
for t in grads:
    h.update(t.view(torch.uint8).numpy().tobytes())
print(h.hexdigest(), f.item(), torch.get_num_threads())
"""
    lines = outputs_by_thread_count(script)
    assert len({line.rsplit(" ", 1)[0] for line in lines}) == 1, lines
    assert len(lines) >= 2  # really ran under different thread counts (torch caps them at the cores)
    assert all(" 1.0 " in line for line in lines)


# ---- the CUDA kernel (csrc/cuda) against the reference ----
@pytest.mark.gpu
@pytest.mark.parametrize("inv", [1.0, 2.0**-16, 1 / 3])
def test_unscale_kernel_is_the_cpu_rule_in_one_launch(cuda_backends, inv):
    """Mixed dtypes, chunk edges, specials: the CUDA kernel's gradients and flag equal the reference's."""
    unscale_reference, unscale_cuda = backends.kernels_of("reference")["unscale_"], cuda_backends[1]["unscale_"]
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


# ---- GradScaler against torch.amp.GradScaler, side by side ----
def _model(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _run(scaler_cls, model, make_opts, script, scaler_kwargs, dtype):
    """Run `script` (a list of dicts, one per iteration) and return everything observable."""
    scaler = scaler_cls("cpu", **scaler_kwargs)
    opts = make_opts(model)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(7)
    record = [("initial", scaler.get_scale(), scaler.state_dict())]
    for it, step in enumerate(script):
        x = torch.randn(5, 6, generator=g).to(dtype)
        y = torch.randn(5, 3, generator=g).to(dtype)
        for opt in opts:
            opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        scaler.scale(loss).backward()
        for index, flat, value in step.get("inject", ()):
            params[index].grad.view(-1)[flat] = value
        if step.get("unscale"):
            for opt in opts:
                scaler.unscale_(opt)
            record.append(("unscaled", it, [p.grad.clone() for p in params]))
            found = [{str(d): f.item() for d, f in scaler._found_inf_per_device(o).items()} for o in opts]
            record.append(("found", it, found))
        returns = [scaler.step(opt) for opt in opts]
        found = [sum(f.item() for f in scaler._found_inf_per_device(opt).values()) for opt in opts]
        record.append(("step", it, returns, found,
                       [p.detach().clone() for p in params], [p.grad.clone() for p in params]))
        scaler.update(step.get("new_scale"))
        record.append(("update", it, scaler._scale.clone(), scaler._growth_tracker.clone(), scaler.state_dict()))
        if "set_growth_interval" in step:
            scaler.set_growth_interval(step["set_growth_interval"])
    record.append(("optimizer", [opt.state_dict() for opt in opts]))
    return record


def _side_by_side(dtype, make_opts, script, **scaler_kwargs):
    model = _model(dtype)
    twin = copy.deepcopy(model)
    want = _run(torch.amp.GradScaler, model, make_opts, script, scaler_kwargs, dtype)
    got = _run(GradScaler, twin, make_opts, script, scaler_kwargs, dtype)
    assert_same_bits(got, want)
    return got


INF, NAN = float("inf"), float("nan")
# (param index, flat element, value): param 0 = first weight, 1 = first bias, 2 = second weight, 3 = second bias
SCRIPT = [
    {},
    {"inject": [(0, 3, INF)]},
    {"unscale": True},
    {"inject": [(3, 1, NAN)], "unscale": True},
    {"inject": [(2, 0, -INF), (1, 2, NAN)]},
    {},
    {"unscale": True},
    {},  # third clean step in a row: growth (interval 3)
    {"new_scale": 1000.0},
    {"inject": [(1, 0, INF)], "unscale": True},
    {"new_scale": torch.tensor(2834.866)},
    {},
    {"inject": [(0, 0, NAN)]},
    {},
    {},
    {"unscale": True},
]

OPTIMIZERS = {
    "sgd": lambda m: [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)],
    "adam": lambda m: [torch.optim.Adam(m.parameters(), lr=0.01)],
    "adamw_foreach": lambda m: [torch.optim.AdamW(m.parameters(), lr=0.01, foreach=True, weight_decay=0.1)],
    "two_optimizers": lambda m: [
        torch.optim.SGD(m[0].parameters(), lr=0.05),
        torch.optim.RMSprop(m[2].parameters(), lr=0.01),
    ],
    "param_groups": lambda m: [
        torch.optim.Adagrad([{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.2}])
    ],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_scripted_sequence_is_torchs(dtype, optimizer):
    record = _side_by_side(
        dtype, OPTIMIZERS[optimizer], SCRIPT, init_scale=2.0**10, growth_interval=3, backoff_factor=0.6
    )
    # the scenario did happen: backoff (float64 product rounded once), skipped steps, growth at the
    # interval, update(new_scale) leaving the tracker alone
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float64).float())  # noqa: E731
    s1 = f32(1024 * 0.6)
    s2 = f32(s1 * 0.6)
    s3 = f32(s2 * 0.6)
    s4 = f32(s3 * 2.0)
    s5 = f32(f32(2834.866) * 0.6)
    want = [(1024.0, 1), (s1, 0), (s1, 1), (s2, 0), (s3, 0), (s3, 1), (s3, 2), (s4, 0), (1000.0, 0), (600.0, 0),
            (f32(2834.866), 0), (f32(2834.866), 1), (s5, 0), (s5, 1), (s5, 2), (f32(s5 * 2), 0)]
    assert [(r[2].item(), r[3].item()) for r in record if r[0] == "update"] == want
    found = [r[3] for r in record if r[0] == "step"]
    skipped = [0, 1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0]  # iterations with an inf/NaN injected
    if optimizer == "two_optimizers":  # params 0, 1 belong to the first optimizer, 2, 3 to the second
        assert found == [[float(s and i not in (3,)), float(i in (3, 4))] for i, s in enumerate(skipped)]
    else:
        assert found == [[float(s)] for s in skipped]


def test_fused_optimizers_are_torchs():
    # torch's fused Adam/SGD unscale and skip inside their kernel: the scaler hands them grad_scale/found_inf.
    script = [{}, {"inject": [(0, 1, INF)]}, {"unscale": True}, {}, {"inject": [(3, 0, NAN)], "unscale": True}, {}]
    for make in (
        lambda m: [torch.optim.Adam(m.parameters(), lr=0.01, fused=True)],
        lambda m: [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, fused=True), ],
    ):
        for dtype in (torch.float32, torch.bfloat16):
            _side_by_side(dtype, make, script, init_scale=3000.0, backoff_factor=0.6, growth_interval=2)


def test_growth_exactly_at_the_interval_and_never_to_inf():
    clean = [{}] * 7
    rec = _side_by_side(torch.float32, OPTIMIZERS["sgd"], clean, init_scale=3.0, growth_interval=3, growth_factor=1.7)
    trace = [(r[2].item(), r[3].item()) for r in rec if r[0] == "update"]
    s1 = float(torch.tensor(3.0 * 1.7, dtype=torch.float64).float())
    s2 = float(torch.tensor(s1 * 1.7, dtype=torch.float64).float())
    assert trace == [(3.0, 1), (3.0, 2), (s1, 0), (s1, 1), (s1, 2), (s2, 0), (s2, 1)]
    # near float32's top the grown scale would be inf: it stays, the tracker restarts
    rec = _side_by_side(torch.float32, OPTIMIZERS["sgd"], [{}, {}], init_scale=2.0**127, growth_interval=1)
    assert [(r[2].item(), r[3].item()) for r in rec if r[0] == "update"] == [(2.0**127, 0)] * 2


def test_lowering_the_interval_below_the_tracker_stops_growth_as_torch():
    script = [{}, {}, {"set_growth_interval": 1}, {}, {}]
    rec = _side_by_side(torch.float32, OPTIMIZERS["sgd"], script, init_scale=8.0, growth_interval=5)
    assert [r[3].item() for r in rec if r[0] == "update"] == [1, 2, 3, 4, 5]
    assert rec[-2][2].item() == 8.0


def test_backoff_rounds_once_from_double():
    # 2834.866 * 0.6 in double, rounded once: 1700.9195556640625 (float32 arithmetic gives 1700.919677734375)
    script = [{"inject": [(0, 0, INF)]}]
    rec = _side_by_side(torch.float32, OPTIMIZERS["sgd"], script, init_scale=2834.866, backoff_factor=0.6)
    assert rec[-2][2].item() == 1700.9195556640625


def test_sparse_gradients_are_torchs():
    def run(cls):
        torch.manual_seed(0)
        emb = nn.Embedding(10, 4, sparse=True)
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        scaler = cls("cpu", init_scale=256.0)
        out = []
        for it in range(3):
            opt.zero_grad()
            loss = emb(torch.tensor([1, 3, 3, 7])).pow(2).sum()
            scaler.scale(loss).backward()
            if it == 1:
                emb.weight.grad._values()[0, 0] = float("inf")
            scaler.unscale_(opt)
            out.append(emb.weight.grad.coalesce().to_dense().clone())
            scaler.step(opt)
            scaler.update()
            out += [emb.weight.detach().clone(), scaler.get_scale()]
        return out

    assert_same_bits(run(GradScaler), run(torch.amp.GradScaler))


def test_scale_of_tensors_lists_tuples_and_iterables_is_torchs():
    outputs = [
        torch.tensor([1.5, -2.0]),
        (torch.tensor(3.0, dtype=torch.float16), [torch.ones(2, 2, dtype=torch.bfloat16)]),
    ]
    ours, theirs = GradScaler("cpu", init_scale=3.0), torch.amp.GradScaler("cpu", init_scale=3.0)
    assert_same_bits(ours.scale(outputs), theirs.scale(outputs))
    assert_same_bits(ours.scale(torch.ones(3, dtype=torch.float16)), theirs.scale(torch.ones(3, dtype=torch.float16)))
    assert_same_bits(list(ours.scale(iter([torch.ones(2)]))), list(theirs.scale(iter([torch.ones(2)]))))
    with pytest.raises(ValueError, match="Tensor or an iterable"):
        ours.scale([torch.ones(1), 3.0])


# ---- state dicts and pickling ----
def _drive(scaler, n, inf_at=()):
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    for i in range(n):
        opt.zero_grad()
        scaler.scale(p.sum()).backward()
        if i in inf_at:
            p.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return scaler


@pytest.mark.parametrize("source,target", [(torch.amp.GradScaler, GradScaler), (GradScaler, torch.amp.GradScaler)])
def test_state_dicts_load_across(source, target):
    kw = dict(init_scale=512.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=4)
    sd = _drive(source("cpu", **kw), 7, inf_at=(1,)).state_dict()
    assert sd == {
        "scale": 384.0, "growth_factor": 3.0, "backoff_factor": 0.25, "growth_interval": 4, "_growth_tracker": 1
    }
    fresh, used = target("cpu"), _drive(target("cpu"), 1)  # loaded before and after the lazy init
    for t in (fresh, used):
        t.load_state_dict(sd)
        assert t.state_dict() == sd
    ref = source("cpu")
    ref.load_state_dict(sd)
    for t in (fresh, used, ref):
        _drive(t, 4, inf_at=(3,))
    assert fresh.state_dict() == used.state_dict() == ref.state_dict()


def test_pickling_rules_are_torchs():
    ours = _drive(GradScaler("cpu", init_scale=64.0, growth_interval=2), 3)
    copy_ = pickle.loads(pickle.dumps(ours))
    assert copy_._scale is None and copy_.state_dict() == ours.state_dict()
    assert _drive(copy_, 3).state_dict() == _drive(ours, 3).state_dict()
    # mid-iteration: refused, as torch
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    ours.scale(p.sum()).backward()
    ours.unscale_(opt)
    with pytest.raises(RuntimeError, match="only be pickled"):
        pickle.dumps(ours)
    ours.step(opt)
    ours.update()
    pickle.dumps(ours)
    # torch.save of the state dict: plain Python numbers, as torch's
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    theirs = torch.amp.GradScaler("cpu")
    theirs.load_state_dict(torch.load(buf))
    assert theirs.state_dict() == ours.state_dict()


def test_getters_setters_and_disabled():
    s, t = GradScaler("cpu"), torch.amp.GradScaler("cpu")
    getters = ("get_scale", "get_growth_factor", "get_backoff_factor", "get_growth_interval", "is_enabled")
    for name in (*getters, "_get_growth_tracker"):
        assert getattr(s, name)() == getattr(t, name)(), name
    s.set_growth_factor(4.0)
    s.set_backoff_factor(0.125)
    s.set_growth_interval(7)
    assert (s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval()) == (4.0, 0.125, 7)
    off = GradScaler("cpu", enabled=False)
    x = torch.ones(2)
    assert off.scale(x) is x and off.get_scale() == 1.0 and off.state_dict() == {} and not off.is_enabled()
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), float("inf"))
    opt = torch.optim.SGD([p], lr=1.0)
    off.unscale_(opt)
    off.step(opt)  # a plain optimizer step, inf and all
    off.update()
    off.load_state_dict({})
    assert torch.isinf(p).all()
    assert pickle.loads(pickle.dumps(off)).is_enabled() is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_scaler_without_cuda_disables_itself_with_a_warning():
    with pytest.warns(UserWarning, match="CUDA is not available"):
        s = GradScaler()
    assert not s.is_enabled()


# ---- errors ----
def test_clear_errors():
    for kw, match in (
        ({"growth_factor": 1.0}, "growth_factor must be > 1.0"),
        ({"growth_factor": 0.5}, "growth_factor"),
        ({"backoff_factor": 1.0}, "backoff_factor must be in"),
        ({"backoff_factor": 2.0}, "backoff_factor"),
        ({"growth_interval": 0}, "growth_interval must be a positive int"),
        ({"growth_interval": -3}, "growth_interval"),
        ({"growth_interval": 2.5}, "growth_interval"),
        ({"growth_interval": True}, "growth_interval"),
    ):
        with pytest.raises(ValueError, match=match):
            GradScaler("cpu", **kw)
    s = GradScaler("cpu")
    with pytest.raises(ValueError, match="growth_factor"):
        s.set_growth_factor(1.0)
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(RuntimeError, match="before any scale"):
        s.step(opt)
    s.scale(p.sum()).backward()
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        s.step(opt, closure=lambda: 0.0)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        s.step(opt, lambda: 0.0)
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        s.unscale_(opt)
    s.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        s.unscale_(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        s.step(opt)
    with pytest.raises(ValueError, match="new_scale"):
        s.update(torch.ones(2))
    with pytest.raises(TypeError, match="new_scale"):
        s.update("2")
    s.update()
    with pytest.raises(RuntimeError, match="no inf checks"):
        s.update()
    q = torch.ones(2, dtype=torch.int64)
    q.grad = torch.ones(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="torch.int64 gradient"):
        s.unscale_(torch.optim.SGD([q], lr=0.1))
    with pytest.raises(RuntimeError, match="no gradients"):
        s.step(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1))
    with pytest.raises(RuntimeError, match="empty"):
        s.load_state_dict({})


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), 1e-50, 1e39, "1", True])
def test_a_scale_that_would_skip_every_step_or_make_nan_is_refused(scale):
    """torch accepts these (every later step is then skipped, or the weights go NaN); pyquant refuses them in
    __init__ and load_state_dict, leaving a scaler that refuses a state dict as it was."""
    with pytest.raises(ValueError, match="init_scale must be a finite positive number"):
        GradScaler("cpu", init_scale=scale)
    s = _drive(GradScaler("cpu", init_scale=64.0, growth_interval=2), 3)
    before = s.state_dict()
    with pytest.raises(ValueError, match="the state dict's scale must be a finite positive number"):
        s.load_state_dict({**before, "scale": scale, "growth_factor": 4.0})
    assert s.state_dict() == before and s.get_growth_factor() == 2.0
    with pytest.raises(KeyError, match="lacks _growth_tracker"):
        s.load_state_dict({k: v for k, v in before.items() if k != "_growth_tracker"})


def test_warns_once_when_the_scale_underflows_to_zero():
    """A run whose gradients are inf/NaN at every scale backs the scale off to 0 (as torch does); from then on
    every step is skipped, which used to happen without a word."""
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0**-140, backoff_factor=0.5)

    def iteration():
        scaler.scale((p * float("inf")).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(8):  # 2^-140 halves to 2^-148, still a float32 (subnormal): no warning yet
            iteration()
    assert scaler.get_scale() == 2.0**-148
    with pytest.warns(RuntimeWarning, match="underflowed to 0") as caught:
        for _ in range(4):
            iteration()
    assert scaler.get_scale() == 0.0 and len([w for w in caught if "underflowed" in str(w.message)]) == 1


# ---- beyond torch: float16 gradients ----
def test_float16_gradients_torch_refuses_pyquant_unscales():
    def grads():
        p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float16))
        p.grad = torch.tensor([1024.0, -3.0, 60000.0], dtype=torch.float16)
        return p, torch.optim.SGD([p], lr=0.5)

    p, opt = grads()
    theirs = torch.amp.GradScaler("cpu", init_scale=1024.0)
    theirs.scale(torch.ones(()))
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        theirs.step(opt)
    p, opt = grads()
    ours = GradScaler("cpu", init_scale=1024.0)
    ours.scale(torch.ones(()))
    ours.unscale_(opt)
    inv = torch.tensor(1 / 1024, dtype=torch.float32)
    want = (torch.tensor([1024.0, -3.0, 60000.0], dtype=torch.float16).float() * inv).half()
    assert torch.equal(p.grad.view(torch.int16), want.view(torch.int16))
    ours.step(opt)
    ours.update()
    assert torch.equal(p.detach(), (torch.tensor([1.0, -2.0, 3.0], dtype=torch.float16) - 0.5 * want))


def test_float16_overflow_skips_the_step_and_halves_the_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x = torch.randn(16, 4).half()
    before = [p.detach().clone() for p in model.parameters()]

    def iteration(multiplier):
        opt.zero_grad()
        loss = model(x).float().pow(2).mean() * multiplier
        scaler.scale(loss).backward()
        result = scaler.step(opt)
        scaler.update()
        return result

    iteration(1e6)  # loss * 1024 * 1e6: float16 gradients overflow to inf
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))  # step skipped
    assert scaler.get_scale() == 2.0**9 and scaler._get_growth_tracker() == 0
    iteration(1.0)  # a clean step: the update happens
    assert not all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**9 and scaler._get_growth_tracker() == 1


def _fp16_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.sin(3 * x[:, :1])
    return x.half(), y.half()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=3e-3, eps=1e-4),  # eps representable in float16
], ids=["sgd", "adam"])
def test_pure_float16_mlp_trains_with_dynamic_loss_scaling(make_opt):
    torch.manual_seed(0)
    x, y = _fp16_task()
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).half()
    assert all(p.dtype == torch.float16 for p in model.parameters())
    opt = make_opt(model.parameters())
    scaler = GradScaler("cpu", growth_interval=20)  # default init_scale 2**16
    losses, found = [], []
    for step in range(150):
        batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
        opt.zero_grad()
        loss = (model(x[batch]) - y[batch]).pow(2).mean()  # a float16 loss
        assert loss.dtype == torch.float16
        scaler.scale(loss).backward()
        scaler.step(opt)
        found.append(scaler._found_inf_per_device(opt)[torch.device("cpu")].item())
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    # The scale calibrated: 2**16 itself is not a float16 (max 65504), so the gradient of the float16 loss
    # (scaled in float32, cast back by autograd) is inf at the first step, which is skipped.
    assert found[0] == 1.0 and sum(found) < 10
