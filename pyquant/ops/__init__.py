"""pyquant's compute ops beyond quantisation (each a torch.library custom op with several backends)."""

import importlib

_OPS = {"matmul": "pyquant.ops.gemm", "linear": "pyquant.ops.gemm", "lowrank_conv2d": "pyquant.ops.lowrank_conv"}
__all__ = sorted(_OPS)


def __getattr__(name):
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name]), name)
    raise AttributeError(f"module 'pyquant.ops' has no attribute {name!r}")
