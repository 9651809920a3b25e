"""Adam8bit against torch.optim.Adam(fused=True) on one float32 tensor, interleaved in one process (a loaded machine
shifts both alike): python bench/compare_adam_step.py MILLIONS_OF_PARAMETERS THREADS ROUNDS [STEP]
STEP: both optimizers continue from that step count (from about 16,600 the bias correction c2 of beta2 = 0.999 is 1
in float32, which pyquant's AVX-512 kernels use)."""
import sys, time, torch, pyquant
n = int(float(sys.argv[1]) * (1 << 20)); threads = int(sys.argv[2]); rounds = int(sys.argv[3])
start = int(sys.argv[4]) if len(sys.argv) > 4 else 0
torch.manual_seed(0); torch.set_num_threads(threads)
def make(cls, **kw):
    p = torch.nn.Parameter(torch.randn(n)); p.grad = torch.randn(n) * 1e-2
    return cls([p], **kw)
opts = {"pyquant": make(pyquant.Adam8bit), "torch_fused": make(torch.optim.Adam, fused=True)}
for o in opts.values():
    for _ in range(3): o.step()
    for state in o.state.values():
        if start: state["step"] = torch.tensor(float(start)) if torch.is_tensor(state["step"]) else start
times = {k: [] for k in opts}
reps = max(1, int(20e6 // n))
for r in range(rounds):
    for k, o in opts.items():
        t = time.perf_counter()
        for _ in range(reps): o.step()
        times[k].append((time.perf_counter() - t) / reps * 1e3)
for k, v in times.items():
    v.sort(); print(f"{k:12s} min {v[0]:.3f} ms  med {v[len(v)//2]:.3f} ms")
print(f"ratio min {times['pyquant'][0]/times['torch_fused'][0]:.2f}  med {times['pyquant'][len(v)//2]/times['torch_fused'][len(v)//2]:.2f}")
