"""Compress a trained model without data: SVD low-rank factorisation and data-free neuron pruning.

- `lowrank(model, energy=0.9 | rank_ratio=... | param_budget=... | rank=..., layers=None,
  example_input=None) -> (model, report)`: replaces nn.Conv2d (groups=1, zero padding) and nn.Linear
  layers by truncated-SVD factorisations (Denton et al., NeurIPS 2014: the weight reshaped
  [out, in * kh * kw], a k x k conv into `rank` channels then a 1 x 1 conv): `pyquant.nn.LowRankConv2d`
  (the fused kernel) and `pyquant.nn.lowrank.LowRankLinear`. The rank of each layer comes from the
  retained spectral energy, a fraction of its full rank, a fixed rank, or a global parameter budget
  shared between layers; a layer is kept when the factorisation would not be cheaper.
- `prune_neurons(model, amount=..., layers=None, example_input=None) -> (model, report)`: Srinivas & Babu
  (BMVC 2015): in consecutive nn.Linear layers of an nn.Sequential (element-wise activations between),
  repeatedly merge the hidden neuron of lowest saliency into its most similar twin (outgoing weights
  added) and remove it for real: the layers get smaller, nothing is masked.

Both deep-copy the model (the argument is never modified) and return an ordinary nn.Module, plus a
`CompressionReport` with a row per layer considered: what was done, parameters and FLOPs before and
after, the relative reconstruction error (low rank) or the saliency of the last removal (pruning), or
why the layer was skipped. Bad requests raise ValueError / TypeError with the reason.
docs/compress.md has a worked example.

Modules: factorize.py (`lowrank`), prune.py (`prune_neurons`, `ELEMENTWISE`), report.py
(`CompressionReport`, `LayerReport`), _modules.py (model-walking helpers both methods use).
Import from `pyquant.compress`; the module split is not part of the API.
"""

from .factorize import lowrank
from .prune import ELEMENTWISE, prune_neurons
from .report import CompressionReport, LayerReport

__all__ = ["lowrank", "prune_neurons", "CompressionReport", "LayerReport", "ELEMENTWISE"]
