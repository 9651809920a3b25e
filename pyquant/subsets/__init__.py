"""Less data, same accuracy: informative subset selection before and during training.

Before training, from embeddings (an ``(N, D)`` array: a model's penultimate features or anything else):
:func:`moderate_coreset` (Xia et al. 2023), :func:`kcenter_greedy`, :func:`herding`, :func:`random_subset`.
During training: :class:`ImportanceSampler` (Katharopoulos & Fleuret 2018), a ``torch.utils.data.Sampler`` of
batches plus the per-sample loss weights. Via a proxy (Coleman et al. 2020): :func:`train_proxy`,
:func:`penultimate_features`, :func:`select_via_proxy`. All return index tensors, usable with
``torch.utils.data.Subset``; in the study harness the same methods are settings (``subset:moderate@0.5``,
``amp+8bit+subset:proxy@0.25``, ``importance-sampling``; see :mod:`pyquant.experiment.subset_settings`). Docs: docs/subsets.md.
The package is a plain library: it never imports the harness (pyquant.experiment).
"""

from pyquant.subsets.importance import ImportanceSampler, gradient_norm_bound, importance_weights, variance_reduction
from pyquant.subsets.proxy import (
    PROXY_RANKINGS,
    ForgettingEvents,
    entropy,
    least_confidence,
    penultimate_features,
    select_via_proxy,
    train_proxy,
)
from pyquant.subsets.selection import herding, kcenter_greedy, moderate_coreset, random_subset, subset_size

__all__ = [
    "PROXY_RANKINGS", "ForgettingEvents", "ImportanceSampler", "entropy", "gradient_norm_bound", "herding",
    "importance_weights", "kcenter_greedy", "least_confidence", "moderate_coreset", "penultimate_features",
    "random_subset", "select_via_proxy", "subset_size", "train_proxy", "variance_reduction",
]
