"""Nothing silently wrong (issue 17, items 1-8): what the optimizers and the quantisation ops refuse, and the
fuzzing of the C entry points. Cases that corrupted memory before run in a subprocess, so that a crash
fails the test instead of killing pytest."""

import copy
import ctypes
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pyquant
from pyquant import backends
from pyquant import functional as F

from conftest import CPU_BACKENDS, same_bits

HERE = Path(__file__).parent


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, OMP_NUM_THREADS="2"))


def stepped(opt, params, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
    opt.step()


# ---- 1. a parameter resized after its first step ----
def test_a_parameter_grown_after_its_first_step_is_refused_not_written_past():
    result = run_python(
        "import torch, pyquant\n"
        "p = torch.nn.Parameter(torch.zeros(4096)); p.grad = torch.ones(4096)\n"
        "opt = pyquant.Adam8bit([p]); opt.step()\n"
        "p.data = torch.zeros(1 << 20); p.grad = torch.ones(1 << 20)\n"
        "try:\n"
        "    opt.step()\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
        "print('states', opt.state[p]['state1'].numel(), opt.state[p]['absmax1'].numel(), int(p.abs().sum()))\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: Adam8bit: state 'state1' of parameter 0 has 4096 elements" in result.stdout
    assert "the parameter changed size after its first step" in result.stdout
    assert "states 4096 16 0" in result.stdout  # nothing was stepped


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_parameter_shrunk_or_reshaped_after_its_first_step_is_refused(backend):
    p = nn.Parameter(torch.randn(64, 80))
    with pyquant.use_backend(backend):
        opt = pyquant.Adam8bit([p])
        stepped(opt, [p])
        state = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        for data in (torch.randn(4000), torch.randn(80, 64)):
            p.data = data
            with pytest.raises(RuntimeError, match=r"state 'state1' of parameter 0 .* changed size after its first step"):
                stepped(opt, [p])
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items()) and opt.state[p]["step"] == 1


def test_a_parameter_moved_after_its_first_step_is_refused():
    p = nn.Parameter(torch.randn(5000))
    opt = pyquant.Adam8bit([p])
    stepped(opt, [p])
    for key in ("state1", "state2", "absmax1", "absmax2"):  # as if the parameter had left the states' device
        opt.state[p][key] = opt.state[p][key].to("meta")
    with pytest.raises(RuntimeError, match="state 'state1' of parameter 0 is on meta but the parameter is on cpu"):
        stepped(opt, [p])


# ---- 2. blocksize ----
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("blocksize", [2**62, 2**63 - 1])
def test_a_huge_blocksize_is_one_block(backend, blocksize):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    with pyquant.use_backend(backend):
        q, absmax = F.quantize_blockwise(x, blocksize=blocksize)
        q1, absmax1 = F.quantize_blockwise(x, blocksize=1000)
        out = F.dequantize_blockwise(q, absmax, blocksize=blocksize)
        assert same_bits(out, F.dequantize_blockwise(q1, absmax1, blocksize=1000))
    assert absmax.shape == (1,) and absmax[0] == x.abs().max() and same_bits(q, q1)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the CPU library is not built")
def test_the_cpu_binding_computes_huge_blocksizes_without_overflow():
    from pyquant.backends.cpu import blockwise as _cpu

    x, code = torch.randn(300), F.create_dynamic_map(True)
    q, absmax = _cpu.quantize_blockwise(x, code, 2**63 - 1)  # not clamped: the C arithmetic itself
    assert absmax.tolist() == [x.abs().max().item()]
    out = _cpu.dequantize_blockwise(q, absmax, code, 2**63 - 1, torch.float32)
    assert same_bits(out, F.dequantize_blockwise(*F.quantize_blockwise(x, blocksize=300), blocksize=300))


@pytest.mark.parametrize("blocksize", [2**63, 2**64, -(2**63)])
def test_a_blocksize_outside_int64_is_refused_clearly(blocksize):
    with pytest.raises(ValueError, match=r"blocksize must be a positive int below 2\*\*63"):
        F.quantize_blockwise(torch.randn(10), blocksize=blocksize)
    with pytest.raises(ValueError, match=r"blocksize must be a positive int below 2\*\*63"):
        F.dequantize_blockwise(torch.zeros(10, dtype=torch.uint8), torch.ones(1), blocksize=blocksize)


# ---- 3. copies, pickles and torch.save of the optimizer ----
def _copy_by(how, opt):
    if how == "deepcopy":
        return copy.deepcopy(opt)
    if how == "pickle":
        return pickle.loads(pickle.dumps(opt))
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_keeps_its_options_and_steps_as_the_original(how):
    params = [nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in (300, 5000)]
    opt = pyquant.AdamW8bit(params, lr=1e-2, min_8bit_size=256, master_weights=True, nonfinite="propagate")
    stepped(opt, params)
    twin = _copy_by(how, opt)
    assert (twin.min_8bit_size, twin.master_weights, twin.nonfinite) == (256, True, "propagate")
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for step in range(1, 3):
        stepped(opt, params, seed=step)
        stepped(twin, twin_params, seed=step)
    for a, b in zip(params, twin_params):
        assert same_bits(a, b)
        assert all(same_bits(opt.state[a][k], twin.state[b][k]) for k in ("state1", "state2", "absmax1", "master"))


# ---- 4. the same parameter listed twice ----
def test_a_parameter_listed_twice_is_refused():
    p, q = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="parameter 2 of the group is listed twice"):
        pyquant.Adam8bit([p, q, p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        pyquant.Adam8bit([{"params": [p]}, {"params": [q, p]}])
    opt = pyquant.Adam8bit([q])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [q]})
    with pytest.raises(ValueError, match="listed twice"):
        opt.add_param_group({"params": (x for x in (p, p))})
    assert len(opt.param_groups) == 1


