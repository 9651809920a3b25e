"""Adam8bit's step over DenseNet-121's 364 parameter tensors (8-bit states from 4096 elements), split into the
library call (the plan's PreparedStep.run: the kernel, the NVTX range, the version bumps; "kernel call" is the C call
alone) and everything else ("before it": the plan's checks and the descriptors' loading; "after it"), with
torch's fused Adam on the same shapes interleaved, one thread unless told; minimum and median over the rounds, in ms:
    python bench/profile_outside_kernel.py [ROUNDS] [THREADS] [NUMEL]
NUMEL: one tensor of that many elements instead of DenseNet-121's list.
"""
import sys, time, torch, torchvision, pyquant
from pyquant.backends.cpu.optimizer import PreparedStep
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
shapes = ([(int(sys.argv[3]),)] if len(sys.argv) > 3
          else [p.shape for p in torchvision.models.densenet121().parameters()])
def params():
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in ps: p.grad = torch.randn_like(p) * 1e-2
    return ps
ours, theirs = pyquant.Adam8bit(params(), min_8bit_size=4096), torch.optim.Adam(params(), fused=True)
calls = []  # each library call's start and end in this step
original = PreparedStep.run
def timed(self, nonfinite):
    t = time.perf_counter(); count = original(self, nonfinite); calls.append((t, time.perf_counter()))
    return count
PreparedStep.run = timed
for _ in range(3): ours.step(); theirs.step()
in_kernel = [0.0]
for plan in ours._plans.values():
    def kernel(nonfinite, call=plan.prepared._run):
        t = time.perf_counter(); count = call(nonfinite); in_kernel[0] += time.perf_counter() - t
        return count
    plan.prepared._run = kernel
times = {"step": [], "library call": [], "kernel call": [], "outside it": [], "before it": [], "after it": [],
         "torch fused step": []}
for _ in range(rounds):
    calls.clear(); in_kernel[0] = 0.0
    t = time.perf_counter(); ours.step(); total = time.perf_counter() - t
    in_run = sum(end - start for start, end in calls)
    times["step"].append(total); times["library call"].append(in_run); times["outside it"].append(total - in_run)
    times["kernel call"].append(in_kernel[0])
    times["before it"].append(calls[0][0] - t); times["after it"].append(t + total - calls[-1][1])
    t = time.perf_counter(); theirs.step(); times["torch fused step"].append(time.perf_counter() - t)
for k, v in times.items():
    v.sort(); print(f"{k:16s} min {v[0] * 1e3:.3f} ms  med {v[len(v) // 2] * 1e3:.3f} ms")
