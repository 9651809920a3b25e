"""pyquant's layers. Imported lazily, so `import pyquant.nn` stays cheap."""

import importlib

_LAYERS = {
    "LowRankConv2d": "pyquant.nn.lowrank",
    "Linear16": "pyquant.nn.half_precision",
    "Conv2d16": "pyquant.nn.half_precision",
    "half": "pyquant.nn.half_precision",
    "StableEmbedding": "pyquant.nn.embedding",
}
__all__ = sorted(_LAYERS)


def __getattr__(name):
    if name in _LAYERS:
        return getattr(importlib.import_module(_LAYERS[name]), name)
    raise AttributeError(f"module 'pyquant.nn' has no attribute {name!r}")