# ---- 5. load_state_dict checks what it loads ----
def _trained():
    p = nn.Parameter(torch.randn(5000))
    opt = pyquant.Adam8bit([p])
    stepped(opt, [p])
    return p, opt


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd["state"][0]["__bnb_optimizer_quant_state__"]["absmax1"].__setitem__(3, float("nan")),
         "absmax1 has 1 NaN or negative entries"),
        (lambda sd: sd["state"][0]["__bnb_optimizer_quant_state__"]["absmax2"].__setitem__(0, -1.0),
         "absmax2 has 1 NaN or negative entries"),
        (lambda sd: sd["param_groups"][0].__setitem__("lr", float("nan")), "invalid learning rate nan"),
        (lambda sd: sd["param_groups"][0].__setitem__("betas", (0.9, 1.0)), "invalid betas"),
        (lambda sd: sd["param_groups"][0].__setitem__("eps", -1e-8), "invalid epsilon"),
    ],
)
def test_a_corrupt_state_dict_is_refused_and_nothing_changes(corrupt, message):
    p, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["__bnb_optimizer_quant_state__"]["absmax1"],
                       before["state"][0]["__bnb_optimizer_quant_state__"]["absmax1"])


def test_nan_or_negative_float32_moments_are_refused_under_skip():
    p = nn.Parameter(torch.randn(100))  # below min_8bit_size: float32 moments
    opt = pyquant.Adam8bit([p])
    stepped(opt, [p])
    sd = copy.deepcopy(opt.state_dict())
    moments = sd["state"][0]["__bnb_optimizer_quant_state__"]
    moments["state1"][5] = float("nan")
    with pytest.raises(ValueError, match="state1 has 1 NaN entries"):
        opt.load_state_dict(sd)
    moments["state1"][5] = 0.0
    moments["state2"][7] = -1.0
    with pytest.raises(ValueError, match="state2 has 1 negative entries"):
        opt.load_state_dict(sd)
    moments["state2"][7] = float("nan")  # bitsandbytes' behaviour under "propagate": NaN moments load
    pyquant.Adam8bit([p], nonfinite="propagate").load_state_dict(sd)


