"""The optimizer step's fixed cost with warm and with cold caches: Adam8bit and torch's fused Adam over one small
tensor, each step timed alone, with and without a 16 MB tensor streamed through the caches before it (as the step's
own kernel does over tensors larger than the L2), one thread; medians of 300 steps:
    python bench/profile_cold_step.py [NUMEL]
"""
import statistics, sys, time, torch, pyquant
torch.set_num_threads(1)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
def one(cls, **kw):
    p = torch.nn.Parameter(torch.randn(n)); p.grad = torch.randn(n) * 1e-2
    return cls([p], **kw)
opts = {"pyquant": one(pyquant.Adam8bit), "torch_fused": one(torch.optim.Adam, fused=True)}
for o in opts.values():
    for _ in range(5): o.step()
junk = torch.zeros(4 << 20)
for name, o in opts.items():
    for cold in (False, True):
        times = []
        for _ in range(300):
            if cold: junk.add_(1.0)
            t = time.perf_counter(); o.step(); times.append(time.perf_counter() - t)
        print(f"{name:12s} {'cold' if cold else 'warm'} caches: {statistics.median(times) * 1e6:.1f} us")
