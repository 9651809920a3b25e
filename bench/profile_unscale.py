"""Where GradScaler.unscale_'s time goes over DenseNet-121's gradients (median of 200 calls, ms):

    python bench/profile_unscale.py

the C++ kernel called directly, through `pyquant.amp.unscale_` (eager: no custom-op dispatch), torch's kernel,
both on one concatenated tensor, and the per-call cost of
the two GradScalers' `unscale_` on 364 one-element gradients (their Python and dispatch, almost no arithmetic).
"""

import timm
import torch

import pyquant.amp as amp
from pyquant.backends.cpu.amp import unscale_ as unscale_cpu
from timing import median_time  # bench/ is the script's folder, so on sys.path

torch.manual_seed(0)
params = list(timm.create_model("densenet121", pretrained=False).parameters())
grads = [torch.randn(p.shape) for p in params]
# Not a power of two, and close to 1: every element is rewritten, and repeated calls never reach subnormals.
inv_scale, found_inf = torch.tensor(1.0 + 2.0**-23), torch.zeros(())
one_tensor = [torch.cat([g.flatten() for g in grads])]


def scaler_unscale(cls, params):
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = cls("cpu", init_scale=1.0)
    scaler.scale(torch.ones(()))

    def call():
        scaler._per_optimizer_states.clear()  # a fresh iteration: unscale_ may run once per update()
        scaler.unscale_(optimizer)

    return call


tiny = [torch.nn.Parameter(torch.zeros(1)) for _ in grads]
for p in tiny:
    p.grad = torch.ones(1)
torch_unscale = torch._amp_foreach_non_finite_check_and_unscale_
for name, fn in [
    (f"pyquant C++ kernel, {len(grads)} tensors", lambda: unscale_cpu(grads, found_inf, inv_scale)),
    (f"pyquant amp.unscale_, {len(grads)} tensors", lambda: amp.unscale_(grads, found_inf, inv_scale)),
    (f"torch, {len(grads)} tensors", lambda: torch_unscale(grads, found_inf, inv_scale)),
    ("pyquant C++ kernel, one tensor", lambda: unscale_cpu(one_tensor, found_inf, inv_scale)),
    ("torch, one tensor", lambda: torch_unscale(one_tensor, found_inf, inv_scale)),
    (f"pyquant GradScaler.unscale_, {len(tiny)} x 1", scaler_unscale(amp.GradScaler, tiny)),
    (f"torch GradScaler.unscale_, {len(tiny)} x 1", scaler_unscale(torch.amp.GradScaler, tiny)),
]:
    print(f"{name:40s} {1e3 * median_time(fn, 200):.3f} ms")