def test_a_torch_state_dict_of_another_model_is_refused():
    mine = nn.Linear(4, 3)
    other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    torch_opt = torch.optim.Adam(other.parameters())
    other(torch.randn(2, 4)).sum().backward()
    torch_opt.step()
    opt = pyquant.Adam8bit(mine.parameters())
    with pytest.raises(ValueError, match="parameter group 0 has 2 parameters but the loaded one has 4"):
        opt.load_torch_state_dict(torch_opt.state_dict())
    swapped = torch.optim.Adam([mine.bias, mine.weight])  # same count, other shapes
    mine(torch.randn(2, 4)).sum().backward()
    swapped.step()
    with pytest.raises(ValueError, match=r"exp_avg has shape \(3,\) but the parameter has shape \(3, 4\)"):
        opt.load_torch_state_dict(swapped.state_dict())


# ---- 6. add_param_group applies the constructor's checks ----
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(betas=(0.9, 1.5)), "invalid betas"),
        (dict(betas=(1.0, 0.999)), "invalid betas"),
        (dict(lr=-1), "invalid learning rate"),
        (dict(lr=float("nan")), "invalid learning rate"),
        (dict(weight_decay=-0.1), "invalid weight_decay"),
        (dict(amsgrad=True), "does not support amsgrad"),
    ],
)
def test_add_param_group_refuses_what_the_constructor_refuses(options, message):
    opt = pyquant.Adam8bit([nn.Parameter(torch.randn(10))])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group(dict(params=[nn.Parameter(torch.randn(10))], **options))
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=message):
        pyquant.Adam8bit([nn.Parameter(torch.randn(10))], **options)


# ---- 7. non-contiguous parameters are updated in place ----
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("master_weights", [False, True])
def test_a_view_into_a_larger_tensor_is_updated_in_place(backend, master_weights):
    dtype = torch.bfloat16 if master_weights else torch.float32
    big = torch.randn(96, 128).to(dtype)
    original = big.clone()
    view = nn.Parameter(big[:, 3:103])  # a Parameter sharing big's storage, as torch.optim.Adam would update it
    dense = nn.Parameter(big[:, 3:103].clone())
    with pyquant.use_backend(backend):
        opts = [pyquant.Adam8bit([p], master_weights=master_weights) for p in (view, dense)]
        for step in range(3):
            for opt, p in zip(opts, (view, dense)):
                stepped(opt, [p], seed=step)
    assert view.data_ptr() == big[:, 3:].data_ptr() and view.stride() == (128, 1)
    assert same_bits(big[:, 3:103], dense.detach()) and not torch.equal(big[:, 3:103], original[:, 3:103])
    assert torch.equal(big[:, :3], original[:, :3]) and torch.equal(big[:, 103:], original[:, 103:])


def test_a_channels_last_weight_keeps_its_layout_and_address():
    conv = nn.Conv2d(16, 32, 3).to(memory_format=torch.channels_last)
    dense = nn.Parameter(conv.weight.detach().contiguous())
    address = conv.weight.data_ptr()
    opts = [pyquant.Adam8bit([p]) for p in (conv.weight, dense)]
    for step in range(2):
        for opt, p in zip(opts, (conv.weight, dense)):
            stepped(opt, [p], seed=step)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.data_ptr() == address
    assert same_bits(conv.weight.detach().contiguous(), dense.detach())


