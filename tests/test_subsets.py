"""pyquant.subsets: the published rules on small synthetic cases with known answers, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pyquant.subsets import (
    ForgettingEvents,
    ImportanceSampler,
    entropy,
    gradient_norm_bound,
    herding,
    importance_weights,
    kcenter_greedy,
    least_confidence,
    moderate_coreset,
    penultimate_features,
    random_subset,
    select_via_proxy,
    subset_size,
    train_proxy,
    variance_reduction,
)


def _blobs(n_per_class=40, dims=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0] * dims, [6.0] * dims])
    x = torch.cat([centres[k] + torch.randn(n_per_class, dims, generator=g) for k in range(2)])
    y = torch.arange(2).repeat_interleave(n_per_class)
    return x, y


# ---- moderate coreset ----
def _published_moderate(x: np.ndarray, y: np.ndarray, rate: float) -> np.ndarray:
    """The reference rule written out independently in numpy: median class centre, distance to the own centre, one
    global ranking, ranks [round(N(0.5 - r/2)), round(N(0.5 + r/2))) kept."""
    centres = {k: np.median(x[y == k], axis=0) for k in np.unique(y)}
    d = np.array([np.linalg.norm(x[i] - centres[y[i]]) for i in range(len(x))])
    order = np.argsort(d, kind="stable")
    n = len(x)
    return np.sort(order[round(n * (0.5 - rate / 2)):round(n * (0.5 + rate / 2))])


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_moderate_matches_the_published_rule(rate):
    x, y = _blobs(37, 4, seed=1)
    y[::7] = 1 - y[::7]  # some label noise
    keep = moderate_coreset(x, y, rate)
    np.testing.assert_array_equal(keep.numpy(), _published_moderate(x.double().numpy(), y.numpy(), rate))


def test_moderate_keeps_the_median_band_with_half_to_even_rounding():
    # One class on a line: the median centre is 4.5 for 0..9, distances are 0.5, 0.5, 1.5, 1.5, ... (ties by index).
    # r = 0.5 of N = 10 keeps ranks round(2.5) = 2 .. round(7.5) = 8, i.e. six samples, not five.
    x = torch.tensor([[float(v)] for v in [4, 5, 3, 6, 2, 7, 1, 8, 0, 9]])
    y = torch.zeros(10, dtype=torch.long)
    keep = moderate_coreset(x, y, 0.5)
    assert sorted(x[keep].flatten().tolist()) == [1.0, 2.0, 3.0, 6.0, 7.0, 8.0]
    assert moderate_coreset(x, y, 1.0).tolist() == list(range(10))


def test_moderate_drops_outliers_duplicates_at_the_centre_and_noisy_labels():
    x, y = _blobs(40, 3, seed=2)
    outlier = torch.full((1, 3), 100.0)
    at_centre = torch.median(x[y == 0], dim=0).values.repeat(5, 1)  # redundant copies of the class-0 centre
    mislabelled = torch.full((1, 3), 6.0)  # sits on class 1's centre, labelled 0
    x = torch.cat([x, outlier, at_centre, mislabelled])
    y = torch.cat([y, torch.tensor([0] * 7)])
    keep = set(moderate_coreset(x, y, 0.6).tolist())
    n = 80
    assert n not in keep  # the far outlier
    assert not keep & set(range(n + 1, n + 6))  # the duplicated centre points
    assert n + 6 not in keep  # the mislabelled sample
    assert len(keep) == round(len(x) * 0.8) - round(len(x) * 0.2)


def test_moderate_per_class_keeps_every_class():
    # 30 tight samples of class 0, 10 spread-out ones of class 1: every class-1 distance ranks above every class-0
    # one, so the global band (ranks 10..29 of 40) is all class 0; the per-class variant takes each class's band.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.1 * torch.randn(30, 2, generator=g), 10 + 5 * torch.randn(10, 2, generator=g)])
    y = torch.tensor([0] * 30 + [1] * 10)
    assert torch.bincount(y[moderate_coreset(x, y, 0.5)], minlength=2).tolist() == [20, 0]
    per_class = moderate_coreset(x, y, 0.5, per_class=True)
    assert torch.bincount(y[per_class]).tolist() == [14, 6]  # ranks 8..21 of 30 and 2..7 of 10
    expected = set()
    for k in range(2):  # the published rule applied to each class alone
        members = (y == k).nonzero().flatten()
        expected |= set(members[moderate_coreset(x[members], torch.zeros(len(members), dtype=torch.long), 0.5)].tolist())
    assert set(per_class.tolist()) == expected


def test_moderate_mean_centre_is_the_papers_variant():
    x = torch.tensor([[0.0], [1.0], [2.0], [30.0]])  # median 1.5, mean 8.25
    y = torch.zeros(4, dtype=torch.long)
    # median: distances 1.5, 0.5, 0.5, 28.5 -> ranks 1..2 are samples 2, 0; mean: 8.25, 7.25, 6.25, 21.75 -> 1, 0
    assert moderate_coreset(x, y, 0.5, centre="median").tolist() == [0, 2]
    assert moderate_coreset(x, y, 0.5, centre="mean").tolist() == [0, 1]


# ---- k-centre greedy and herding ----
def test_kcenter_known_order_on_a_line():
    x = torch.arange(11, dtype=torch.float32)[:, None]
    assert kcenter_greedy(x, 4, initial=[0]).tolist() == [0, 10, 5, 2]


def test_kcenter_takes_one_of_each_duplicate_cluster_and_the_outlier():
    cluster = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]).repeat_interleave(6, dim=0)  # 3 points, 6 copies
    x = torch.cat([cluster, torch.tensor([[50.0, 50.0]])])
    for seed in range(5):
        picks = kcenter_greedy(x, 4, seed=seed)
        assert len(set(picks.tolist())) == 4
        assert 18 in picks[:2].tolist()  # the far outlier is the first or second pick
        assert {tuple(p) for p in x[picks].tolist()} == {(0.0, 0.0), (5.0, 0.0), (0.0, 5.0), (50.0, 50.0)}
    assert len(set(kcenter_greedy(x, 19).tolist())) == 19  # only duplicates left: still distinct indices


def test_herding_matches_the_mean_and_avoids_the_outlier():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(200, 4, generator=g), torch.full((1, 4), 40.0)])
    picks = herding(x, 20)
    assert len(set(picks.tolist())) == 20 and 200 not in picks.tolist()
    # The first pick is the sample nearest the mean.
    assert int(picks[0]) == int((x - x.mean(0)).norm(dim=1).argmin())
    err = (x[picks].mean(0) - x.mean(0)).norm()
    random_errs = [(x[random_subset(201, 20 / 201, seed=s)].mean(0) - x.mean(0)).norm() for s in range(20)]
    assert err < min(random_errs)


def test_random_subset_is_seeded_and_sized():
    a, b = random_subset(100, 0.25, seed=1), random_subset(100, 0.25, seed=1)
    assert torch.equal(a, b) and len(a) == 25 and len(a.unique()) == 25 and a.min() >= 0 and a.max() < 100
    assert not torch.equal(a, random_subset(100, 0.25, seed=2))
    assert subset_size(10, 0.25) == 2 and subset_size(3, 0.01) == 1  # round half to even, at least one


# ---- bad input ----
@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, math.nan, math.inf])
def test_fraction_outside_0_1_is_refused(fraction):
    x, y = _blobs(5, 2)
    with pytest.raises(ValueError, match="fraction"):
        moderate_coreset(x, y, fraction)
    with pytest.raises(ValueError, match="fraction"):
        random_subset(10, fraction)
    with pytest.raises(ValueError, match="fraction"):
        select_via_proxy("entropy", fraction, logits=torch.randn(10, 2))


def test_bad_embeddings_and_labels_are_refused():
    x, y = _blobs(5, 2)
    with pytest.raises(ValueError, match="different lengths: 10 embeddings, 9 labels"):
        moderate_coreset(x, y[:9], 0.5)
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no samples"):
        moderate_coreset(x, torch.where(y == 1, 2, 0), 0.5)
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] have no samples"):
        moderate_coreset(x, y, 0.5, num_classes=3)
    bad = x.clone()
    bad[3, 1] = math.nan
    for call in (lambda: moderate_coreset(bad, y, 0.5), lambda: kcenter_greedy(bad, 3), lambda: herding(bad, 3)):
        with pytest.raises(ValueError, match="NaN or infinite values in 1 sample.*index 3"):
            call()
    with pytest.raises(ValueError, match="2-D"):
        moderate_coreset(x[:, 0], y, 0.5)
    with pytest.raises(ValueError, match="integer class indices"):
        moderate_coreset(x, y.float() + 0.5, 0.5)
    with pytest.raises(ValueError, match="0..C-1"):
        moderate_coreset(x, y - 1, 0.5)
    with pytest.raises(ValueError, match="selects none"):
        moderate_coreset(x[:2], torch.tensor([0, 1]), 0.2)
    for budget in (0, 11, 2.5):
        with pytest.raises(ValueError, match="budget"):
            kcenter_greedy(x, budget)
    with pytest.raises(ValueError, match="initial"):
        kcenter_greedy(x, 3, initial=[0, 0])
    with pytest.raises(TypeError, match="fraction"):
        moderate_coreset(x, y, "0.5")


# ---- importance sampling ----
def test_score_is_the_gradient_norm_with_respect_to_the_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g, requires_grad=True)
    y = torch.randint(5, (8,), generator=g)
    F.cross_entropy(logits, y, reduction="sum").backward()
    torch.testing.assert_close(gradient_norm_bound(logits.detach(), y), logits.grad.norm(dim=1))


def test_weights_are_1_over_B_p_and_unbiased():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    torch.testing.assert_close(importance_weights(p, 4), torch.tensor([0.5, 1.0, 2.0, 2.0]))
    # E_p[w_i L_i] = sum_i p_i L_i / (B p_i) = mean of the presample's losses.
    losses = torch.tensor([3.0, 1.0, 0.5, 7.0])
    assert float((p * importance_weights(p, 4) * losses).sum()) == pytest.approx(float(losses.mean()))


def test_variance_reduction_tau_known_values():
    assert variance_reduction(torch.ones(12)) == pytest.approx(1.0)
    one_hot = torch.zeros(16)
    one_hot[3] = 2.0
    assert variance_reduction(one_hot) == pytest.approx(4.0)  # sqrt(n)
    assert variance_reduction(torch.zeros(5)) == 1.0
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = s / s.sum()
    expected = 1 / math.sqrt(1 - float(((g - 0.25) ** 2).sum() / (g**2).sum()))
    assert variance_reduction(s) == pytest.approx(expected)


def test_switch_turns_on_when_the_moving_average_passes_tau_th():
    sampler = ImportanceSampler(64, batch_size=16, seed=0)  # B = 48, tau_th = (48 + 48) / 48 = 2
    assert sampler.presample_size == 48 and sampler.tau_threshold == pytest.approx(2.0)
    assert len(sampler) == 4  # ceil(64 / 16) steps per epoch
    logits = torch.zeros(16, 2)
    logits[:, 1] = 20.0  # every sample confidently class 1 ...
    y = torch.ones(16, dtype=torch.long)
    y[0] = 0  # ... and one of them wrong: it holds almost all of the score, tau_new ~ sqrt(16) = 4
    sizes = []
    while len(sizes) < 9:
        for batch in sampler:
            sizes.append(len(batch))
            if len(batch) == 16:
                sampler.loss(logits, y)  # a uniform batch: its scores update tau
            if len(sizes) == 9:
                break
    # tau_k = 4 (1 - 0.9^k) passes 2 at k = 7 (1.87 at k = 6): batches 1-7 are uniform, then presamples of B.
    assert sizes == [16] * 7 + [48, 48]
    assert sampler.importance_steps == 2 and sampler.steps == 9


def test_select_draws_by_score_and_weights_each_pick():
    sampler = ImportanceSampler(100, batch_size=4, presample=3.0, seed=0)
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * 10)
        model.bias.zero_()
    x = torch.tensor([[1.0, 0.0]] * 11 + [[0.0, 1.0]])  # 11 easy class-0 samples, one that the model gets wrong
    y = torch.zeros(12, dtype=torch.long)
    xs, ys = sampler.select(model, x, y)
    scores = gradient_norm_bound(model(x), y)
    p = scores / scores.sum()
    assert len(xs) == 4 and p[11] > 0.99
    assert (xs == torch.tensor([0.0, 1.0])).all()  # the hard sample is drawn every time
    torch.testing.assert_close(sampler._weights, importance_weights(p[[11] * 4], 12))
    loss = sampler.loss(model(xs), ys)
    expected = (F.cross_entropy(model(xs), ys, reduction="none") / (12 * p[11])).mean()
    torch.testing.assert_close(loss, expected)
    assert sampler._weights is None  # used once


def test_importance_sampled_training_learns_and_is_deterministic():
    def train(seed):
        torch.manual_seed(seed)
        x, y = _blobs(64, 2, seed=4)
        x = x / 6
        model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
        sampler = ImportanceSampler(len(x), batch_size=8, seed=seed, tau_threshold=1.0)  # switch on early
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(5):
            for xb, yb in sampler.loader(TensorDataset(x, y)):
                xb, yb = sampler.select(model, xb, yb)
                loss = sampler.loss(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        accuracy = float((model(x).argmax(1) == y).double().mean())
        return accuracy, sampler.importance_steps, [p.detach().clone() for p in model.parameters()]

    accuracy, is_steps, params = train(0)
    assert accuracy > 0.95 and is_steps > 0
    again = train(0)
    assert all(torch.equal(a, b) for a, b in zip(params, again[2]))


def test_sampler_bad_input():
    with pytest.raises(ValueError, match="presample"):
        ImportanceSampler(10, 4, presample=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        ImportanceSampler(1, 4)
    with pytest.raises(ValueError, match="logits must be"):
        gradient_norm_bound(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="dataset has"):
        ImportanceSampler(10, 4).loader(TensorDataset(torch.zeros(9, 1)))


# ---- selection via proxy ----
def test_uncertainty_rankings_known_answers():
    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 9.0]])
    assert select_via_proxy("least_confidence", 0.4, logits=logits).tolist() == [1, 3]
    assert select_via_proxy("entropy", 0.4, logits=logits).tolist() == [1, 3]
    assert float(least_confidence(logits)[3]) == pytest.approx(0.5)
    assert float(entropy(logits)[3]) == pytest.approx(math.log(2))
    three = torch.tensor([[2.0, 1.0, 1.0], [1.2, 1.1, -5.0]])  # the rankings differ with three classes
    assert least_confidence(three).argmax() == 1 and entropy(three).argmax() == 0


def test_forgetting_events_count_transitions_and_never_learned_is_infinite():
    events = ForgettingEvents(3)
    for correct in ([1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]):  # sample 0 forgotten twice, 1 never learned
        events.update(torch.arange(3), torch.tensor(correct, dtype=torch.bool))
    assert events.scores().tolist() == [2.0, math.inf, 0.0]
    assert select_via_proxy("forgetting", 2 / 3, forgetting=events).tolist() == [0, 1]


def test_proxy_end_to_end_finds_noisy_labels():
    x, y = _blobs(50, 2, seed=5)
    x = x / 6
    noisy = torch.arange(0, 100, 10)
    y = y.clone()
    y[noisy] = 1 - y[noisy]  # 10 flipped labels
    torch.manual_seed(0)
    proxy = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    data = TensorDataset(x, y)
    forgetting = train_proxy(proxy, data, epochs=30, lr=0.02, batch_size=10, seed=0)
    features, logits, labels = penultimate_features(proxy, torch.utils.data.DataLoader(data, batch_size=32))
    assert features.shape == (100, 16) and logits.shape == (100, 2) and torch.equal(labels, y)
    torch.testing.assert_close(logits, proxy(x))
    # The flipped labels are what a proxy finds hardest: most forgotten, and far from their class's centre.
    keep = select_via_proxy("forgetting", 0.1, forgetting=forgetting)
    assert len(set(keep.tolist()) & set(noisy.tolist())) >= 8
    assert not set(moderate_coreset(features, labels, 0.7).tolist()) & set(noisy.tolist())
    assert len(select_via_proxy("kcenter", 0.2, features=features)) == 20
    with pytest.raises(ValueError, match="needs features"):
        select_via_proxy("kcenter", 0.2, logits=logits)
    with pytest.raises(ValueError, match="unknown proxy ranking"):
        select_via_proxy("margin", 0.2, logits=logits)
