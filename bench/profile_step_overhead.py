"""Per-step Python and dispatch cost of the 8-bit step (Adam8bit; LAMB8bit and LARS8bit: a norm pass, the ratios, the
step) over DenseNet-121's 364 parameter shapes, each with one element
(so that the kernel costs nothing), interleaved with torch's fused and foreach Adam on the same tensors, one thread:
    python bench/profile_step_overhead.py [real]    # real: the real shapes, kernel included
"""
import sys, time, torch, torchvision, pyquant
torch.set_num_threads(1)
shapes = [p.shape for p in torchvision.models.densenet121().parameters()]
real = len(sys.argv) > 1 and sys.argv[1] == "real"
def params():
    ps = [torch.nn.Parameter(torch.randn(s) if real else torch.randn(1)) for s in shapes]
    for p in ps: p.grad = torch.randn_like(p) * 1e-2
    return ps
small = 0 if not real else 4096
opts = {"pyquant": pyquant.Adam8bit(params(), min_8bit_size=small),
        "pyquant_lamb": pyquant.LAMB8bit(params(), min_8bit_size=small),
        "pyquant_lars": pyquant.LARS8bit(params(), lr=1e-2, momentum=0.9, min_8bit_size=small),
        "torch_fused": torch.optim.Adam(params(), fused=True),
        "torch_foreach": torch.optim.Adam(params(), foreach=True)}
for o in opts.values():
    for _ in range(3): o.step()
times = {k: [] for k in opts}
reps = 20 if not real else 3
for r in range(15):
    for k, o in opts.items():
        t = time.perf_counter()
        for _ in range(reps): o.step()
        times[k].append((time.perf_counter() - t) / reps * 1e3)
for k, v in times.items():
    v.sort(); print(f"{k:14s} min {v[0]:.3f} ms  med {v[len(v)//2]:.3f} ms")
