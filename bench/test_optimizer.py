"""One optimizer step at 1M, 4M and 16M float32 parameters: pyquant.Adam8bit against bitsandbytes' Adam8bit
and torch's fused and foreach Adam, in the same process; Lion8bit, SGD8bit, RMSprop8bit, Adagrad8bit and AdEMAMix8bit
at 1M and 16M against bitsandbytes' and torch's float32 SGD/RMSprop/Adagrad (fused where torch has it, and foreach);
every family over DenseNet-121's parameter list; LAMB8bit and LARS8bit against AdamW8bit and SGD8bit (the same
steps without the trust ratio's norm pass). `extra_info` has the bytes each step must move
(8-bit Adam: 16 B/param; float32 Adam: 28 B/param), the achieved GB/s and the state bytes per parameter.
"""

import pytest
import torch

import pyquant

SIZES = {"1M": 1 << 20, "4M": 4 << 20, "16M": 16 << 20}
# Bytes moved per parameter: 8-bit: read p, g (8) + write p (4) + read/write two uint8 codes (4);
# float32 Adam: read p, g, m, v (16) + write p, m, v (12).
BYTES_PER_PARAM = {"8bit": 16, "fp32": 28}


def _optimizers(bnb):
    opts = {
        "pyquant.Adam8bit": ("8bit", lambda ps: pyquant.Adam8bit(ps)),
        "torch.Adam(fused)": ("fp32", lambda ps: torch.optim.Adam(ps, fused=True)),
        "torch.Adam(foreach)": ("fp32", lambda ps: torch.optim.Adam(ps, foreach=True)),
    }
    if bnb is not None:
        opts["bitsandbytes.Adam8bit"] = ("8bit", lambda ps: bnb.optim.Adam8bit(ps))
    return opts


def _state_bytes(opt):
    seen, total = set(), 0
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key not in ("qmap1", "qmap2") and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", ["pyquant.Adam8bit", "bitsandbytes.Adam8bit", "torch.Adam(fused)", "torch.Adam(foreach)"])
def test_adam_step(benchmark, size, name, request):
    bnb = None
    if name.startswith("bitsandbytes"):
        bnb = request.getfixturevalue("bnb")
    kind, make = _optimizers(bnb)[name]
    n = SIZES[size]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g))]
    params[0].grad = torch.randn(n, generator=g) * 1e-2
    opt = make(params)
    opt.step()  # allocate the states outside the timing
    benchmark.group = f"Adam step {size} float32 params"
    rounds = 5 if (name.startswith("bitsandbytes") and n > SIZES["1M"]) else 10
    benchmark.pedantic(opt.step, rounds=rounds, warmup_rounds=2)
    moved = n * BYTES_PER_PARAM[kind]
    benchmark.extra_info.update(
        params=n,
        bytes=moved,
        **{"GB/s": moved / benchmark.stats.stats.median / 1e9, "state bytes/param": _state_bytes(opt) / n},
    )


# ---- the rest of the 8-bit family against bitsandbytes' and torch's float32 step of the same algorithm ----
FAMILY_SIZES = {"1M": 1 << 20, "16M": 16 << 20}
FAMILY = {  # name -> (pyquant/bitsandbytes class name, kwargs, torch factory or None)
    "Lion": ("Lion8bit", dict(lr=1e-4), None),
    "SGD": ("SGD8bit", dict(lr=1e-2, momentum=0.9), lambda ps, **kw: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, **kw)),
    "RMSprop": ("RMSprop8bit", dict(lr=1e-2), lambda ps, **kw: torch.optim.RMSprop(ps, lr=1e-2, **kw)),
    "Adagrad": ("Adagrad8bit", dict(lr=1e-2), lambda ps, **kw: torch.optim.Adagrad(ps, lr=1e-2, **kw)),
    "AdEMAMix": ("AdEMAMix8bit", dict(lr=1e-3), None),  # torch has no AdEMAMix
    # bitsandbytes' LAMB8bit / LARS8bit are its AdamW8bit / SGD8bit (no trust ratio); torch has neither
    "LAMB": ("LAMB8bit", dict(lr=1e-3, weight_decay=1e-2), None),
    "LARS": ("LARS8bit", dict(lr=1e-2, momentum=0.9), None),
}
IMPLS = ("pyquant", "bitsandbytes", "torch(fused)", "torch(foreach)")


def _runs(family: dict) -> list:
    return [(algo, impl) for algo in family for impl in IMPLS
            if not (impl.startswith("torch") and family[algo][2] is None)
            and not (impl == "bitsandbytes" and family[algo][0] in NOT_IN_BITSANDBYTES)
            and (algo, impl) != ("RMSprop", "torch(fused)")]  # torch 2.14's RMSprop has no fused step


