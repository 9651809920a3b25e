"""The one-state 8-bit steps (Lion8bit, SGD8bit with momentum, RMSprop8bit, Adagrad8bit) on one float32 tensor of
1M parameters, best of 15 rounds of 10 steps: python bench/compare_one_state_step.py THREADS
Compare two builds of the library by running it twice with PYQUANT_LIB_DIR pointing at each, alternately."""
import sys, time, torch, pyquant
torch.set_num_threads(int(sys.argv[1])); n = 1 << 20
res = {}
for name, cls, kw in [("lion", pyquant.Lion8bit, {}), ("sgd", pyquant.SGD8bit, {"lr": 1e-2, "momentum": 0.9}),
                      ("rmsprop", pyquant.RMSprop8bit, {}), ("adagrad", pyquant.Adagrad8bit, {})]:
    torch.manual_seed(0); p = torch.nn.Parameter(torch.randn(n)); p.grad = torch.randn(n) * 1e-2
    o = cls([p], **kw)
    for _ in range(3): o.step()
    best = 1e9
    for r in range(15):
        t = time.perf_counter()
        for _ in range(10): o.step()
        best = min(best, (time.perf_counter() - t) / 10 * 1e3)
    res[name] = best
print(" ".join(f"{k} {v:.3f}" for k, v in res.items()))
