"""AdEMAMix8bit step over 364 one-element tensors (DenseNet-121 has 364 parameters), so that the kernel costs
nothing: the per-step Python and dispatch cost. python bench/profile_ademamix_overhead.py"""
import sys, time, torch, pyquant
torch.set_num_threads(1)
def params():
    ps = [torch.nn.Parameter(torch.randn(1)) for _ in range(364)]
    for p in ps: p.grad = torch.randn_like(p) * 1e-2
    return ps
o = pyquant.AdEMAMix8bit(params(), min_8bit_size=0)
for _ in range(3): o.step()
best = 1e9
for r in range(20):
    t = time.perf_counter()
    for _ in range(20): o.step()
    best = min(best, (time.perf_counter() - t) / 20 * 1e3)
print(f"AdEMAMix8bit 364 one-element tensors: {best:.3f} ms")
