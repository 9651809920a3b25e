"""Does each low-bit optimizer train as well as its float32 counterpart? Two small real tasks that ship with
scikit-learn (no download): digits (8x8 images, 10 classes; accuracy and macro one-vs-rest AUC) and the Wisconsin
breast-cancer table (binary; accuracy at 0.5 and AUC). An MLP whose weight matrices are above min_8bit_size, so their
states really are 8-bit (or 4-bit); the biases keep float32 states, as in bitsandbytes.

Each low-bit optimizer is paired with the float32 optimizer of the same algorithm at the same hyper-parameters:
torch's where torch has one, otherwise the same pyquant class with ``optim_bits=32`` states. Every pair trains from
the same initialisation on the same batches; the table gives the mean over seeds of test metrics after the last
epoch, the low-bit minus float32 difference, and the optimizer state bytes per parameter.

    python bench/family_accuracy.py                 # 3 seeds, prints a markdown table
    python bench/family_accuracy.py --seeds 5 --out docs/results/family_accuracy.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

import pyquant


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = int(0.75 * n)
    return order[:cut], order[cut:]


def digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(bunch.target), 10


def breast_cancer():
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float64)
    x = (x - x.mean(0)) / x.std(0)  # the split's statistics would be stricter; the comparison is between optimizers
    return torch.tensor(x, dtype=torch.float32), torch.tensor(1 - bunch.target), 2


TASKS = {"digits": digits, "breast-cancer": breast_cancer}


def _float32(cls, **options):
    """The same pyquant class with float32 states: its own reference where torch has no such optimizer."""
    return lambda params: cls([{"params": list(params), "optim_bits": 32}], **options)


def _pair(low, reference, reference_name, **options):
    return (lambda params: low(params, **options)), reference(**options), reference_name


def _plain(cls):
    return lambda **options: (lambda params: cls(params, **options))


def _pyquant32(cls):
    return lambda **options: _float32(cls, **options)


# name -> (low-bit factory, float32 factory, what the float32 one is). Learning rates: each algorithm's usual one
# for this scale of problem: Adam's 1e-3; Lion at bitsandbytes' default 1e-4 (its authors advise 3-10x below
# AdamW's); SGD with momentum 0.9 and Adagrad at torch's Adagrad default 1e-2.
PAIRS = {
    "Adam8bit": _pair(pyquant.Adam8bit, _plain(torch.optim.Adam), "torch Adam", lr=1e-3),
    "AdamW8bit": _pair(pyquant.AdamW8bit, _plain(torch.optim.AdamW), "torch AdamW", lr=1e-3, weight_decay=1e-2),
    "Lion8bit": _pair(pyquant.Lion8bit, _pyquant32(pyquant.Lion8bit), "Lion, float32 states", lr=1e-4),
    "SGD8bit": _pair(pyquant.SGD8bit, _plain(torch.optim.SGD), "torch SGD", lr=1e-2, momentum=0.9),
    "RMSprop8bit": _pair(pyquant.RMSprop8bit, _plain(torch.optim.RMSprop), "torch RMSprop", lr=1e-3),
    "Adagrad8bit": _pair(pyquant.Adagrad8bit, _plain(torch.optim.Adagrad), "torch Adagrad", lr=1e-2),
    "AdEMAMix8bit": _pair(pyquant.AdEMAMix8bit, _plain(pyquant.AdEMAMix32bit), "AdEMAMix32bit", lr=1e-3),
}
for _name in ("LAMB8bit", "LARS8bit"):  # the real trust ratio, float32 states of the same class as reference
    if hasattr(pyquant, _name):
        _cls = getattr(pyquant, _name)
        PAIRS[_name] = _pair(_cls, _pyquant32(_cls), f"{_name[:-4]}, float32 states",
                             **({"lr": 1e-3} if _name == "LAMB8bit" else {"lr": 1e-1, "momentum": 0.9}))
for _name, _rank1 in (("AdamW4bit", True), ("AdamW4bit-blockwise", False)):
    if hasattr(pyquant, "AdamW4bit"):
        PAIRS[_name] = (lambda params, rank1=_rank1: pyquant.AdamW4bit(params, lr=1e-3, weight_decay=1e-2, rank1=rank1),
                        _plain(torch.optim.AdamW)(lr=1e-3, weight_decay=1e-2), "torch AdamW")


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of one class (Mann-Whitney, ties counted half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def train(task: str, make_optimizer, seed: int, epochs: int) -> dict:
    x, y, classes = TASKS[task]()
    train_idx, test_idx = _split(len(y), seed)
    torch.manual_seed(seed)
    outputs = classes if classes > 2 else 1
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, outputs))
    optimizer = make_optimizer(model.parameters())
    order = torch.Generator().manual_seed(seed)
    xt, yt = x[train_idx], y[train_idx]
    for _ in range(epochs):
        for batch in torch.randperm(len(yt), generator=order).split(32):
            out = model(xt[batch])
            loss = (torch.nn.functional.cross_entropy(out, yt[batch]) if classes > 2 else
                    torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), yt[batch].float()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        out = model(x[test_idx])
    labels = y[test_idx].numpy()
    if classes > 2:
        probabilities = out.softmax(1).numpy()
        accuracy = float((probabilities.argmax(1) == labels).mean())
        auc = statistics.fmean(_auc(probabilities[:, c], (labels == c).astype(int)) for c in range(classes))
    else:
        scores = out.squeeze(1).numpy()
        accuracy = float(((scores > 0).astype(int) == labels).mean())
        auc = _auc(scores, labels)
    parameters = sum(p.numel() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return {"accuracy": accuracy, "auc": auc, "state_bytes_per_param": state / parameters}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="optimizer names (default: all of PAIRS)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    header = ("| task | optimizer | float32 reference | accuracy | Δ accuracy | AUC | Δ AUC | state B/param "
              "| float32 B/param |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    started = time.perf_counter()
    for task in TASKS:
        for name, (low, reference, reference_name) in PAIRS.items():
            if args.only and name not in args.only:
                continue
            results = {"low": [], "ref": []}
            for seed in range(args.seeds):
                results["low"].append(train(task, low, seed, args.epochs))
                results["ref"].append(train(task, reference, seed, args.epochs))
            mean = {k: {m: statistics.fmean(r[m] for r in v) for m in v[0]} for k, v in results.items()}
            low_m, ref_m = mean["low"], mean["ref"]
            rows.append(f"| {task} | {name} | {reference_name} | {low_m['accuracy']:.4f} | "
                        f"{low_m['accuracy'] - ref_m['accuracy']:+.4f} | {low_m['auc']:.4f} | "
                        f"{low_m['auc'] - ref_m['auc']:+.4f} | {low_m['state_bytes_per_param']:.2f} | "
                        f"{ref_m['state_bytes_per_param']:.2f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    table = "\n".join([header, *rows])
    footer = (f"\n\n{args.seeds} seeds, {args.epochs} epochs, batch 32, MLP 256-256, 75/25 split per seed; "
              f"`python bench/family_accuracy.py --seeds {args.seeds} --epochs {args.epochs}` "
              f"({time.perf_counter() - started:.0f} s, torch {torch.__version__}).\n")
    print(table + footer)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + footer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