NOT_IN_BITSANDBYTES = {"AdamW4bit"}
FAMILY_RUNS = _runs(FAMILY)


def _family_optimizer(impl, cls_name, kwargs, torch_make, params, request):
    """pyquant's or bitsandbytes' class `cls_name`, or torch's float32 optimizer (fused or foreach), over `params`."""
    if impl == "pyquant":
        return getattr(pyquant, cls_name)(params, **kwargs)
    if impl == "bitsandbytes":
        return getattr(request.getfixturevalue("bnb").optim, cls_name)(params, **kwargs)
    return torch_make(params, **({"fused": True} if impl == "torch(fused)" else {"foreach": True}))


@pytest.mark.parametrize("size", list(FAMILY_SIZES))
@pytest.mark.parametrize("algo,impl", FAMILY_RUNS)
def test_family_step(benchmark, size, algo, impl, request):
    cls_name, kwargs, torch_make = FAMILY[algo]
    n = FAMILY_SIZES[size]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g))]
    params[0].grad = torch.randn(n, generator=g) * 1e-2
    opt = _family_optimizer(impl, cls_name, kwargs, torch_make, params, request)
    opt.step()
    benchmark.group = f"{algo} step {size} float32 params"
    benchmark.pedantic(opt.step, rounds=5 if n > FAMILY_SIZES["1M"] else 10, warmup_rounds=1)
    benchmark.extra_info.update(params=n, **{"state bytes/param": _state_bytes(opt) / n})


# ---- every family over DenseNet-121's parameter list (364 tensors, 8.0M parameters; weights not needed) ----
DENSENET_FAMILY = {
    "Adam": ("Adam8bit", dict(lr=1e-3), lambda ps, **kw: torch.optim.Adam(ps, lr=1e-3, **kw)),
    **FAMILY,
    # 4-bit states against torch's float32 AdamW (bitsandbytes has no 4-bit optimizer)
    "AdamW4bit": ("AdamW4bit", dict(lr=1e-3), lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-3, **kw)),
}
DENSENET_RUNS = _runs(DENSENET_FAMILY)
_DENSENET_SHAPES: list = []


def densenet121_shapes() -> list:
    if not _DENSENET_SHAPES:
        import timm

        _DENSENET_SHAPES.extend(p.shape for p in timm.create_model("densenet121", pretrained=False).parameters())
    return _DENSENET_SHAPES


@pytest.mark.parametrize("algo,impl", DENSENET_RUNS)
def test_family_step_densenet121(benchmark, algo, impl, request):
    cls_name, kwargs, torch_make = DENSENET_FAMILY[algo]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in densenet121_shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    opt = _family_optimizer(impl, cls_name, kwargs, torch_make, params, request)
    opt.step()
    n = sum(p.numel() for p in params)
    benchmark.group = f"{algo} step DenseNet-121 parameter list"
    benchmark.pedantic(opt.step, rounds=3 if impl == "bitsandbytes" else 10, warmup_rounds=1)
    benchmark.extra_info.update(params=n, tensors=len(params), **{"state bytes/param": _state_bytes(opt) / n})
# ---- LAMB8bit and LARS8bit (a norm pass, then Adam's or the momentum step) against the step without the ratio ----
# Bytes per parameter: LAMB's norm pass reads p, g and both codes (10), Adam's step moves 16; LARS' norm pass reads
# p and g (8), the 8-bit momentum step reads p, g and a code and writes p and the code (14).
TRUST = {  # name -> (pyquant class, kwargs, bytes per parameter)
    "LAMB8bit": ("LAMB8bit", dict(lr=1e-3, weight_decay=1e-2), 26),
    "AdamW8bit": ("AdamW8bit", dict(lr=1e-3, weight_decay=1e-2), 16),
    "LARS8bit": ("LARS8bit", dict(lr=1e-2, momentum=0.9), 22),
    "SGD8bit": ("SGD8bit", dict(lr=1e-2, momentum=0.9), 14),
}


@pytest.mark.parametrize("size", list(FAMILY_SIZES))
@pytest.mark.parametrize("name", list(TRUST))
def test_trust_ratio_step(benchmark, size, name):
    cls_name, kwargs, per_param = TRUST[name]
    n = FAMILY_SIZES[size]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g))]
    params[0].grad = torch.randn(n, generator=g) * 1e-2
    opt = getattr(pyquant, cls_name)(params, **kwargs)
    opt.step()
    benchmark.group = f"{'LAMB' if name in ('LAMB8bit', 'AdamW8bit') else 'LARS'} step {size} float32 params"
    benchmark.pedantic(opt.step, rounds=5 if n > FAMILY_SIZES["1M"] else 10, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(params=n, bytes=per_param * n, **{"GB/s": per_param * n / seconds / 1e9})
