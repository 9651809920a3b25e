"""Fuzz the calls into the C++ CPU library with mismatched operands (run as a script, in its own process).

tests/test_safety.py runs it in a subprocess, so that a crash fails that test instead of killing pytest;
.ci/asan.sh runs it against a library built with AddressSanitizer. Each case breaks one thing in an
otherwise valid call (a size, a dtype, a stride, a device, a block count, a list length, a C argument) and
(also of the half-precision matmul's bias and inner sizes) must end in a TypeError or ValueError from the Python binding, or in PQ_INVALID_ARGUMENT from the C entry
point: never a write outside a tensor. Usage: python tests/fuzz_native.py [cases]; prints "ok <count>".
"""

from __future__ import annotations

import ctypes
import random
import sys

import torch

from pyquant import backends
from pyquant import functional as F
from pyquant._contract import CONSTANT_FIELDS, DTYPE_CODES, adam_constants
from pyquant.backends import capi
from pyquant.backends.code_tables import cached_code_table
from pyquant.backends.cpu import gemm as cpu_gemm

RNG = random.Random(0)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WRONG_DTYPES = (torch.float64, torch.int32, torch.uint8, torch.float32, torch.int64)
CODE1, CODE2 = F.create_dynamic_map(True), F.create_dynamic_map(False)


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


def adam_operands(count: int) -> dict:
    ops = dict(params=[], grads=[], state1=[], state2=[], absmax1=[], absmax2=[])
    rows = []
    for _ in range(count):
        n = RNG.choice([0, 1, 255, 256, 257, 4096, 5000, 70_000])
        eight = RNG.random() < 0.7
        ops["params"].append(torch.randn(n).to(RNG.choice(DTYPES)))
        ops["grads"].append(torch.randn(n).to(RNG.choice(DTYPES)))
        sdt = torch.uint8 if eight else torch.float32
        ops["state1"].append(torch.zeros(n, dtype=sdt))
        ops["state2"].append(torch.zeros(n, dtype=sdt))
        empty = torch.zeros(0)
        ops["absmax1"].append(torch.zeros(blocks(n)) if eight else empty)
        ops["absmax2"].append(torch.zeros(blocks(n)) if eight else empty)
        rows.append(adam_constants(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), 1, eight))
    ops.update(constants=torch.tensor(rows, dtype=torch.float32).reshape(count, len(CONSTANT_FIELDS)),
               code1=CODE1, code2=CODE2, nonfinite=0)
    return ops


def broken_adam_call() -> dict:
    ops = adam_operands(RNG.randint(1, 4))
    count = len(ops["params"])
    key = RNG.choice(["params", "grads", "state1", "state2", "absmax1", "absmax2", "list", "constants", "code",
                      "nonfinite"])
    if key == "list":
        name = RNG.choice(["grads", "state1", "state2", "absmax1", "absmax2"])
        ops[name] = ops[name][:-1] if RNG.random() < 0.5 else ops[name] + [ops[name][0]]
    elif key == "constants":
        ops["constants"] = torch.zeros(count + RNG.choice([-1, 1]), len(CONSTANT_FIELDS))
    elif key == "code":
        ops[RNG.choice(["code1", "code2"])] = bad_tensor(CODE1)
    elif key == "nonfinite":
        ops["nonfinite"] = RNG.choice([-1, 2, 7])
    else:
        i = RNG.randrange(count)
        if key.startswith("absmax") and ops["state1"][i].dtype != torch.uint8:
            key = "state1"  # float32 states have no absmax to break
        valid = {"params": DTYPES, "grads": DTYPES, "state1": (torch.uint8, torch.float32)}.get(key, ())
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


def fuzz_bindings(cases: int) -> int:
    cpu = backends.kernels_of("cpu")
    done = 0
    for _ in range(cases):
        ops = broken_adam_call()
        shapes = {k: [(tuple(t.shape), t.dtype, t.is_contiguous()) for t in v] if isinstance(v, list) else None
                  for k, v in ops.items()}
        expect_refusal(lambda: cpu["adam_step"](**ops), f"adam_step {shapes}")
        expect_refusal(lambda: cpu["lamb_norms"](**ops), f"lamb_norms {shapes}")  # adam_step's operands
        done += 2
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


if __name__ == "__main__":
    if capi.cpu_library() is None:
        print("skip: the CPU library is not built")
        sys.exit(0)
    total = fuzz_bindings(int(sys.argv[1]) if len(sys.argv) > 1 else 300) + fuzz_c_arguments()
    print(f"ok {total}")
