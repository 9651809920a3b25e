"""Every Triton kernel launch that the tests make also compiles for a real GPU (sm_90), without a GPU.

Triton's interpreter runs kernel bodies as numpy code and checks none of the rules of the compiler: on the first
real GPU run, the Adam kernel was rejected because a name held a uint8 pointer in one branch of a run-time `if`
and a float32 pointer in the other ("Mismatched type for s1_ptr between then block and else block"), although
every interpreted test passed. This test records the launches of pyquant's launchers under the interpreter
(kernel, argument types, constexprs, launch options) and compiles each distinct one with Triton's compiler for
a Hopper target, in a process without TRITON_INTERPRET. Compiling needs no GPU: only ptxas, which Triton ships.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import pyquant  # noqa: E402
from pyquant import backends  # noqa: E402
from pyquant import functional as F  # noqa: E402

if not backends.triton_interpreted():  # pragma: no cover - on a GPU machine the launches compile for real in the
    # tests marked `triton`
    pytest.skip("needs the Triton interpreter (no GPU): with a GPU the kernels are compiled by their tests", allow_module_level=True)
pytestmark = pytest.mark.triton

TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                   torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                   torch.bool: "i1"}

COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib

failures = []
for launch in json.loads(sys.stdin.read()):
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    while not isinstance(kernel, triton.runtime.JITFunction):  # an Autotuner or Heuristics wraps it
        kernel = kernel.fn
    signature, constexprs = {}, {}
    for param in kernel.params:
        kind, value = launch["args"][param.name]
        if param.is_constexpr:
            constexprs[param.name] = value
            signature[param.name] = "constexpr"
        elif kind == "tensor":
            signature[param.name] = "*" + value
        elif kind == "int":
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif kind == "float":
            signature[param.name] = "fp32"
        else:
            constexprs[param.name] = value
            signature[param.name] = "constexpr"
    try:
        triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=launch["options"])
    except Exception as exc:
        failures.append(f"{launch['name']} {constexprs}: {type(exc).__name__}: {str(exc)[-1500:]}")
print(json.dumps(failures))
"""


def _describe(value):
    if isinstance(value, torch.Tensor):
        return ["tensor", TORCH_TO_TRITON[value.dtype]]
    if isinstance(value, bool) or value is None:
        return ["other", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if isinstance(value, torch.dtype):  # no launcher passes one today; a clear failure if one starts to
        raise TypeError("a torch.dtype kernel argument: describe it in this test")
    return ["other", value]


@pytest.fixture
def recorded_launches(monkeypatch):
    """Every interpreted launch: {module, name, args: {param: [kind, value]}, options}, distinct ones only."""
    from triton.runtime import interpreter

    launches: dict[str, dict] = {}
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = list(self.arg_names)
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names}
        launch = {"module": self.fn.__module__, "name": self.fn.__name__,
                  "args": {k: _describe(v) for k, v in bound.items()}, "options": options}
        launches[json.dumps(launch, sort_keys=True)] = launch
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    return launches


def _exercise_every_launcher():
    """Small calls that reach every Triton launcher with each dtype it specialises on."""
    from pyquant.amp import unscale_
    from pyquant.ops import lowrank_conv2d, matmul

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    with backends.use_backend("triton"):
        for dtype in dtypes:
            x = torch.randn(300).to(dtype)
            q, absmax = F.quantize_blockwise(x, blocksize=64)
            F.dequantize_blockwise(q, absmax, blocksize=64, dtype=dtype)
            # an 8-bit-state tensor and a 32-bit-state one (below min_8bit_size) in one group
            params = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in (4096 + 3, 10)]
            for p in params:
                p.grad = torch.randn(p.shape).to(dtype)
            pyquant.Adam8bit(params).step()
            # the one-state kernel, one compile per rule
            for name, kwargs in (("SGD8bit", dict(lr=0.1, momentum=0.9)), ("Lion8bit", {}), ("RMSprop8bit", {}),
                                 ("Adagrad8bit", {})):
                getattr(pyquant, name)(params, **kwargs).step()
            pyquant.AdEMAMix8bit(params).step()
            # 4-bit states: rank-1 (2-D), block-wise (1-D), float32 (small)
            four = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in ((64, 65), (4099,), (10,))]
            for p in four:
                p.grad = torch.randn(p.shape).to(dtype)
            pyquant.AdamW4bit(four).step()
            # LAMB's and LARS' norm passes (and their steps: Adam's and the momentum rule)
            pyquant.LAMB8bit(params).step()
            pyquant.LARS8bit(params, lr=0.1, momentum=0.9).step()
        grads = [torch.randn(5).to(d) for d in (*dtypes, torch.float64)]
        unscale_(grads, torch.zeros(1), torch.full((1,), 0.5))
        for dtype in (torch.float16, torch.bfloat16):
            matmul(torch.randn(5, 7).to(dtype), torch.randn(7, 3).to(dtype))
            x = torch.randn(1, 4, 6, 6).to(dtype)
            w1, w2 = torch.randn(2, 4, 3, 3).to(dtype), torch.randn(5, 2, 1, 1).to(dtype)
            lowrank_conv2d(x, w1, w2, None, stride=1, padding=1)


def test_every_triton_launch_compiles_for_sm90(recorded_launches):
    _exercise_every_launcher()
    launches = list(recorded_launches.values())
    names = {launch["name"] for launch in launches}
    expected = {"_quantize_kernel", "_dequantize_kernel", "_adam_kernel", "_one_state_kernel", "_ademamix_kernel",
                "_unscale_kernel", "_adam4bit_kernel", "_rank1_maxima_kernel", "_lamb_norms_kernel", "_lars_norms_kernel"}
    assert expected <= names, names
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(launches), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(failures)
