"""Fuzz the calls into the C++ CPU library with mismatched operands (run as a script, in its own process).

tests/test_safety.py runs it in a subprocess, so that a crash fails that test instead of killing pytest;
.ci/asan.sh runs it against a library built with AddressSanitizer. Each case breaks one thing in an
otherwise valid call (a size, a dtype, a stride, a device, a block count, a list length, a constants row, a rank-1
flag, a C argument; also the half-precision matmul's bias and inner sizes) and must end in a TypeError or
ValueError from the Python binding, or in PQ_INVALID_ARGUMENT from the C entry point: never a write outside a
tensor. Every optimizer kernel is fuzzed (adam_step, lamb_norms, lars_norms, one_state_step, ademamix_step,
adam4bit_step), and so are their prepared steps (PreparedStep), whose refusal of tensors that no longer fit is to
return None with nothing written. Valid calls of each optimizer kernel with random sizes must succeed and give the
reference backend's bits, so that the refusals are not all that is tested.
Usage: python tests/fuzz_native.py [cases]; prints "ok <count>".
"""

from __future__ import annotations

import ctypes
import random
import sys

import torch

from pyquant import backends
from pyquant import functional as F
from pyquant._contract import (
    ADEMAMIX_FIELDS, CONSTANT_FIELDS, DTYPE_CODES, FOURBIT_BLOCK, ONE_STATE_FIELDS, ONE_STATE_RULES, RANK1_MAX_DIMS,
    adam_constants, ademamix_constants, blocks_of, one_state_constants,
)
from pyquant.backends import capi
from pyquant.backends.code_tables import cached_code_table
from pyquant.backends.cpu import gemm as cpu_gemm
from pyquant.backends.cpu import optimizer as cpu_optimizer

