"""Two builds of the CPU library on the 8-bit Adam step, interleaved in one process on the same inputs, with the
bits compared (a kernel change must keep them):

    OMP_NUM_THREADS=1 python bench/compare_libs.py BEFORE/libpyquant_cpu.so AFTER/libpyquant_cpu.so [MILLIONS] [ROUNDS] [RULE] [--timing-only] [--step=T]

Each library gets its own copy of one float32 tensor (MILLIONS * 2^20 parameters, default 1) with 8-bit states and
calls `pq_adam_step` directly (no Python optimizer around it), or with RULE (momentum, lion, rmsprop, adagrad)
`pq_one_state_step`. It prints each build's minimum and median time per
step over the rounds, in ns per parameter too, and after/before; it stops with an error if the two builds' params,
states or absmax differ after any step. Copy a build's library out of `build/` before rebuilding to keep it.
On the Intel Xeon of 2026-12-07 the second library came out up to 5 % faster than the first even when both were the
same file: run it in both orders and take the geometric mean of after/before and before/after's inverse. It also
prints the paired ratio: each round times both builds back to back, in alternating order, and the median and
quartiles of the rounds' after/before ratios move less with the host than the two minimums do (the same file twice
gave 0.989 and 1.006 over 200 and 100 rounds at 1M, quartiles within 3 %).

--step=T sets Adam's step count (default 5; from about 16,600 the bias correction c2 of beta2 = 0.999 is 1 in
float32). --timing-only skips the bit comparison, for a build changed on purpose to time what one part of a kernel costs (a
part removed or replaced, wrong bits).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time

import torch

from pyquant.backends import capi
from pyquant.backends.code_tables import cached_code_table
from pyquant._contract import ONE_STATE_FIELDS, ONE_STATE_RULES, one_state_constants
from pyquant.functional import create_dynamic_map


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)  # another file than the first: its own copy of the library, not the one loaded
    for name in ("pq_adam_step", "pq_one_state_step", "pq_set_cpu_sqrt", "pq_set_isa"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = capi.CPU_FUNCTIONS[name]
    lib.pq_set_cpu_sqrt(capi._torch_cpu_sqrt())  # the square root torch's CPU Adam uses, as pyquant installs it
    cap = os.environ.get("PYQUANT_CPU_ISA")
    if cap:
        lib.pq_set_isa({name: code for code, name in capi.ISA_NAMES.items()}[cap])
    return lib


def operands(n: int) -> list[torch.Tensor]:
    """param, grad, state1 (zero codes of the signed map), state2, absmax1, absmax2: the same values every call."""
    blocks = -(-n // 256)
    return [
        torch.randn(n, generator=torch.Generator().manual_seed(1)),
        torch.randn(n, generator=torch.Generator().manual_seed(2)) * 1e-2,
        torch.full((n,), 127, dtype=torch.uint8),
        torch.zeros(n, dtype=torch.uint8),
        torch.zeros(blocks),
        torch.zeros(blocks),
    ]


def descriptor(tensors: list[torch.Tensor], step: int = 5) -> capi.AdamTensor:
    d = capi.AdamTensor(*(t.data_ptr() for t in tensors), tensors[0].numel(), 0, 0, 8, 0)
    lr, beta1, beta2, eps = 1e-3, 0.9, 0.999, 1e-8
    c1, c2 = 1 - beta1**step, (1 - beta2**step) ** 0.5
    k = d.k
    k.beta1, k.one_minus_beta1, k.beta2, k.one_minus_beta2 = beta1, 1 - beta1, beta2, 1 - beta2
    k.eps, k.eps_c2, k.c2, k.step_size, k.decay, k.inv_grad_scale = eps, eps * c2, c2, -lr / c1, 1.0, 1.0
    return d


def one_state_descriptor(tensors: list[torch.Tensor]) -> capi.OneStateTensor:
    """param, grad, state1, absmax1 of operands(): SGD's, Lion's and RMSprop's defaults but lr 1e-3 and momentum 0.9."""
    d = capi.OneStateTensor(*(tensors[i].data_ptr() for i in (0, 1, 2, 4)), tensors[0].numel(), 0, 0, 8, 0)
    group = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}
    for name, value in zip(ONE_STATE_FIELDS, one_state_constants(group, 5, eight_bit=True)):
        setattr(d.k, name, value)
    return d


def main() -> None:
    timing_only = "--timing-only" in sys.argv
    steps = [int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--step=")]
    args = [a for a in sys.argv[1:] if a != "--timing-only" and not a.startswith("--step=")]
    before, after = args[0], args[1]
    n = int(float(args[2] if len(args) > 2 else 1) * (1 << 20))
    rounds = int(args[3]) if len(args) > 3 else 10
    rule = args[4] if len(args) > 4 else "adam"
    libs = [load(before), load(after)]
    code1, code2 = create_dynamic_map(True), create_dynamic_map(False)
    tables = (code1.data_ptr(), code2.data_ptr(), cached_code_table(code1).data_ptr(), cached_code_table(code2).data_ptr())
    data = [operands(n), operands(n)]
    if rule == "adam":
        descriptors = [descriptor(d, *steps) for d in data]
    else:
        descriptors = [one_state_descriptor(d) for d in data]
        tables = (tables[0], tables[2])  # bitsandbytes quantises every one-state rule's state with the signed map

    def step(i: int) -> None:
        if rule == "adam":
            count = libs[i].pq_adam_step(ctypes.byref(descriptors[i]), 1, *tables, 0)
        else:
            count = libs[i].pq_one_state_step(ctypes.byref(descriptors[i]), 1, *tables, ONE_STATE_RULES[rule], 0)
        if count < 0:
            raise RuntimeError(f"{args[i]}: the step refused the call")

    def same_bits() -> None:
        if timing_only:
            return
        for x, y in zip(*data):
            if not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                raise SystemExit("the two builds' results differ")

    for _ in range(3):
        step(0)
        step(1)
    same_bits()
    reps = max(1, int(20e6 // n))
    times: list[list[float]] = [[], []]
    ratios = []
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            t = time.perf_counter()
            for _ in range(reps):
                step(i)
            times[i].append((time.perf_counter() - t) / reps * 1e3)
        ratios.append(times[1][-1] / times[0][-1])
        same_bits()
    for name, t in zip(("before", "after"), times):
        t.sort()
        print(f"{name:6s} min {t[0]:.3f} ms  median {t[len(t) // 2]:.3f} ms  ({t[0] * 1e6 / n:.2f} ns a parameter)")
    print(f"after/before: min {times[1][0] / times[0][0]:.3f}  median {times[1][rounds // 2] / times[0][rounds // 2]:.3f}"
          + ("  (bits not compared)" if timing_only else "  (same bits)"))
    if rounds >= 4:
        low, _, high = statistics.quantiles(ratios, n=4)
        print(f"paired after/before: median {statistics.median(ratios):.3f}  quartiles {low:.3f} {high:.3f}")


if __name__ == "__main__":
    main()
