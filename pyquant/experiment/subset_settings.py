"""pyquant.subsets inside the study harness: what a run calls for settings with ``subset:<method>@<fraction>``,
``importance-sampling`` and ``budget:<seconds>s`` modifiers (parsed by pyquant.experiment.settings.get_setting).

Embeddings come from a proxy: no pretrained weights exist offline, so every method but ``random`` first trains the
run's own model architecture from a fresh initialisation for ``PROXY_EPOCHS`` epochs on the whole training split
(float32, Adam at the run's learning rate and batch size; Coleman et al.'s "briefly trained" proxy), then takes its
penultimate features (the classifier's input), logits and forgetting events. The proxy is built and trained under a
forked RNG, so the target model starts from the same weights as the run without a subset. The time this takes is
recorded as ``selection_s``, apart from the training time.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Subset

from pyquant.subsets.importance import ImportanceSampler
from pyquant.subsets.proxy import penultimate_features, select_via_proxy, train_proxy
from pyquant.subsets.selection import herding, kcenter_greedy, moderate_coreset, random_subset, subset_size

PROXY_EPOCHS = 3

# name -> (needs a proxy, how to select: fn(fraction, features, logits, labels, forgetting, seed) -> indices)
SUBSET_METHODS = {
    "random": (False, None),
    "moderate": (True, lambda f, x, z, y, fe, s: moderate_coreset(x, y, f)),
    "moderate-class": (True, lambda f, x, z, y, fe, s: moderate_coreset(x, y, f, per_class=True)),
    "kcenter": (True, lambda f, x, z, y, fe, s: kcenter_greedy(x, subset_size(len(x), f), seed=s)),
    "herding": (True, lambda f, x, z, y, fe, s: herding(x, subset_size(len(x), f))),
    "proxy": (True, lambda f, x, z, y, fe, s: select_via_proxy("least_confidence", f, logits=z)),
    "proxy-entropy": (True, lambda f, x, z, y, fe, s: select_via_proxy("entropy", f, logits=z)),
    "proxy-forgetting": (True, lambda f, x, z, y, fe, s: select_via_proxy("forgetting", f, forgetting=fe)),
    "proxy-kcenter": (True, lambda f, x, z, y, fe, s: select_via_proxy("kcenter", f, features=x, seed=s)),
}


def training_subset(run: dict, setting, data, transform, device: torch.device):
    """(the training set to use, a record of the selection). ``transform``: batch -> float32 model input on
    ``device`` (the runner's down-sampling). Without a subset modifier: the whole training split and ``{}``."""
    if setting.subset is None:
        return data.train, {}
    method, fraction, seed = setting.subset, setting.subset_fraction, int(run["seed"])
    if method not in SUBSET_METHODS:
        raise ValueError(f"unknown subset method {method!r}; use one of {', '.join(SUBSET_METHODS)}")
    needs_proxy, select = SUBSET_METHODS[method]
    start = time.perf_counter()
    proxy_record = None
    if needs_proxy:
        from pyquant.experiment.models import create_model

        size = None if data.image_size is None else data.image_size // int(run["scale"])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            proxy = create_model(run["model"], in_chans=data.in_chans, num_classes=data.num_classes,
                                 pretrained=run["pretrained"], img_size=size, **run["model_args"]).to(device)
            forgetting = train_proxy(proxy, data.train, PROXY_EPOCHS, float(run["lr"]), int(run["batch_size"]), seed,
                                     transform, device)
            loader = DataLoader(data.train, batch_size=2 * int(run["batch_size"]), shuffle=False)  # seeds from the RNG
            features, logits, labels = penultimate_features(proxy, loader, transform)
        keep = select(fraction, features, logits, labels, forgetting, seed)
        proxy_record = {"model": run["model"], "epochs": PROXY_EPOCHS, "lr": float(run["lr"]),
                        "features": int(features.shape[1]),
                        "train_accuracy": float((logits.argmax(1) == labels).double().mean())}
        del proxy
    else:
        keep = random_subset(len(data.train), fraction, seed)
        labels = torch.as_tensor([int(data.train[i][1]) for i in range(len(data.train))])
    keep = keep.tolist()
    counts = torch.bincount(labels[keep], minlength=data.num_classes).tolist()
    record = {"method": method, "fraction": fraction, "train_before": len(data.train), "train_after": len(keep),
              "class_counts_before": torch.bincount(labels, minlength=data.num_classes).tolist(),
              "class_counts_after": counts, "selection_s": time.perf_counter() - start, "proxy": proxy_record}
    return Subset(data.train, keep), record


def importance_sampler(setting, n: int, batch_size: int, seed: int, world_size: int = 1):
    """The batch sampler of an ``importance-sampling`` setting (paper defaults: B = 3b, tau_th = 2), else None."""
    if not setting.importance_sampling:
        return None
    if world_size > 1:
        raise ValueError(f"setting {setting.name!r}: importance sampling runs in one process, not under --nproc {world_size}")
    return ImportanceSampler(n, batch_size, seed=seed)


def out_of_time(setting, elapsed_s: float) -> bool:
    """True when a ``budget:<seconds>s`` setting has used its training time."""
    return setting.time_budget_s is not None and elapsed_s >= setting.time_budget_s


def record(selection: dict, sampler, setting, elapsed_s: float) -> dict:
    """The run record's ``subsets`` entry: the selection, the sampler's counters, and the time budget."""
    out = {"selection": selection or None, "importance_sampling": None if sampler is None else sampler.summary()}
    if setting.time_budget_s is not None:
        out["time_budget_s"] = setting.time_budget_s
        out["stopped_by_budget"] = elapsed_s >= setting.time_budget_s
    return out
