"""Selection via proxy (Coleman et al., ICLR 2020): train a cheap proxy (a smaller model, or the target model trained
briefly), rank the training samples with it, and train the target on the top of the ranking.

Rankings (as in the authors' code): ``least_confidence`` (lowest top-class softmax probability first), ``entropy``
(highest predictive entropy first), ``forgetting`` (most forgetting events during the proxy's training first; a
sample never classified correctly counts as infinitely forgotten), ``kcenter`` (greedy k-centre on the proxy's
penultimate features). The proxy's penultimate features are also what :func:`moderate_coreset` needs when no
pretrained feature extractor exists.

    forgetting = train_proxy(proxy, train_set, epochs=3, lr=3e-4)
    features, logits, labels = penultimate_features(proxy, DataLoader(train_set, batch_size=64))
    keep = select_via_proxy("least_confidence", 0.5, logits=logits)
    target_set = torch.utils.data.Subset(train_set, keep.tolist())
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pyquant.subsets.selection import as_features, kcenter_greedy, random_subset, subset_size

PROXY_RANKINGS = ("least_confidence", "entropy", "forgetting", "kcenter", "random")


def classifier_of(model: nn.Module) -> nn.Module:
    """The final classifier layer: timm's ``get_classifier()``, else the last ``nn.Linear`` in the model."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to take penultimate features from")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, loader, transform: Callable | None = None,
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """One pass in eval mode: (penultimate features (N, D), logits (N, C), labels (N,)), float32 on the CPU.
    The features are the classifier's input (for timm CNNs: the globally pooled features), caught by a hook."""
    captured = []
    hook = classifier_of(model).register_forward_pre_hook(lambda module, args: captured.append(args[0].flatten(1)))
    was_training = model.training
    model.eval()
    features, logits, labels = [], [], []
    try:
        for x, y in loader:
            x = transform(x) if transform is not None else x
            with autocast():
                out = model(x)
            features.append(captured.pop().float().cpu())
            logits.append(out.float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


def least_confidence(logits: torch.Tensor) -> torch.Tensor:
    """1 - the top-class softmax probability: higher = less confident."""
    return 1.0 - logits.double().softmax(dim=1).max(dim=1).values


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy in nats: higher = more uncertain."""
    logp = logits.double().log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1)


class ForgettingEvents:
    """Forgetting events (Toneva et al. 2019) of ``n`` samples: how often a sample goes from correctly to wrongly
    classified between two of its presentations in training. A sample never classified correctly scores inf."""

    def __init__(self, n: int):
        self.previous = torch.zeros(n, dtype=torch.bool)
        self.learned = torch.zeros(n, dtype=torch.bool)
        self.events = torch.zeros(n, dtype=torch.int64)

    def update(self, indices: torch.Tensor, correct: torch.Tensor) -> None:
        indices, correct = indices.cpu().long(), correct.cpu().bool()
        self.events[indices] += (self.previous[indices] & ~correct).long()
        self.previous[indices] = correct
        self.learned[indices] |= correct

    def scores(self) -> torch.Tensor:
        return torch.where(self.learned, self.events.double(), math.inf)


class _WithIndex(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


def train_proxy(model: nn.Module, dataset, epochs: int, lr: float, batch_size: int = 32, seed: int = 0,
                transform: Callable | None = None, device: torch.device | str = "cpu",
                optimizer: torch.optim.Optimizer | None = None) -> ForgettingEvents:
    """Train ``model`` (float32, Adam unless ``optimizer`` is given) for ``epochs`` shuffled passes over ``dataset``,
    counting forgetting events on the training batches as it goes (as Coleman et al. do)."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"proxy epochs must be a positive integer, got {epochs!r}")
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    forgetting = ForgettingEvents(len(dataset))
    generator = torch.Generator().manual_seed(seed)
    drop_last = len(dataset) % batch_size == 1  # a batch of one breaks batch norm in training mode
    loader = DataLoader(_WithIndex(dataset), batch_size=batch_size, shuffle=True, generator=generator, drop_last=drop_last)
    model.train()
    for _ in range(epochs):
        for x, y, i in loader:
            x = transform(x) if transform is not None else x.to(device)
            y = y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            forgetting.update(i, logits.detach().argmax(dim=1) == y)
    return forgetting


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores (ties: lower index first), ascending."""
    order = torch.argsort(-scores.double(), stable=True)  # -inf < ... so +inf scores come first
    return order[:k].sort().values


def select_via_proxy(ranking: str, fraction: float, logits=None, features=None,
                     forgetting: ForgettingEvents | None = None, seed: int = 0) -> torch.Tensor:
    """Keep round(N * fraction) samples by the proxy's ``ranking`` (see PROXY_RANKINGS); returns indices, ascending
    (k-centre: in the order chosen, starting from one sample drawn with ``seed``)."""
    needs = {"least_confidence": logits, "entropy": logits, "forgetting": forgetting, "kcenter": features,
             "random": logits if logits is not None else features}
    if ranking not in needs:
        raise ValueError(f"unknown proxy ranking {ranking!r}; use one of {', '.join(PROXY_RANKINGS)}")
    source = needs[ranking]
    if source is None:
        what = {"forgetting": "forgetting", "kcenter": "features"}.get(ranking, "logits")
        raise ValueError(f"ranking {ranking!r} needs {what}")
    if ranking == "forgetting":
        scores = forgetting.scores()
        return _top(scores, subset_size(len(scores), fraction))
    values = as_features(source, "logits" if ranking != "kcenter" else "features")
    k = subset_size(len(values), fraction)
    if ranking == "least_confidence":
        return _top(least_confidence(values), k)
    if ranking == "entropy":
        return _top(entropy(values), k)
    if ranking == "kcenter":
        return kcenter_greedy(values, k, seed=seed)
    return random_subset(len(values), fraction, seed)
