"""Where Adam8bit's step over one small tensor goes, piece by piece, against torch's fused Adam on the same shape
(us a call: each round runs every piece in turn, `number` calls each, and the minimum over 15 rounds is kept, so
that the host's swings hit every piece alike):

    python bench/profile_small_step.py [NUMEL [THREADS]]    # default 256 and 1: the kernel costs next to nothing

"planned step" is the group's fast path (Optimizer8bit._planned_step); inside it "checks" (runs_prepared_steps),
"constants" (_plan_rows), "load" (PreparedStep.load: the per-tensor checks and the descriptors' writes) and
"library call" (PreparedStep.run), of which "C call" is the ctypes call alone (the table preparation and the kernel).
"step" minus "planned step" is torch's Optimizer.step wrapper and no_grad, and Optimizer8bit.step's own lines.
"""
import sys
import time

import torch

import pyquant
from pyquant import functional as F

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
p = torch.nn.Parameter(torch.randn(n))
p.grad = torch.randn(n) * 1e-2
ours = pyquant.Adam8bit([p], min_8bit_size=0)
q = torch.nn.Parameter(torch.randn(n))
q.grad = torch.randn(n) * 1e-2
theirs = torch.optim.Adam([q], fused=True)
for _ in range(5):
    ours.step()
    theirs.step()
group = ours.param_groups[0]
plan = ours._plans[id(group)]
rows = ours._plan_rows(plan, group, 1.0)
number = max(5, int(2e5 // max(n, 1)))
pieces = {
    "step": lambda: ours.step(),
    "torch fused step": lambda: theirs.step(),
    "planned step": lambda: ours._planned_step(group, 1.0, 0),
    "checks": lambda: F.runs_prepared_steps(p),
    "constants": lambda: ours._plan_rows(plan, group, 1.0),
    "load": lambda: plan.prepared.load([p], [p.grad], *rows),
    "library call": lambda: plan.prepared.run(0),
    "C call": lambda: plan.prepared._run(0),
}
best = dict.fromkeys(pieces, float("inf"))
for _ in range(15):
    for name, fn in pieces.items():
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best[name] = min(best[name], (time.perf_counter() - start) / number)
for name, seconds in best.items():
    print(f"{name:18s} {seconds * 1e6:8.2f} us")
