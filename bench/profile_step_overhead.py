"""Per-step Python and dispatch cost of the 8-bit step (Adam8bit; LAMB8bit and LARS8bit: a norm pass, the ratios, the
step) over DenseNet-121's 364 parameter shapes, each with one element
(so that the kernel costs nothing), interleaved with torch's fused and foreach Adam on the same tensors, one thread:
    python bench/profile_step_overhead.py [real|one]    # real: the real shapes, kernel included;
                                                         # one: a single tensor of 256 elements (the fixed cost)
"""
import sys, time, torch, torchvision, pyquant
torch.set_num_threads(1)
mode = sys.argv[1] if len(sys.argv) > 1 else ""
real = mode == "real"
shapes = [(256,)] if mode == "one" else [p.shape for p in torchvision.models.densenet121().parameters()]
def params():
    ps = [torch.nn.Parameter(torch.randn(s) if real or mode == "one" else torch.randn(1)) for s in shapes]
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
reps = {"real": 3, "one": 500}.get(mode, 20)
for r in range(15):
    for k, o in opts.items():
        t = time.perf_counter()
        for _ in range(reps): o.step()
        times[k].append((time.perf_counter() - t) / reps * 1e3)
for k, v in times.items():
    v.sort(); print(f"{k:14s} min {v[0]:.4f} ms  med {v[len(v)//2]:.4f} ms")
