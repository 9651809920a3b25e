"""Importance sampling during training (Katharopoulos & Fleuret, ICML 2018, "Not all samples are created equal").

Each sample's score is an upper bound of its gradient norm, up to a constant shared by all samples: the norm of the
loss's gradient with respect to the logits, which for softmax cross-entropy is ``||softmax(z) - onehot(y)||``
(one forward pass, no backward). While importance sampling is on, each step draws a presample of B samples uniformly
(with replacement), scores them, draws the b training samples from them with probability p_i = s_i / sum(s)
(with replacement) and weights sample i by 1 / (B p_i), which keeps the gradient estimate unbiased. It is switched on
once the expected variance reduction pays for the extra forward passes: tau = 1 / sqrt(1 - ||g - u||^2 / ||g||^2)
(g the normalised scores, u uniform), kept as a moving average (momentum 0.9, starting at 0), must exceed
tau_th = (B + 3b) / (3b) (a backward pass costs about two forward passes). Before that, batches are uniform and tau
is updated from the scores of the training batches, which the training forward pass gives for free.

Outside the harness::

    sampler = ImportanceSampler(len(dataset), batch_size=32, seed=0)
    loader = sampler.loader(dataset)                      # a DataLoader with batch_sampler=sampler
    for x, y in loader:
        x, y = sampler.select(model, x, y)                # b of the B presampled (no-op while uniform)
        loss = sampler.loss(model(x), y)                  # weighted mean cross-entropy; updates tau while uniform
        optimizer.zero_grad(); loss.backward(); optimizer.step()

The switch takes effect on the next batch the loader asks for: with ``num_workers > 0`` batches already prefetched
keep their size, which ``select`` handles.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler


@torch.no_grad()
def gradient_norm_bound(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample ``||d CE / d logits||_2 = ||softmax(logits) - onehot(targets)||_2`` in float32: the score of the
    paper (its upper bound of the per-sample gradient norm, up to a constant that cancels in p)."""
    if logits.dim() != 2 or targets.dim() != 1 or len(logits) != len(targets):
        raise ValueError(f"logits must be (n, classes) and targets (n,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    residual = logits.float().softmax(dim=1)
    residual[torch.arange(len(targets), device=logits.device), targets] -= 1.0
    return residual.norm(dim=1)


def importance_weights(probabilities: torch.Tensor, presample_size: int) -> torch.Tensor:
    """Unbiased weights 1 / (B p_i) of the samples drawn with probabilities ``p_i`` from a presample of B."""
    return 1.0 / (presample_size * probabilities)


def variance_reduction(scores: torch.Tensor) -> float:
    """tau = 1 / sqrt(1 - ||g - u||^2 / ||g||^2), g = scores / sum(scores), u = 1/n: 1 for uniform scores, sqrt(n)
    when one sample holds all the score. All-zero scores count as uniform."""
    s = scores.detach().double().flatten()
    total = s.sum()
    if total <= 0:
        return 1.0
    g = s / total
    ratio = ((g - 1.0 / len(s)) ** 2).sum() / (g**2).sum()
    return float(1.0 / torch.sqrt(1.0 - ratio)) if ratio < 1 else math.inf


class ImportanceSampler(Sampler[list[int]]):
    """A batch sampler over ``n`` samples with the paper's presampling, weights and switch.

    ``presample``: B = int(presample * batch_size) (the paper's default 3). ``tau_threshold``: None for
    (B + 3b) / (3b). ``steps_per_epoch``: None for ceil(n / b) batches, as many steps as an epoch of uniform batches.
    While uniform, batches are successive slices of a seeded permutation (reshuffled when used up), so the sampler
    starts out exactly like a shuffled loader without replacement. ``forward_batch_size`` bounds the scoring pass.
    """

    def __init__(self, n: int, batch_size: int, presample: float = 3.0, tau_threshold: float | None = None,
                 momentum: float = 0.9, steps_per_epoch: int | None = None, seed: int = 0,
                 forward_batch_size: int | None = None):
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"importance sampling needs at least 2 samples, got {n!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not presample > 1:
            raise ValueError(f"presample must be > 1 (B = presample x batch size), got {presample!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.presample_size = int(presample * self.batch_size)
        b, big = self.batch_size, self.presample_size
        self.tau_threshold = (big + 3 * b) / (3 * b) if tau_threshold is None else float(tau_threshold)
        self.momentum = momentum
        self.steps_per_epoch = steps_per_epoch or math.ceil(n / self.batch_size)
        self.forward_batch_size = forward_batch_size or self.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.tau = 0.0
        self.active = False  # importance sampling on
        self.steps = self.importance_steps = 0
        self._weights: torch.Tensor | None = None
        self._order = torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps_per_epoch):
            self.active = self.tau > self.tau_threshold
            self.steps += 1
            if self.active:
                self.importance_steps += 1
                yield torch.randint(self.n, (self.presample_size,), generator=self.generator).tolist()
            else:
                yield self._uniform_batch()

    def _uniform_batch(self) -> list[int]:
        if len(self._order) < self.batch_size:
            fresh = torch.randperm(self.n, generator=self.generator)
            self._order = torch.cat([self._order, fresh])
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size:]
        return batch.tolist()

    def loader(self, dataset, num_workers: int = 0, **kwargs) -> DataLoader:
        if len(dataset) != self.n:
            raise ValueError(f"the sampler is for {self.n} samples, the dataset has {len(dataset)}")
        return DataLoader(dataset, batch_sampler=self, num_workers=num_workers, **kwargs)

    def update_tau(self, scores: torch.Tensor) -> None:
        self.tau = self.momentum * self.tau + (1 - self.momentum) * variance_reduction(scores)

    @torch.no_grad()
    def score(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
        """Scores of a presample, the model in eval mode (batch norm uses its running statistics, dropout is off)."""
        was_training = model.training
        model.eval()
        try:
            parts = []
            for start in range(0, len(x), self.forward_batch_size):
                with autocast():
                    logits = model(x[start:start + self.forward_batch_size])
                parts.append(gradient_norm_bound(logits, y[start:start + self.forward_batch_size]))
        finally:
            model.train(was_training)
        return torch.cat(parts)

    def select(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        """The batch to train on: ``(x, y)`` unchanged while uniform; while importance sampling, ``batch_size`` of the
        presampled drawn with p = scores / sum(scores), their weights 1 / (B p) kept for :meth:`loss`."""
        if len(x) <= self.batch_size:  # a uniform batch
            self._weights = None
            return x, y
        scores = self.score(model, x, y, autocast)
        self.update_tau(scores)
        total = scores.sum()
        if not torch.isfinite(total) or total <= 0:  # every score 0 (or not finite): nothing to prefer
            p = torch.full_like(scores, 1.0 / len(scores))
        else:
            p = scores / total
        picks = torch.multinomial(p.cpu(), self.batch_size, replacement=True, generator=self.generator).to(p.device)
        self._weights = importance_weights(p[picks], len(scores))
        picks = picks.to(x.device)
        return x[picks], y[picks]

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy, weighted by 1 / (B p) when the batch was importance-sampled. For a uniform batch its
        scores update tau (they come from these logits, no extra pass)."""
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        if self._weights is None:
            self.update_tau(gradient_norm_bound(logits.detach(), y))
            return losses.mean()
        weights, self._weights = self._weights.to(losses.device), None
        return (losses * weights).mean()

    def summary(self) -> dict:
        return {"presample_size": self.presample_size, "batch_size": self.batch_size, "tau_threshold": self.tau_threshold,
                "tau": self.tau, "steps": self.steps, "importance_steps": self.importance_steps}
