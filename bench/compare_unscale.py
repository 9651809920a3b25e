"""pyquant.amp.GradScaler.unscale_ against torch.amp.GradScaler("cpu").unscale_ over timm's DenseNet-121 gradients
(364 float32 tensors, randn), interleaved in one process and paired round by round (the order alternates), so
that the host's swings cancel in the ratio:

    python bench/compare_unscale.py [THREADS] [ROUNDS]

Each call is a fresh iteration's unscale_ (the scaler's per-optimizer state cleared first), with a scale of
1 + 2^-23 so that every gradient is rewritten and repeated calls never reach subnormals. Prints each scaler's
minimum and median and the median and quartiles of the rounds' pyquant / torch ratios.
"""
import statistics
import sys
import time

import timm
import torch

import pyquant.amp as amp

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 100
torch.manual_seed(0)


def scaler_unscale(cls):
    params = list(timm.create_model("densenet121", pretrained=False).parameters())
    for p in params:
        p.grad = torch.randn(p.shape)
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = cls("cpu", init_scale=1.0 + 2.0**-23)
    scaler.scale(torch.ones(()))

    def call():
        scaler._per_optimizer_states.clear()  # a fresh iteration: unscale_ may run once per update()
        scaler.unscale_(optimizer)

    return call


fns = {"pyquant": scaler_unscale(amp.GradScaler), "torch": scaler_unscale(torch.amp.GradScaler)}
for fn in fns.values():
    fn(), fn()
times, ratios = {name: [] for name in fns}, []
for r in range(rounds):
    took = {}
    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
        start = time.perf_counter()
        fns[name]()
        took[name] = time.perf_counter() - start
        times[name].append(took[name])
    ratios.append(took["pyquant"] / took["torch"])
for name, values in times.items():
    values.sort()
    print(f"{name:8s} min {values[0] * 1e3:.3f} ms  med {values[len(values) // 2] * 1e3:.3f} ms")
ratios.sort()
quarter = len(ratios) // 4
print(f"paired pyquant / torch: median {statistics.median(ratios):.3f}  quartiles {ratios[quarter]:.3f} "
      f"{ratios[-quarter - 1]:.3f}")
