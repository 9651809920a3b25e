"""pyquant.compress: SVD factorisation (lowrank) and data-free neuron pruning (prune_neurons).

The end-to-end test trains a small CNN and an MLP on sklearn's digits (8 x 8 images, 10 classes) for a few
seconds and reports accuracy before compression, right after it, and after a short fine-tune
(`pytest -s` prints the numbers; docs/compress.md shows a run).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from pyquant import compress
from pyquant.nn import LowRankConv2d
from pyquant.nn.lowrank import LowRankLinear


def low_rank_matrix(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- lowrank ----
def test_lowrank_energy_rank_choice_and_report():
    model = small_cnn()
    before = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    small, report = compress.lowrank(model, energy=0.8, example_input=x)
    assert same_state(model, before) and type(model[0]) is nn.Conv2d, "the input model is untouched"
    for row in report.rows:
        w = model.get_submodule(row.name).weight.detach().double()
        s = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        expected = int((energy < 0.8 - 1e-12).sum()) + 1
        assert row.rank == expected and row.max_rank == len(s)
        assert math.isclose(row.rel_error, float(((s[expected:] ** 2).sum() / (s**2).sum()).sqrt()), rel_tol=1e-9)
        assert row.energy >= 0.8
        if row.action == "factorised":
            layer = small.get_submodule(row.name)
            assert isinstance(layer, (LowRankConv2d, LowRankLinear)) and layer.rank == expected
            assert row.params_after == sum(p.numel() for p in layer.parameters()) < row.params_before
            assert row.flops_after < row.flops_before
            # the factors reconstruct the best rank-r approximation: relative error as reported
            dense = layer.dense_weight().double().reshape(w.shape[0], -1)
            rel = float((dense - w.reshape(w.shape[0], -1)).norm() / w.norm())
            assert math.isclose(rel, row.rel_error, rel_tol=1e-4, abs_tol=1e-6)
        else:
            assert "not cheaper" in row.reason
    assert report.changed and all(isinstance(small.get_submodule(r.name), LowRankConv2d) for r in report.changed
                                  if r.kind == "Conv2d")
    assert report.model_params_after < report.model_params_before
    assert "factorised" in str(report)
    assert small(x).shape == (2, 10)
    y = small(x)
    assert torch.isfinite(y).all()


def test_lowrank_exact_for_low_rank_weights():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 24, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(24 * 36, 40))
    with torch.no_grad():
        model[0].weight.copy_(low_rank_matrix(24, 72, 4).reshape(24, 8, 3, 3))
        model[3].weight.copy_(low_rank_matrix(40, 24 * 36, 6, seed=1))
    x = torch.randn(3, 8, 6, 6)
    small, report = compress.lowrank(model, energy=1.0 - 1e-9)
    assert [r.rank for r in report.rows] == [4, 6]
    assert all(r.rel_error < 1e-6 for r in report.rows)
    assert torch.allclose(small(x), model(x), rtol=1e-4, atol=1e-3)
    small2, report2 = compress.lowrank(model, rank={"0": 4, "3": 6})
    assert torch.allclose(small2(x), model(x), rtol=1e-4, atol=1e-3)


def test_lowrank_rank_ratio_and_fixed_rank():
    model = small_cnn(1)
    _, report = compress.lowrank(model, rank_ratio=0.25)
    for row in report.rows:
        assert row.rank == max(1, math.ceil(0.25 * row.max_rank))
    _, report = compress.lowrank(model, rank=20)
    assert report["4"].action == "skipped" and "larger than the largest possible rank" not in (report["4"].reason or "x")
    assert "larger than the largest possible rank 10" in report["9"].reason
    assert report["7"].action == "factorised" and report["7"].rank == 20


def test_lowrank_param_budget():
    model = small_cnn(2)
    total = sum(model.get_submodule(n).weight.numel() + model.get_submodule(n).bias.numel()
                for n in ("0", "2", "4", "7", "9"))
    for fraction in (0.2, 0.5):
        small, report = compress.lowrank(model, param_budget=fraction)
        used = sum(r.params_after for r in report.rows)
        assert used <= fraction * total
        assert used > 0.8 * fraction * total  # the budget is actually spent
    small, report = compress.lowrank(model, param_budget=20000)
    assert sum(r.params_after for r in report.rows) <= 20000
    with pytest.raises(ValueError, match="too small"):
        compress.lowrank(model, param_budget=100)


def test_lowrank_skips_and_errors():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=2, padding=1),
        nn.ConvTranspose2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv1d(8, 8, 1) if False else nn.Identity(),
        nn.Conv2d(8, 16, 3, padding=1),
    )
    small, report = compress.lowrank(model, rank=2)
    reasons = {r.name: r.reason for r in report.skipped}
    assert "grouped" in reasons["0"] and "transposed" in reasons["1"] and "padding_mode" in reasons["2"]
    assert report["4"].action == "factorised"
    x = torch.randn(1, 4, 6, 6)
    assert small(x).shape == model(x).shape
    attention = nn.Sequential(nn.Linear(8, 8))
    attention.mha = nn.MultiheadAttention(8, 2)
    _, rep = compress.lowrank(attention, rank=2)
    assert "MultiheadAttention" in rep["mha.out_proj"].reason
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        compress.lowrank(model, rank=2, layers=["nope"])
    with pytest.raises(ValueError, match="grouped"):
        compress.lowrank(model, rank=2, layers=["0"])
    with pytest.raises(ValueError, match="transposed"):
        compress.lowrank(model, rank=2, layers=["1"])
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        compress.lowrank(nn.Sequential(nn.ReLU()))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="energy"):
            compress.lowrank(model, energy=bad)
        with pytest.raises(ValueError, match="rank_ratio"):
            compress.lowrank(model, rank_ratio=bad)
    with pytest.raises(ValueError, match="one of"):
        compress.lowrank(model, energy=0.9, rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        compress.lowrank(model, rank=0)
    with pytest.raises(ValueError, match="larger than its largest possible rank"):
        compress.lowrank(model, rank={"4": 17})
    with pytest.raises(ValueError, match="not factorised here"):
        compress.lowrank(model, rank={"3": 1})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        compress.lowrank("model")
    # a layer too small to gain anything
    _, rep = compress.lowrank(nn.Sequential(nn.Linear(4, 4)), rank=3)
    assert "not cheaper" in rep["0"].reason


def test_lowrank_keeps_weight_sharing():
    """A module used at two places becomes one LowRankConv2d / LowRankLinear at both; modules sharing a
    weight (tied) are kept, with a warning naming the other, as prune_neurons keeps them."""
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    twice = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), conv, nn.ReLU(), nn.Conv2d(16, 8, 1), conv)
    small, report = compress.lowrank(twice, rank=4)
    assert type(small[1]) is LowRankConv2d and small[4] is small[1]
    assert report["1"].action == "factorised" and "4" not in [r.name for r in report.rows]
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    by_alias, report = compress.lowrank(twice, rank=4, layers=["4"])  # named by its second name
    assert [r.name for r in report.rows] == ["1"] and by_alias[4] is by_alias[1] and type(by_alias[0]) is nn.Conv2d
    assert torch.equal(by_alias[1].weight_first, small[1].weight_first)
    x = torch.randn(1, 3, 6, 6)
    assert small(x).shape == twice(x).shape
    with pytest.raises(ValueError, match="two ranks"):
        compress.lowrank(twice, rank={"1": 2, "4": 3})

    tied = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 32))
    tied[2].weight = tied[0].weight
    with pytest.warns(UserWarning) as caught:
        small, report = compress.lowrank(tied, rank=2)
    assert sorted(str(w.message).split(" (")[0] for w in caught) == [
        "lowrank: layer '0' kept dense: it shares a parameter with '2'",
        "lowrank: layer '2' kept dense: it shares a parameter with '0'"]
    assert "'2'" in report["0"].reason and "'0'" in report["2"].reason and report["3"].action == "factorised"
    assert small[0].weight is small[2].weight  # still tied
    with pytest.raises(ValueError, match="'0' cannot be factorised: shares a parameter"):
        compress.lowrank(tied, rank=2, layers=["0"])
    # prune_neurons: tied layers are kept too
    _, report = compress.prune_neurons(tied, amount=1)
    assert report["0"].action == "skipped" and "shares a parameter" in report["0"].reason


# ---- prune_neurons ----
def brute_force_merges(w_in, a_out, steps):
    """The saliency procedure written plainly: all pairs every step."""
    a_out = a_out.clone()
    alive = list(range(w_in.shape[0]))
    out = []
    for _ in range(steps):
        best = None
        for j in alive:
            asq = float((a_out[:, j] ** 2).mean())
            for i in alive:
                if i != j:
                    s = asq * float(((w_in[i] - w_in[j]) ** 2).sum())
                    if best is None or s < best[0] - 1e-15:
                        best = (s, j, i)
        s, j, i = best
        out.append((j, i))
        a_out[:, i] += a_out[:, j]
        alive.remove(j)
    return out


def test_saliency_sequence_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    w_in = torch.randn(11, 6, generator=g, dtype=torch.float64)
    a_out = torch.randn(4, 11, generator=g, dtype=torch.float64)
    from pyquant.compress.prune import _saliency_sequence

    merges, alive = _saliency_sequence(w_in, a_out.clone(), 8)
    assert [(j, i) for j, i, _ in merges] == brute_force_merges(w_in, a_out, 8)
    assert int(alive.sum()) == 3


def test_prune_exact_for_duplicate_neurons():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Sequential(nn.Dropout(0.1), nn.Linear(6, 3)))
    with torch.no_grad():  # neurons 5, 6, 7 of the first layer copy 0, 1, 2; neuron 4 of the second copies 1
        model[0].weight[5:8] = model[0].weight[0:3]
        model[0].bias[5:8] = model[0].bias[0:3]
        model[2].weight[4] = model[2].weight[1]
        model[2].bias[4] = model[2].bias[1]
    model.eval()
    x = torch.randn(16, 5)
    small, report = compress.prune_neurons(model, amount={"0": 3, "2": 1})
    assert small[0].out_features == 5 and small[2].in_features == 5 and small[2].out_features == 5
    assert small[4][1].in_features == 5
    assert torch.allclose(small(x), model(x), atol=1e-6)
    assert report["0"].neurons_after == 5 and report["0"].saliency == 0.0
    assert report["2"].neurons_after == 5 and report["2"].saliency == 0.0
    assert report.model_params_after == sum(p.numel() for p in small.parameters()) < report.model_params_before
    # the knee of a curve that starts with exact duplicates keeps at least the distinct neurons
    knee, _ = compress.prune_neurons(model, amount="knee", layers=["0"])
    assert knee[0].out_features <= 5


def test_prune_amounts_and_errors():
    torch.manual_seed(7)
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.GELU(), nn.Linear(20, 4))
    before = copy.deepcopy(mlp)
    small, report = compress.prune_neurons(mlp, amount=0.25)
    assert same_state(mlp, before)
    assert small[0].out_features == 15 and small[2].out_features == 15 and small[4].in_features == 15
    small, _ = compress.prune_neurons(mlp, amount=4, layers=["2"])
    assert small[0].out_features == 20 and small[2].out_features == 16
    small, report = compress.prune_neurons(mlp, amount="knee")
    assert all(1 <= r.neurons_after < r.neurons_before for r in report.rows)
    assert "pruned" in str(report)
    for amount, error in ((20, ValueError), (-1, ValueError), (1.0, ValueError), ("half", ValueError), (None, TypeError)):
        with pytest.raises(error):
            compress.prune_neurons(mlp, amount=amount)
    with pytest.raises(ValueError, match="no layer named"):
        compress.prune_neurons(mlp, amount=1, layers=["7"])
    with pytest.raises(ValueError, match="is not an nn.Linear followed"):
        compress.prune_neurons(mlp, amount=1, layers=["4"])
    with pytest.raises(ValueError, match="no nn.Linear followed by another"):
        compress.prune_neurons(small_cnn()[:6])
    # a normalisation between two layers is not element-wise: listed, not pruned
    with_bn = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    small, report = compress.prune_neurons(with_bn, amount=2)
    assert "BatchNorm1d" in report["0"].reason and small[0].out_features == 8
    assert report["3"].action == "pruned" and small[3].out_features == 6
    with pytest.raises(ValueError, match="cannot be pruned"):
        compress.prune_neurons(with_bn, amount=2, layers=["0"])


# ---- end to end on a real (small) task ----
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def train(model, x, y, epochs, lr=2e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 100):
            idx = perm[i : i + 100]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def compress_and_fine_tune(model, epochs, name, how, compress_fn):
    """Train `model` on digits for `epochs`, compress it, fine-tune 3 epochs; print the accuracies and the report;
    return (accuracy before, the report, accuracy after fine-tuning)."""
    xtr, ytr, xte, yte = digits()
    train(model, xtr, ytr, epochs=epochs)
    base = accuracy(model, xte, yte)
    small, report = compress_fn(model)
    right_after = accuracy(small, xte, yte)
    train(small, xtr, ytr, epochs=3, lr=1e-3, seed=1)
    tuned = accuracy(small, xte, yte)
    print(f"\n{name}: accuracy {base:.3f}, after {how} {right_after:.3f}, after 3 epochs {tuned:.3f}; "
          f"parameters {report.model_params_before:,} -> {report.model_params_after:,}")
    print(report)
    return base, report, tuned


def test_digits_compress_then_fine_tune():
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 16, 96), nn.ReLU(), nn.Linear(96, 10),
    )
    base, report, tuned = compress_and_fine_tune(
        cnn, 6, "digits CNN", "lowrank(energy=0.85)", lambda m: compress.lowrank(m, energy=0.85, example_input=xte[:1])
    )
    assert base > 0.9
    assert report.model_params_after < 0.75 * report.model_params_before
    assert tuned >= base - 0.03

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    base, report, tuned = compress_and_fine_tune(
        mlp, 15, "digits MLP", "prune_neurons(knee)", lambda m: compress.prune_neurons(m, amount="knee")
    )
    assert base > 0.9
    assert report.model_params_after < 0.6 * report.model_params_before
    assert tuned >= base - 0.04