# ---- 8. torch.compile and meta tensors ----
def test_torch_compile_of_the_first_step_gives_the_eager_bits():
    # A fresh process: the first step creates the optimizer's code maps, the first ones of the process.
    result = run_python(
        "import torch, pyquant\n"
        "torch.manual_seed(0)\n"
        "models = [torch.nn.Linear(100, 100) for _ in range(2)]\n"
        "models[1].load_state_dict(models[0].state_dict())\n"
        "opts = [pyquant.Adam8bit(m.parameters()) for m in models]\n"
        "steps = [torch.compile(opts[0].step), opts[1].step]\n"
        "x = torch.randn(8, 100)\n"
        "for _ in range(2):\n"
        "    for m, step in zip(models, steps):\n"
        "        m.zero_grad(); m(x).square().sum().backward(); step()\n"
        "same = all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))\n"
        "print('same', same, opts[0].state[models[0].weight]['step'])\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "same True 2"


def test_quantize_blockwise_on_meta_tensors_gives_shapes():
    x = torch.empty(1000, 3, device="meta")
    q, absmax = F.quantize_blockwise(x, blocksize=256)
    assert (q.device.type, q.dtype, q.shape, absmax.shape) == ("meta", torch.uint8, (1000, 3), (12,))
    out = F.dequantize_blockwise(q, absmax, blocksize=256, dtype=torch.bfloat16)
    assert (out.device.type, out.dtype, out.shape) == ("meta", torch.bfloat16, (1000, 3))


def test_quantize_blockwise_compiles_with_fullgraph():
    def roundtrip(x):
        q, absmax = F.quantize_blockwise(x, blocksize=128)
        return F.dequantize_blockwise(q, absmax, blocksize=128)

    x = torch.randn(1000)
    assert same_bits(torch.compile(roundtrip, fullgraph=True)(x), roundtrip(x))


# ---- the prepared steps and the kernels' arguments (bugs the fuzzer found) ----
@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the CPU library is not built")
def test_a_prepared_step_refuses_fewer_or_more_tensors_than_it_describes():
    # It zipped the call's tensors with its descriptors, then broadcast the one gradient pointer of a shorter list to
    # every descriptor: the 100000-element tensor read its gradient from a 4-element one. A subprocess: that read
    # could crash.
    result = run_python(
        "import torch\n"
        "from pyquant import functional as F\n"
        "from pyquant._contract import adam_constants\n"
        "n = [4, 100000]\n"
        "p, g, s1, s2 = ([torch.ones(k) for k in n] for _ in range(4))\n"
        "rows = [adam_constants(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), 1, False)] * 2\n"
        "step = F.prepare_adam_step(p, g, s1, s2, [torch.zeros(0)] * 2, [torch.zeros(0)] * 2, torch.tensor(rows),\n"
        "                           F.create_dynamic_map(True), F.create_dynamic_map(False))\n"
        "print('fewer', step(p[:1], g[:1], rows[:1], None, 0), 'more', step(p + p[:1], g + g[:1], rows[:1], None, 0),\n"
        "      'untouched', all(bool((t == 1).all()) for t in p + s1 + s2))\n"
        "print('valid', int(step(p, g, rows[:1], None, 0)), bool((p[1] < 1).all()))\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["fewer None more None untouched True", "valid 0 True"]


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the CPU library is not built")
def test_a_prepared_step_refuses_a_parameter_of_another_dtype_bad_constants_and_policies():
    from pyquant._contract import ONE_STATE_FIELDS, one_state_constants

    p, g = torch.ones(300, dtype=torch.float16), torch.ones(300)
    row = one_state_constants(dict(lr=0.1, betas=(0.9, 0.0), eps=1e-8, weight_decay=0.0), 1, False)
    step = F.prepare_one_state_step([p], [g], [torch.zeros(300)], [torch.zeros(0)], torch.tensor([row]),
                                    F.create_dynamic_map(True), 0)
    # the same memory read as bfloat16: the descriptor says float16 (the optimizer checked this, the step did not)
    assert step([p.view(torch.bfloat16)], [g], [row], None, 0) is None
    with pytest.raises(ValueError, match=f"rows of {len(ONE_STATE_FIELDS)} values .* got rows of shape .1, 13."):
        step([p], [g], [row + [0.0]], None, 0)
    with pytest.raises(ValueError, match=r"one row index per tensor \(1\), got .* and 2 indices"):
        step([p], [g], [row], [0, 0], 0)
    for nonfinite in (2**32, 1.0):  # ctypes made 2**32 a 0 (skip); 1.0 was its ArgumentError, not ValueError
        with pytest.raises(ValueError, match="nonfinite must be 0 .skip. or 1 .propagate., got"):
            step([p], [g], [row], None, nonfinite)
    assert torch.equal(p, torch.ones(300, dtype=torch.float16))
    assert int(step([p], [g], [row], None, 0)) == 0 and torch.equal(p, torch.full((300,), 0.9, dtype=torch.float16))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the CPU library is not built")
def test_write_field_writes_the_chosen_rows_and_refuses_fields_and_rows_it_would_overrun():
    # PreparedStep writes the descriptors' gradient pointers, dtypes and constants through it (4 records of 16 bytes,
    # a field of 8 bytes at offset 4 here).
    import array

    from pyquant.backends.capi import cpu_library

    lib = cpu_library()
    records = bytearray(64)
    address = ctypes.addressof(ctypes.c_char.from_buffer(records))
    rows = array.array("q", [11, 22, 33, 44])
    row_of = array.array("i", [3, 0, 0, 1])

    def write(offset=4, width=8, count=4, row_count=4, indices=row_of, data=rows):
        return lib.pq_write_field(address, count, 16, offset, width, data.buffer_info()[0], row_count,
                                  None if indices is None else indices.buffer_info()[0])

    def field(i):
        return int.from_bytes(records[16 * i + 4:16 * i + 12], "little")

    assert write() == 0 and [field(i) for i in range(4)] == [44, 11, 11, 22]
    assert write(indices=None) == 0 and [field(i) for i in range(4)] == [11, 22, 33, 44]
    assert write(row_count=1, indices=None) == 0 and [field(i) for i in range(4)] == [11] * 4
    assert records[:4] == bytes(4) and all(records[16 * i + 12:16 * i + 20] == bytes(8) for i in range(3))
    before = bytes(records)
    refused = dict(past_the_record=write(offset=9), wider_than_the_record=write(offset=0, width=17),
                   negative_offset=write(offset=-1),
                   row_index_past_the_rows=write(indices=array.array("i", [0, 0, 0, 4])),
                   negative_row_index=write(indices=array.array("i", [0, -1, 0, 0])),
                   rows_neither_one_nor_count=write(row_count=2, indices=None), no_rows=write(row_count=0),
                   negative_count=write(count=-1))
    assert refused == dict.fromkeys(refused, 2) and bytes(records) == before  # PQ_INVALID_ARGUMENT, nothing written


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the CPU library is not built")
@pytest.mark.parametrize("op", ["adam_step", "one_state_step", "ademamix_step", "adam4bit_step", "lars_norms"])
def test_a_float_nonfinite_policy_is_refused_by_the_binding(op):
    args = dict(adam_step=([],) * 6 + (torch.zeros(0, 12), None, None), one_state_step=([],) * 4 + (None, None, 0),
                ademamix_step=([],) * 6 + (None, None, None), adam4bit_step=([],) * 6 + (None, None, None, []),
                lars_norms=([], [], None))[op]
    with pytest.raises(ValueError, match=f"{op}: nonfinite must be 0 .skip. or 1 .propagate., got 1.0"):
        backends.kernels_of("cpu")[op](*args, 1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_empty_matrix_keeps_rank1_scales(backend):
    # Its rank-1 layout has a dimension of 0 (an FSDP2 rank's empty shard of a matrix): the C entry point refused it
    # ("invalid arguments (status 2)") and the reference failed taking a max over it. It keeps its 5 column maxima.
    empty, full = nn.Parameter(torch.zeros(0, 5)), nn.Parameter(torch.randn(3, 4))
    with pyquant.use_backend(backend):
        opt = pyquant.Adam4bit([empty, full], min_4bit_size=0)
        stepped(opt, [empty, full])
    assert opt.state[empty]["rank1"] is True and opt.state[empty]["absmax2"].shape == (5,)
    assert opt.state[full]["rank1"] is True and opt.state[full]["step"] == 1
    from pyquant.backends.capi import check_adam4bit_operands

    packed = [torch.zeros(0, dtype=torch.uint8)]
    check_adam4bit_operands([empty.detach()], [empty.grad], packed, packed, [torch.zeros(0)], [torch.zeros(5)],
                            torch.zeros(1, 12), F.create_4bit_map(True), F.create_4bit_map(False), [True], 0)
    with pytest.raises(ValueError, match=r"absmax2 0 has 0 elements, expected 5"):
        check_adam4bit_operands([empty.detach()], [empty.grad], packed, packed, [torch.zeros(0)], [torch.zeros(0)],
                                torch.zeros(1, 12), F.create_4bit_map(True), F.create_4bit_map(False), [True], 0)


# ---- the C entry points, fuzzed ----
@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the CPU library is not built")
def test_fuzzed_calls_into_the_c_library_are_refused_cleanly():
    result = subprocess.run([sys.executable, "-X", "faulthandler", str(HERE / "fuzz_native.py"), "200"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert result.stdout.strip().splitlines()[-1].startswith("ok ")


# ---- the same on the GPU (the CUDA library's bindings and kernels) ----
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not backends.available("cuda", "cuda"), reason="needs a CUDA device and the CUDA library"
)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bindings_refuse_mismatched_operands_and_huge_blocksizes():
    from pyquant.backends.cuda import blockwise as _cuda
    from pyquant.backends.cuda.optimizer import adam_step

    x, code = torch.randn(1000, device="cuda"), F.create_dynamic_map(True).cuda()
    q, absmax = _cuda.quantize_blockwise(x, code, 2**63 - 1)  # one block: no overflow of the block count
    assert absmax.tolist() == [x.abs().max().item()]
    assert same_bits(_cuda.dequantize_blockwise(q, absmax, code, 2**63 - 1, torch.float32).cpu(),
                     F.dequantize_blockwise(q.cpu(), absmax.cpu(), blocksize=1000))
    with pytest.raises(ValueError, match="absmax has 2 elements, expected 1"):
        _cuda.dequantize_blockwise(q, torch.ones(2, device="cuda"), code, 2**63 - 1, torch.float32)
    with pytest.raises(ValueError, match="x is on cpu, expected cuda"):
        _cuda.quantize_blockwise(x.cpu(), code, 256)
    p = nn.Parameter(torch.randn(5000, device="cuda"))
    opt = pyquant.Adam8bit([p])
    stepped(opt, [p])
    p.data = torch.zeros(1 << 20, device="cuda")
    with pytest.raises(RuntimeError, match="changed size after its first step"):
        stepped(opt, [p])
    s = opt.state[p]
    args = ([p], [torch.zeros_like(p)], [s["state1"]], [s["state2"]], [s["absmax1"]], [s["absmax2"]],
            torch.zeros(1, 10), *opt._codes_on(p.device), 0)
    with pytest.raises(ValueError, match="state1 0 has 5000 elements, expected 1048576"):
        adam_step(*args)


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_view_parameter_is_updated_in_place():
    big = torch.randn(96, 128, device="cuda")
    original = big.clone()
    view, dense = nn.Parameter(big[:, 3:103]), nn.Parameter(big[:, 3:103].clone())
    opts = [pyquant.Adam8bit([p]) for p in (view, dense)]
    for step in range(3):
        for opt, p in zip(opts, (view, dense)):
            stepped(opt, [p], seed=step)
    assert view.data_ptr() == big[:, 3:].data_ptr()
    assert same_bits(big[:, 3:103], dense.detach()) and torch.equal(big[:, :3], original[:, :3])
