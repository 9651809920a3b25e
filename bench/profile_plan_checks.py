"""What each per-tensor check of a planned Adam8bit step costs over DenseNet-121's 364 parameter tensors, warm caches,
one thread: each is one C-level map over the tensors (Optimizer8bit._planned_step and PreparedStep.load run about a
dozen); minimum over 10 x 200 calls, in us:
    python bench/profile_plan_checks.py
"""
import timeit
from itertools import repeat
from operator import attrgetter, is_

import torch
import torchvision

import pyquant
from pyquant.optim.overrides import ATTRIBUTE

torch.set_num_threads(1)
params = [torch.nn.Parameter(torch.randn(p.shape)) for p in torchvision.models.densenet121().parameters()]
for p in params:
    p.grad = torch.randn_like(p) * 1e-2
optimizer = pyquant.Adam8bit(params, min_8bit_size=4096)
for _ in range(3):
    optimizer.step()
(plan,) = optimizer._plans.values()
grads = [p.grad for p in params]
checks = {
    "p.grad": lambda: list(map(attrgetter("grad"), params)),
    "params are the plan's": lambda: all(map(is_, params, plan.params)),
    "optimizer.state.get (Tensor.__hash__)": lambda: list(map(optimizer.state.get, params)),
    "override attribute": lambda: list(map(getattr, params, repeat(ATTRIBUTE), repeat(None))),
    "state tensors are the plan's": lambda: all(map(is_, map(dict.get, plan.state_dicts, plan.state_keys),
                                                    plan.state_tensors)),
    "Tensor.data_ptr": lambda: list(map(torch.Tensor.data_ptr, params)),
    "Tensor.numel": lambda: list(map(torch.Tensor.numel, params)),
    "Tensor.dtype": lambda: list(map(attrgetter("dtype"), params)),
    "Tensor.is_contiguous": lambda: all(map(torch.Tensor.is_contiguous, grads)),
    "Tensor.is_cpu": lambda: all(map(attrgetter("is_cpu"), grads)),
}
print(f"{len(params)} tensors, {len(plan.state_tensors)} state tensors")
for name, check in checks.items():
    print(f"{name:40s} {min(timeit.repeat(check, number=200, repeat=10)) / 200 * 1e6:7.1f} us")
