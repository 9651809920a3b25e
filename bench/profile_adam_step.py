"""300 Adam8bit steps at 16M float32 parameters, for a profiler:

    perf record -o perf.data python bench/profile_adam_step.py && perf report -i perf.data --sort dso,symbol
"""

import torch

import pyquant

n = 16 << 20
p = torch.nn.Parameter(torch.randn(n))
p.grad = torch.randn(n) * 1e-2
optimizer = pyquant.Adam8bit([p])
for _ in range(300):
    optimizer.step()