RNG = random.Random(0)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WRONG_DTYPES = (torch.float64, torch.int32, torch.uint8, torch.float32, torch.int64)
CODE1, CODE2 = F.create_dynamic_map(True), F.create_dynamic_map(False)
CODE4 = (F.create_4bit_map(True), F.create_4bit_map(False))  # m's and v's 16 codes
STATE_DTYPES = (torch.uint8, torch.float32)
GROUP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def blocks(n: int) -> int:
    return -(-n // 256)


ALL_KINDS = ("bigger", "smaller", "empty", "dtype", "strided", "meta")


def bad_tensor(t: torch.Tensor, valid_dtypes: tuple = (), kinds: tuple = ALL_KINDS) -> torch.Tensor:
    """`t` broken in one way among `kinds`: element count, dtype (none of `valid_dtypes`), strides or device."""
    kind = RNG.choice(kinds)
    n = t.numel()
    if kind == "bigger":
        return torch.zeros(n + RNG.choice([1, 255, 256, 4096, 100_000]), dtype=t.dtype)
    if kind == "smaller" and n > 0:
        return torch.zeros(RNG.randrange(n), dtype=t.dtype)
    if kind == "empty" and n > 0:
        return torch.zeros(0, dtype=t.dtype)
    if kind == "dtype":
        return torch.zeros(n, dtype=RNG.choice([d for d in WRONG_DTYPES if d not in valid_dtypes + (t.dtype,)]))
    if kind == "strided" and n > 1:
        return torch.zeros(2 * n, dtype=t.dtype)[::2]
    return torch.empty(n + 1, dtype=t.dtype, device="meta")


def size() -> int:
    """An element count around the kernels' block edges (128 for 4-bit states, 256 for 8-bit ones)."""
    return RNG.choice([0, 1, 127, 128, 129, 255, 256, 257, 2 * RNG.randrange(1, 1500) + 1, 5000])


def codes(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8)


def two_state_operands(count: int, stacked: int, row, fields: tuple) -> dict:
    """Valid operands of a step with two states: random codes and scales, so that a step reads real states. state1
    holds `stacked` moments per element (adam_step and lamb_norms 1; ademamix_step 2: m1 and m2, with 2 x blocks
    scales); `row(eight_bit)` gives a tensor's constants row of `fields`."""
    ops = dict(params=[], grads=[], state1=[], state2=[], absmax1=[], absmax2=[])
    rows = []
    for _ in range(count):
        n = size()
        eight = RNG.random() < 0.7
        ops["params"].append(torch.randn(n).to(RNG.choice(DTYPES)))
        ops["grads"].append(torch.randn(n).to(RNG.choice(DTYPES)))
        ops["state1"].append(codes(stacked * n) if eight else torch.randn(stacked * n))
        ops["state2"].append(codes(n) if eight else torch.rand(n))  # v >= 0 (code2 is the unsigned map)
        empty = torch.zeros(0)
        ops["absmax1"].append(torch.rand(stacked * blocks(n)) if eight else empty)
        ops["absmax2"].append(torch.rand(blocks(n)) if eight else empty)
        rows.append(row(eight))
    ops.update(constants=torch.tensor(rows, dtype=torch.float32).reshape(count, len(fields)),
               code1=CODE1, code2=CODE2, nonfinite=RNG.randrange(2))
    return ops


def adam_operands(count: int) -> dict:
    return two_state_operands(count, 1, lambda eight: adam_constants(GROUP, RNG.randint(1, 5), eight), CONSTANT_FIELDS)


def one_state_operands(count: int) -> dict:
    """Valid operands of one_state_step: one rule of Lion, SGD (momentum), RMSprop, Adagrad, or LARS (momentum with a
    trust ratio in the constants)."""
    ops = dict(params=[], grads=[], state1=[], absmax1=[])
    rows = []
    for _ in range(count):
        n = size()
        eight = RNG.random() < 0.7
        ops["params"].append(torch.randn(n).to(RNG.choice(DTYPES)))
        ops["grads"].append(torch.randn(n).to(RNG.choice(DTYPES)))
        ops["state1"].append(codes(n) if eight else torch.rand(n))
        ops["absmax1"].append(torch.rand(blocks(n)) if eight else torch.zeros(0))
        ratio = RNG.choice([1.0, RNG.uniform(0.1, 3.0)])
        rows.append(one_state_constants(GROUP, RNG.randint(1, 3), eight, trust_ratio=ratio))
    ops.update(constants=torch.tensor(rows, dtype=torch.float32).reshape(count, len(ONE_STATE_FIELDS)), code1=CODE1,
               rule=RNG.choice(list(ONE_STATE_RULES.values())), nonfinite=RNG.randrange(2))
    return ops


def ademamix_operands(count: int) -> dict:
    group = dict(GROUP, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None)
    return two_state_operands(count, 2, lambda eight: ademamix_constants(group, RNG.randint(1, 5)), ADEMAMIX_FIELDS)


def random_shape() -> tuple:
    """1-D, 2-D (rank-1 scales: rows and columns), up to 9 dimensions (more than rank-1 scales take), or empty."""
    kind = RNG.randrange(4)
    if kind == 0:
        return (size(),)
    if kind == 1:
        return RNG.choice([1, 2, 3, 40, 129]), RNG.choice([1, 5, 64, 127])
    if kind == 2:
        return tuple(RNG.choice([1, 2, 3]) for _ in range(RNG.randint(3, RANK1_MAX_DIMS + 1)))
    return RNG.choice([(0, 5), (3, 0, 2)])


def adam4bit_tensor(shape: tuple, four_bit: bool, rank1: bool) -> tuple:
    """One tensor's valid operands of adam4bit_step: (param, grad, state1, state2, absmax1, absmax2)."""
    dtype = RNG.choice(DTYPES)
    p, g = torch.randn(shape).to(dtype), torch.randn(shape).to(RNG.choice(DTYPES))
    n = p.numel()
    if not four_bit:
        return p, g, torch.randn(n), torch.rand(n), torch.zeros(0), torch.zeros(0)
    scales = blocks_of(n, FOURBIT_BLOCK)
    return (p, g, codes((n + 1) // 2), codes((n + 1) // 2), torch.rand(scales),
            torch.rand(sum(shape) if rank1 else scales))


def adam4bit_operands(count: int) -> dict:
    ops = dict(params=[], grads=[], state1=[], state2=[], absmax1=[], absmax2=[], rank1=[])
    rows = []
    for _ in range(count):
        shape = random_shape()
        four_bit = RNG.random() < 0.7
        rank1 = four_bit and 2 <= len(shape) <= RANK1_MAX_DIMS and RNG.random() < 0.8  # empty ones too
        for name, t in zip(("params", "grads", "state1", "state2", "absmax1", "absmax2"),
                           adam4bit_tensor(shape, four_bit, rank1)):
            ops[name].append(t)
        ops["rank1"].append(rank1)
        rows.append(adam_constants(GROUP, RNG.randint(1, 5), four_bit))
    ops.update(constants=torch.tensor(rows, dtype=torch.float32).reshape(count, len(CONSTANT_FIELDS)),
               code1=CODE4[0], code2=CODE4[1], nonfinite=RNG.randrange(2))
    return ops


OPERANDS = dict(adam_step=adam_operands, one_state_step=one_state_operands, ademamix_step=ademamix_operands,
                adam4bit_step=adam4bit_operands)


def broken_call(op: str) -> dict:
    """Valid operands of `op` with one thing broken."""
    ops = OPERANDS[op](RNG.randint(1, 4))
    count = len(ops["params"])
    tensors = [k for k, v in ops.items() if isinstance(v, list) and k != "rank1"]
    code_names = [k for k in ("code1", "code2") if k in ops]
    key = RNG.choice(tensors + ["list", "constants", "code", "nonfinite"] + (["rule"] if "rule" in ops else [])
                     + (["rank1"] * 3 if "rank1" in ops else []))
    if key == "list":
        name = RNG.choice([k for k in ops if isinstance(ops[k], list) and k != "params"])
        ops[name] = ops[name][:-1] if RNG.random() < 0.5 else ops[name] + [ops[name][0]]
    elif key == "constants":
        rows, width = ops["constants"].shape
        ops["constants"] = (torch.zeros(rows + RNG.choice([-1, 1]), width) if RNG.random() < 0.5
                            else torch.zeros(rows, width + RNG.choice([-1, 1])))
    elif key == "code":
        name = RNG.choice(code_names)
        ops[name] = bad_tensor(ops[name])
    elif key == "nonfinite":
        ops["nonfinite"] = RNG.choice([-1, 2, 7, 2**32, 1.0])
    elif key == "rule":
        ops["rule"] = RNG.choice([-1, 4, 5, 2**32 + 1])
    elif key == "rank1":  # a rank-1 flag on a tensor that cannot take rank-1 scales, all else valid for that shape
        i = RNG.randrange(count)
        shape, four_bit = RNG.choice([((size(),), True), ((2,) * (RANK1_MAX_DIMS + 1), True), ((4, 33), False)])
        for name, t in zip(("params", "grads", "state1", "state2", "absmax1", "absmax2"),
                           adam4bit_tensor(shape, four_bit, four_bit)):
            ops[name][i] = t
        ops["rank1"][i] = True
    else:
        i = RNG.randrange(count)
        if key.startswith("absmax") and ops["state1"][i].dtype != torch.uint8:
            key = "state1"  # float32 states have no absmax to break
        valid = {"params": DTYPES, "grads": DTYPES, "state1": STATE_DTYPES}.get(key, ())
        ops[key][i] = bad_tensor(ops[key][i], valid)
    return ops


def expect_refusal(call, what: str) -> None:
    try:
        call()
    except (TypeError, ValueError) as e:
        if not str(e):
            raise AssertionError(f"{what}: refused without a message") from e
        return
    raise AssertionError(f"{what}: accepted")


def described(ops: dict) -> dict:
    """What a failure message shows of the operands: each tensor's shape, dtype, contiguity and device."""
    def one(t):
        return (tuple(t.shape), t.dtype, t.is_contiguous(), t.device.type) if isinstance(t, torch.Tensor) else t
    return {k: [one(t) for t in v] if isinstance(v, list) else one(v) for k, v in ops.items()}


def fuzz_bindings(cases: int) -> int:
    cpu = backends.kernels_of("cpu")
    done = 0
    for _ in range(cases):
        ops = broken_call("adam_step")
        expect_refusal(lambda: cpu["adam_step"](**ops), f"adam_step {described(ops)}")
        expect_refusal(lambda: cpu["lamb_norms"](**ops), f"lamb_norms {described(ops)}")  # adam_step's operands
        for op in ("one_state_step", "ademamix_step", "adam4bit_step"):
            ops = broken_call(op)
            expect_refusal(lambda: cpu[op](**ops), f"{op} {described(ops)}")
        done += 5
        params, grads = [torch.randn(n) for n in (5, 300)], [torch.randn(n) for n in (5, 300)]
        which = RNG.choice(["params", "grads"])
        i = RNG.randrange(2)
        broken = dict(params=params, grads=grads)
        broken[which][i] = bad_tensor(broken[which][i], DTYPES)
        expect_refusal(lambda: cpu["lars_norms"](params, grads, torch.zeros(2, 12), 0), f"lars_norms {which} {i}")
        done += 1

        n = RNG.choice([1, 100, 256, 1000, 5000])
        bs = RNG.choice([1, 64, 256, 4096])
        x = torch.randn(n).to(RNG.choice(DTYPES))
        q = torch.zeros(n, dtype=torch.uint8)
        absmax = torch.ones(-(-n // bs))
        which = RNG.randrange(8)
        if which == 0:
            expect_refusal(lambda: cpu["quantize_blockwise"](bad_tensor(x, DTYPES, ('dtype', 'strided', 'meta')), CODE1, bs), "quantize x")
        elif which == 1:
            expect_refusal(lambda: cpu["quantize_blockwise"](x, bad_tensor(CODE1), bs), "quantize code")
        elif which == 2:
            bad_bs = RNG.choice([0, -1, -(2**63), 2**63, 2**64, 1.5, True, None])
            expect_refusal(lambda: cpu["quantize_blockwise"](x, CODE1, bad_bs), f"quantize blocksize {bad_bs!r}")
        elif which == 3:
            bad_q = bad_tensor(q)
            if bad_q.device.type == "cpu" and bad_q.is_contiguous() and bad_q.dtype == torch.uint8 \
                    and -(-bad_q.numel() // bs) == absmax.numel():
                continue  # a count that still makes as many blocks is a valid q
            expect_refusal(lambda: cpu["dequantize_blockwise"](bad_q, absmax, CODE1, bs, torch.float32), "dequantize q")
        elif which == 4:
            expect_refusal(lambda: cpu["dequantize_blockwise"](q, bad_tensor(absmax), CODE1, bs, torch.float32),
                           "dequantize absmax")
        elif which == 6:  # a bias or an inner size the C matmul would read past
            m, k, cols = RNG.randint(1, 9), RNG.randint(1, 9), RNG.randint(1, 9)
            a, b = torch.randn(m, k).bfloat16(), torch.randn(k + RNG.choice([0, 1]), cols).bfloat16()
            dim = RNG.choice([-1, -2])
            length = (m if dim == -2 else cols) + (RNG.choice([-1, 1, 7]) if b.shape[0] == k else 0)
            bias = torch.randn(max(length, 0)).bfloat16()
            expect_refusal(lambda: cpu_gemm.matmul(a, b, bias, dim, torch.float32), f"matmul {a.shape} {b.shape}")
        elif which == 7:
            x4 = torch.randn(2, 5, 5, 3).bfloat16()
            geometry = (3, 3, 1, 1, 1, 1, 1, 1)
            other = torch.randn(27 + RNG.choice([-1, 1, 27]), 4).bfloat16()
            expect_refusal(lambda: cpu_gemm.im2col_matmul(x4, other, None, -1, geometry, True, torch.float32),
                           f"im2col other {tuple(other.shape)}")
        else:
            g = torch.randn(n).to(RNG.choice(DTYPES))
            found, inv = torch.zeros(1), torch.ones(1)
            args = [[g], found, inv]
            slot = RNG.randrange(3)
            if slot == 0:
                args[0] = [g, torch.zeros(3, dtype=RNG.choice([torch.int32, torch.uint8, torch.int64]))]
            else:
                args[slot] = RNG.choice([torch.zeros(2), torch.zeros(1, dtype=torch.float64),
                                         torch.zeros(1, device="meta")])
            expect_refusal(lambda: cpu["unscale_"](*args), f"unscale_ slot {slot}")
        done += 1
    return done


WRITTEN = dict(adam_step=("params", "state1", "state2", "absmax1", "absmax2"),
               one_state_step=("params", "state1", "absmax1"),
               ademamix_step=("params", "state1", "state2", "absmax1", "absmax2"),
               adam4bit_step=("params", "state1", "state2", "absmax1", "absmax2"))
PREPARE = dict(adam_step=F.prepare_adam_step, one_state_step=F.prepare_one_state_step,
               ademamix_step=F.prepare_ademamix_step, adam4bit_step=F.prepare_adam4bit_step)


def copied(ops: dict) -> dict:
    return {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] if isinstance(v, list) else v
            for k, v in ops.items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same dtype, shape and values, NaN where the other has NaN (a state of random codes can hold a negative
    second moment under the one-state rules' signed map: both backends then agree on a NaN, not on its bits)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def assert_same_writes(op: str, actual: dict, expected: dict, what: str) -> None:
    for name in WRITTEN[op]:
        for i, (a, e) in enumerate(zip(actual[name], expected[name])):
            assert same(a, e), f"{what}: {op} {name} {i} differs ({described(actual)})"


def with_nonfinite_grads(ops: dict) -> int:
    """Under the skip policy, a few NaN and inf gradient elements: how many the step must report skipped."""
    if ops["nonfinite"] != 0:
        return 0
    planted = 0
    for g in ops["grads"]:
        if g.numel() > 0 and RNG.random() < 0.3:
            g.view(-1)[RNG.randrange(g.numel())] = RNG.choice([float("nan"), float("inf")])
            planted += 1
    return planted


def fuzz_valid_calls(rounds: int) -> int:
    """Valid calls with random sizes: each succeeds, reports the planted non-finite gradients and gives the
    reference backend's bits; a prepared step over the same tensors gives the direct call's bits, then refuses
    a call that no longer fits (None, or ValueError for constants or the policy) without writing anything."""
    cpu, reference = backends.kernels_of("cpu"), backends.kernels_of("reference")
    done = 0
    for _ in range(rounds):
        for op in OPERANDS:
            ops = OPERANDS[op](RNG.randint(1, 3))
            planted = with_nonfinite_grads(ops)
            expected = copied(ops)
            direct = copied(ops)
            skipped = cpu[op](**ops)
            assert skipped.dtype == torch.int64 and int(skipped) == planted, f"{op}: {skipped} skipped of {planted}"
            assert int(reference[op](**expected)) == planted, f"{op}: the reference skipped another count"
            assert_same_writes(op, ops, expected, "cpu vs reference")

            count = len(ops["params"])
            args = {k: v for k, v in direct.items() if k != "nonfinite"}
            step = PREPARE[op](**args)
            rows = direct["constants"].tolist()
            again = step(direct["params"], direct["grads"], rows, list(range(count)), direct["nonfinite"])
            assert again is not None and int(again) == planted, f"prepared {op}: {again}"
            assert_same_writes(op, direct, expected, "prepared vs reference")
            done += 3
            done += broken_prepared_call(op, step, direct, rows)
    return done


def broken_prepared_call(op: str, step, ops: dict, rows: list) -> int:
    """One call of a prepared step with one thing that no longer fits: None or ValueError, and nothing written."""
    count = len(ops["params"])
    params, grads, row_of, nonfinite = list(ops["params"]), list(ops["grads"]), list(range(count)), ops["nonfinite"]
    before = copied(ops)
    i = RNG.randrange(count)
    key = RNG.choice(["grad", "grad", "param", "count", "rows", "row_of", "nonfinite"])
    if key == "grad":  # smaller, larger, float64 or integer, strided, on another device
        grads[i] = bad_tensor(grads[i], DTYPES)
    elif key == "param":  # another tensor of the size (not the one described), or the same memory as another dtype
        other = {torch.float32: torch.int32, torch.float16: torch.bfloat16, torch.bfloat16: torch.float16}
        clone = params[i].numel() > 0 and RNG.random() < 0.5  # (an empty clone has the same null pointer: it fits)
        params[i] = params[i].clone() if clone else params[i].view(other[params[i].dtype])
    elif key == "count":  # a tensor fewer, or one more
        params, grads = (params[:-1], grads[:-1]) if RNG.random() < 0.5 else (params + params[:1], grads + grads[:1])
    elif key == "rows":
        rows = [row + [0.0] for row in rows] if RNG.random() < 0.5 else [row[:-1] for row in rows]
    elif key == "row_of":
        row_of = row_of + [0] if RNG.random() < 0.5 else row_of[:-1]
    else:
        nonfinite = RNG.choice([-1, 2, 2**32, 1.0])
    try:
        result = step(params, grads, rows, row_of, nonfinite)
    except ValueError as e:
        assert key in ("rows", "row_of", "nonfinite") and str(e), f"prepared {op} {key}: {e}"
    else:
        assert key in ("grad", "param", "count") and result is None, f"prepared {op} {key}: ran, {result}"
    assert_same_writes(op, ops, before, f"refused prepared call ({key})")
    return 1


def fuzz_c_arguments() -> int:
    """Raw C calls with invalid scalars: PQ_INVALID_ARGUMENT, and nothing written."""
    lib = capi.cpu_library()
    x, q, absmax = torch.randn(1000), torch.full((1000,), 7, dtype=torch.uint8), torch.full((4,), -1.0)
    table = cached_code_table(CODE1)
    ptr = lambda t: t.data_ptr()  # noqa: E731
    cases = 0
    for n, bs, dtype in [(-1, 256, 0), (1000, 0, 0), (1000, -256, 0), (1000, 256, 3), (1000, 256, -1),
                         (-(2**63), 1, 0), (1000, -(2**63), 0)]:
        status = lib.pq_quantize_blockwise(ptr(x), dtype, n, bs, ptr(table), ptr(q), ptr(absmax))
        assert status == capi.INVALID_ARGUMENT, (n, bs, dtype, status)
        status = lib.pq_dequantize_blockwise(ptr(q), ptr(absmax), ptr(CODE1), n, bs, ptr(x), dtype)
        assert status == capi.INVALID_ARGUMENT, (n, bs, dtype, status)
        cases += 2
    assert torch.all(q == 7) and torch.all(absmax == -1.0), "an invalid call wrote"
    # a huge blocksize: one block of n elements, as blocksize = n (the old (n + bs - 1) / bs overflowed)
    for bs in (2**62, 2**63 - 1):
        assert lib.pq_quantize_blockwise(ptr(x), 0, 1000, bs, ptr(table), ptr(q), ptr(absmax)) == 0
        assert absmax[0] == x.abs().max() and torch.all(absmax[1:] == -1.0), "wrote past the single block"
        cases += 1

    ops = adam_operands(2)
    before = [t.clone() for t in ops["params"]]
    for field, value in [("numel", -1), ("param_dtype", 5), ("grad_dtype", -2), ("state_bits", 16), ("param", None)]:
        descriptors = (capi.AdamTensor * 2)()
        for d, p, g, s1, s2, a1, a2 in zip(descriptors, ops["params"], ops["grads"], ops["state1"], ops["state2"],
                                            ops["absmax1"], ops["absmax2"]):
            d.param, d.grad, d.state1, d.state2 = ptr(p), ptr(g), ptr(s1), ptr(s2)
            d.absmax1, d.absmax2 = ptr(a1), ptr(a2)
            d.numel, d.param_dtype, d.grad_dtype = p.numel(), DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype]
            d.state_bits = 8 if s1.dtype == torch.uint8 else 32
        if field == "param":
            descriptors[1].numel = max(descriptors[1].numel, 1)
            descriptors[1].param = None
        else:
            setattr(descriptors[1], field, value)
        bad = lib.pq_adam_step(descriptors, 2, ptr(CODE1), ptr(CODE2), ptr(table), ptr(table), 0)
        assert bad == -capi.INVALID_ARGUMENT, (field, value, bad)
        sums = torch.full((4,), -1.0, dtype=torch.float64)
        status = lib.pq_lamb_norms(descriptors, 2, ptr(CODE1), ptr(CODE2), ptr(table), ptr(table), 0, ptr(sums))
        assert status == capi.INVALID_ARGUMENT and torch.all(sums == -1.0), (field, value, status)
        cases += 2
    huge = (capi.AdamTensor * 257)()  # 257 * ceil((2**63 - 1) / 256) blocks do not fit one int64 index
    for d in huge:
        d.param = d.grad = d.state1 = d.state2 = d.absmax1 = d.absmax2 = x.data_ptr()
        d.numel, d.state_bits = 2**63 - 1, 8
    assert lib.pq_adam_step(huge, 257, ptr(CODE1), ptr(CODE2), ptr(table), ptr(table), 0) == -capi.INVALID_ARGUMENT
    for count, nonfinite in [(-1, 0), (2, 2)]:
        assert lib.pq_adam_step(None, count, None, None, None, None, nonfinite) == -capi.INVALID_ARGUMENT
        assert lib.pq_lamb_norms(None, count, None, None, None, None, nonfinite, None) == capi.INVALID_ARGUMENT
        assert lib.pq_lars_norms(None, count, nonfinite, None) == capi.INVALID_ARGUMENT
        cases += 3
    lars = (capi.OneStateTensor * 1)()
    lars[0].param, lars[0].numel, lars[0].param_dtype = x.data_ptr(), 1000, 0  # no gradient pointer
    assert lib.pq_lars_norms(lars, 1, 0, ptr(torch.zeros(2, dtype=torch.float64))) == capi.INVALID_ARGUMENT
    cases += 1
    assert all(torch.equal(a, b) for a, b in zip(before, ops["params"])), "an invalid adam call wrote"

    fn = lib.pq_unscale_
    numels, dtypes = (ctypes.c_int64 * 1)(-5), (ctypes.c_int32 * 1)(0)
    found, inv = torch.zeros(1), torch.ones(1)
    grads = (ctypes.c_void_p * 1)(x.data_ptr())
    assert fn(1, grads, numels, dtypes, ptr(found), ptr(inv), 0, 1) == capi.INVALID_ARGUMENT
    numels[0], dtypes[0] = 1000, 9
    assert fn(1, grads, numels, dtypes, ptr(found), ptr(inv), 0, 1) == capi.INVALID_ARGUMENT
    assert fn(-3, None, None, None, None, None, 0, 1) == capi.INVALID_ARGUMENT
    return cases + 3


def fuzz_c_descriptors() -> int:
    """Raw C calls of pq_one_state_step, pq_ademamix_step and pq_adam4bit_step whose descriptor of a 300-element
    tensor has one invalid field (a size, a dtype code, a state width, a rank-1 layout whose shape is not numel
    elements, a missing pointer), or with an invalid rule, policy, count or code: PQ_INVALID_ARGUMENT, and
    nothing written."""
    lib = capi.cpu_library()
    ptr = lambda t: t.data_ptr()  # noqa: E731
    table = cached_code_table(CODE1)
    ops = {op: OPERANDS[op](2) for op in ("one_state_step", "ademamix_step", "adam4bit_step")}
    second = dict(one_state_step=(torch.randn(300), torch.randn(300), codes(300), torch.rand(2)),
                  ademamix_step=(torch.randn(300), torch.randn(300), codes(600), codes(300), torch.rand(4),
                                 torch.rand(2)),
                  adam4bit_step=adam4bit_tensor((12, 25), True, True))
    for op, tensors in second.items():
        for name, t in zip(WRITTEN[op][:1] + ("grads",) + WRITTEN[op][1:], tensors):
            ops[op][name][1] = t
        ops[op]["nonfinite"] = 0
    ops["adam4bit_step"]["rank1"][1] = True
    calls = dict(
        one_state_step=lambda o: cpu_optimizer._one_state_call(o["params"], o["grads"], o["state1"], o["absmax1"],
                                                               o["constants"], o["code1"], o["rule"]),
        ademamix_step=lambda o: cpu_optimizer._ademamix_call(*(o[k] for k in list(o)[:9])),
        adam4bit_step=lambda o: cpu_optimizer._adam4bit_call(*(o[k] for k in list(o)[:6]), o["constants"], o["code1"],
                                                             o["code2"], o["rank1"]),
    )
    broken = dict(
        one_state_step=[("numel", -1), ("param_dtype", 3), ("grad_dtype", -1), ("state_bits", 4), ("param", None),
                        ("grad", None), ("state1", None), ("absmax1", None)],
        ademamix_step=[("numel", 2**62), ("numel", -1), ("param_dtype", 5), ("state_bits", 4), ("state1", None),
                       ("state2", None), ("absmax1", None), ("absmax2", None)],
        adam4bit_step=[("state_bits", 8), ("state_bits", 32), ("rank1", 2), ("ndim", 1), ("ndim", RANK1_MAX_DIMS + 1),
                       ("shape", (12, 26)), ("shape", (0, 25)), ("shape", (-12, -25)), ("shape", (2**62, 2**62)),
                       ("numel", 301), ("grad_dtype", 3), ("absmax2", None), ("state2", None)],
    )
    cases = 0
    before = {op: copied(o) for op, o in ops.items()}
    for op, fields in broken.items():
        for field, value in fields:
            descriptors, run = calls[op](ops[op])[:2]  # (_one_state_call's third: LARS' norm pass)
            if field == "shape":
                descriptors[1].shape[0], descriptors[1].shape[1] = value
            else:
                setattr(descriptors[1], field, value)
            assert run(0) == -capi.INVALID_ARGUMENT, (op, field, value)
            cases += 1
        descriptors, run = calls[op](ops[op])[:2]
        assert run(2) == -capi.INVALID_ARGUMENT, (op, "nonfinite 2")
        cases += 1
    descriptors = calls["one_state_step"](ops["one_state_step"])[0]
    for rule in (-1, 4):
        assert lib.pq_one_state_step(descriptors, 2, ptr(CODE1), ptr(table), rule, 0) == -capi.INVALID_ARGUMENT
    descriptors, _ = calls["adam4bit_step"](ops["adam4bit_step"])
    assert lib.pq_adam4bit_step(descriptors, 2, None, ptr(CODE4[1]), 0) == -capi.INVALID_ARGUMENT
    for count in (-1, 3):  # 3: more tensors than the NULL array holds
        assert lib.pq_one_state_step(None, count, ptr(CODE1), ptr(table), 0, 0) == -capi.INVALID_ARGUMENT
        assert lib.pq_ademamix_step(None, count, None, None, None, None, 0) == -capi.INVALID_ARGUMENT
        assert lib.pq_adam4bit_step(None, count, None, None, 0) == -capi.INVALID_ARGUMENT
    for op in ops:
        assert_same_writes(op, ops[op], before[op], "an invalid C call wrote")
        assert calls[op](ops[op])[1](0) >= 0, f"{op}: the unbroken descriptors are refused too"
    return cases + 9


if __name__ == "__main__":
    if capi.cpu_library() is None:
        print("skip: the CPU library is not built")
        sys.exit(0)
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    total = fuzz_bindings(cases) + fuzz_valid_calls(max(cases // 20, 1)) + fuzz_c_arguments()
    total += fuzz_c_descriptors()
    print(f"ok {total}")
