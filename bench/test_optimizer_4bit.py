"""One AdamW step with 4-bit states at 1M and 16M float32 parameters (a matrix of rows of 1024): pyquant.AdamW4bit
(rank-1 second moment, and rank1=False), torch's fused float32 AdamW, and torchao 0.18's AdamW4bit (its step under
torch.compile, as torchao runs it; the first, compiling step is a warm-up round), in the same process.

`extra_info` has the bytes each step must move and the achieved GB/s, and the state bytes per parameter.
Bytes per parameter: 4-bit block-wise: read p, g (8) + write p (4) + read and write two 4-bit codes (2) = 14;
rank-1 adds pass 1's second read of g and of v's codes (4.5) = 18.5; float32 AdamW: 28.
"""

import pytest
import torch

import pyquant

SIZES = {"1M": 1 << 20, "16M": 16 << 20}
COLUMNS = 1024
BYTES_PER_PARAM = {"4bit-rank1": 18.5, "4bit-blockwise": 14, "fp32": 28}


def _torchao_adamw4bit(params):
    optim = pytest.importorskip("torchao.optim", reason="torchao is not installed (pip install torchao==0.18.0)")
    return optim.AdamW4bit(params)


OPTIMIZERS = {
    "pyquant.AdamW4bit": ("4bit-rank1", lambda ps: pyquant.AdamW4bit(ps)),
    "pyquant.AdamW4bit(rank1=False)": ("4bit-blockwise", lambda ps: pyquant.AdamW4bit(ps, rank1=False)),
    "torch.AdamW(fused)": ("fp32", lambda ps: torch.optim.AdamW(ps, fused=True)),
    "torchao.AdamW4bit": ("4bit-blockwise", _torchao_adamw4bit),
}


def _state_bytes(opt):
    seen, total = set(), 0
    for state in opt.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or key in ("qmap1", "qmap2"):
                continue
            parts = [getattr(value, name) for name in ("codes", "scale")] if hasattr(value, "codes") else [value]
            for t in parts:  # torchao's states are tensor subclasses holding codes and scales
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_adamw4bit_step(benchmark, size, name):
    kind, make = OPTIMIZERS[name]
    n = SIZES[size]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n // COLUMNS, COLUMNS, generator=g))]
    params[0].grad = torch.randn(n // COLUMNS, COLUMNS, generator=g) * 1e-2
    opt = make(params)
    opt.step()  # allocate the states (and compile torchao's step) outside the timing
    benchmark.group = f"AdamW 4-bit step {size} float32 params"
    benchmark.pedantic(opt.step, rounds=10, warmup_rounds=2)
    moved = n * BYTES_PER_PARAM[kind]
    benchmark.extra_info.update(
        params=n,
        bytes=moved,
        **{"GB/s": moved / benchmark.stats.stats.median / 1e9, "state bytes/param": _state_bytes(opt) / n},
    )
