"""Study configuration: the paper's protocol as defaults, presets, TOML/YAML files, command-line overrides, and the
grid of runs they expand to.

A config file sets any of the keys of DEFAULTS (print a complete one with
``pyquant experiment --preset paper --print-config``). Layers, later wins: DEFAULTS, the preset or file, the
command line (``--epochs 3``, or ``--set data.rsna.root=/data/rsna`` for any key; values are read as TOML).
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from pathlib import Path

# The paper's protocol (Selvan et al. 2023): Adam lr 1e-5, batch 32, at most 50 epochs, patience 5, three seeds.
DEFAULTS: dict = {
    "tasks": ["rsna"],
    "models": ["densenet121"],
    "settings": ["baseline", "amp", "8bit", "amp+8bit", "half+8bit"],
    "seeds": [1, 10, 100],
    "scales": [1],  # down-sampling factors S: images are S times smaller for training and inference
    "downsample": {"tasks": [], "models": [], "settings": [], "scales": []},  # an extra grid (the paper's Fig. 2-C)
    "epochs": 50,
    "min_epochs": 1,
    "patience": 5,
    "monitor": "val_loss",  # or "val_auc": early stopping and the best checkpoint follow it
    "batch_size": 32,
    "lr": 1e-5,
    "amp_dtype": "auto",  # dtype of "auto" autocast: float16 on CUDA, bfloat16 on CPU
    "half_dtype": "auto",  # dtype of "auto" half-precision models: float16 on CUDA, bfloat16 on CPU
    "device": "auto",
    "threads": 0,  # torch CPU threads; 0 keeps torch's default
    "workers": 0,  # DataLoader worker processes
    "jobs": 1,  # runs at a time, each in its own process (when isolate and nproc = 1; else one at a time)
    "nproc": 1,  # data-parallel processes per run (DistributedDataParallel); batch_size stays the global batch
    "threshold_rule": "youden",  # how the decision threshold is chosen on validation ("youden" or "fixed" 0.5)
    "inference_repeats": 3,  # timed passes over the pre-loaded test set (the median is reported)
    "warmup_batches": 2,
    "out": "runs",
    "isolate": True,  # each run in a fresh Python process, so that CPU process-memory figures are per run
    "model_args": {},  # per model: extra keyword arguments for create_model
    "pretrained": {},  # per model: a local weights file
    "data": {
        "rsna": {"root": "data/rsna", "csv": "train.csv", "images": "train_images", "max_age": 55, "size": 256,
                 "split_seed": 0, "fractions": [0.6, 0.2, 0.2], "generate": {}},
        "lidc": {"path": "data/lidc/data_lidc.pickle", "min_raters": 2, "split_seed": 0,
                 "fractions": [0.6, 0.2, 0.2], "generate": {}},
        "tabular": {"split_seed": 0, "fractions": [0.6, 0.2, 0.2]},
    },
}

PRESETS: dict[str, str] = {
    "quick": """\
# The demo: a small DenseNet on generated RSNA-format mammograms (data/rsna-demo, made on first use) at 32 px, the
# paper's five settings, three seeds, plus a down-sampling curve (S = 2, 4) for the baseline.
# The generated task is made harder than the generator's default (which a CNN separates almost perfectly) so that
# settings can differ: 5 % of the labelled breasts carry the label that contradicts their image (reader
# disagreement), which puts the float32 baseline's test AUC near 0.9; BI-RADS 0 is 1/3 of the labelled breasts, the
# RSNA cohort's 2:1 imbalance. Models start from random weights (nothing is downloaded), so the learning rate is
# 1e-3 instead of the paper's 1e-5 fine-tuning rate; the DenseNet has two dense blocks (4, 8), so that it takes the
# 8 px images of S = 4. Early stopping follows validation AUC, after at least 4 epochs: with the noisy labels the
# validation loss of the first epochs is noisy and stopped some seeds before they had learnt. Two runs at a time, one torch thread each: on a 2-core machine faster than one run on two
# threads (measured in docs/study.md); 2.5-4 minutes there.
tasks = ["rsna"]
models = ["densenet_small"]
settings = ["baseline", "amp", "8bit", "amp+8bit", "half+8bit"]
seeds = [1, 2, 3]
scales = [1]
epochs = 10
min_epochs = 4
patience = 2
monitor = "val_auc"
batch_size = 64
lr = 1e-3
threads = 1
jobs = 2
out = "runs/quick"

[downsample]
tasks = ["rsna"]
models = ["densenet_small"]
settings = ["baseline"]
scales = [2, 4]

[model_args]
densenet_small = { block_config = [4, 8] }

[data.rsna]
root = "data/rsna-demo"
size = 32
generate = { n_patients = 500, size = 64, seed = 0, label_noise = 0.05 }
""",
    "subsets": """\
# Less data, same accuracy (docs/subsets.md): the quick preset's data and small DenseNet at 32 px (S = 2, where the
# task is not yet saturated), trained on 25 %, 50 % and 100 % of the training split chosen at random, by Moderate
# Coreset and via a proxy (least confidence), and importance sampling against uniform batches with the same
# wall-clock budget. Two seeds. Run it with `python -m pyquant.experiment.subset_study`, which also draws the plots.
tasks = ["rsna"]
models = ["densenet_small"]
settings = ["baseline", "subset:random@0.25", "subset:random@0.5", "subset:moderate@0.25", "subset:moderate@0.5",
            "subset:proxy@0.25", "subset:proxy@0.5", "baseline+budget:12s", "importance-sampling+budget:12s",
            "baseline+budget:30s", "importance-sampling+budget:30s"]
seeds = [1, 2]
scales = [2]
epochs = 20
patience = 5
monitor = "val_loss"
batch_size = 32
lr = 3e-4
threads = 1
out = "runs/subsets"

[data.rsna]
root = "data/rsna-demo"
size = 64
generate = { n_patients = 500, size = 128, seed = 0 }
""",
    "paper": """\
# The paper's full grid on the real data, placed by you (nothing is downloaded):
#  - RSNA: Kaggle's rsna-breast-cancer-detection train.csv and train_images/ (DICOM, or PNG conversions) under root;
#  - LIDC: the Probabilistic U-Net project's LIDC patch pickle at path.
tasks = ["rsna", "lidc"]
models = ["densenet121", "efficientnet_b0", "swin_base", "vit_base", "mlp"]
settings = ["baseline", "amp", "8bit", "amp+8bit", "half+8bit"]
seeds = [1, 10, 100]
scales = [1]
epochs = 50
patience = 5
monitor = "val_loss"
batch_size = 32
lr = 1e-5
out = "runs/paper"

[downsample]
tasks = ["rsna"]
models = ["densenet121"]
settings = ["baseline", "8bit", "half+8bit"]
scales = [2, 4, 8]

[data.rsna]
root = "data/rsna-breast-cancer-detection"
size = 256
max_age = 55

[data.lidc]
path = "data/lidc/data_lidc.pickle"
min_raters = 2
""",
}


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Deep merge; unknown keys are an error except under the free-form tables (data, model_args, pretrained)."""
    out = copy.deepcopy(base)
    free = where.split(".")[0] in ("data", "model_args", "pretrained") if where else False
    for key, value in update.items():
        path = f"{where}.{key}" if where else key
        if key not in out and not free:
            raise KeyError(f"unknown config key {path!r}; known: {', '.join(sorted(base))}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, path) if key != "generate" else dict(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_file(path: str | Path) -> dict:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return tomllib.loads(text)


def load(preset_or_file: str = "quick", overrides: dict | None = None, sets: list[str] | None = None) -> dict:
    """The config of a preset name or a TOML/YAML file, with ``overrides`` (dotted keys -> values) and
    ``sets`` ("a.b=value", value parsed as TOML, else taken as a string) applied."""
    if preset_or_file in PRESETS:
        layer = tomllib.loads(PRESETS[preset_or_file])
    elif Path(preset_or_file).is_file():
        layer = read_file(preset_or_file)
    else:
        raise FileNotFoundError(f"{preset_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    cfg = merge(DEFAULTS, layer)
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        cfg = set_key(cfg, key.strip(), value)
    for key, value in (overrides or {}).items():
        if value is not None:
            cfg = set_key(cfg, key, value)
    return cfg


def set_key(cfg: dict, dotted: str, value) -> dict:
    update: dict = {}
    node = update
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return merge(cfg, update)


def to_toml(cfg: dict) -> str:
    """A TOML rendering of a config (scalars, lists and nested tables), for --print-config."""

    def scalar(v) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k) if not k.isidentifier() else k} = {scalar(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines, tables = [], []

    def emit(table: dict, prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict) and key != "generate":
                tables.append((f"{prefix}{key}", value))
            else:
                lines.append(f"{json.dumps(key) if not key.replace('_', 'a').isalnum() else key} = {scalar(value)}")

    emit(cfg, "")
    while tables:
        name, table = tables.pop(0)
        lines.append(f"\n[{name}]")
        emit(table, name + ".")
    return "\n".join(lines) + "\n"


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


RUN_KEYS = ("epochs", "min_epochs", "patience", "monitor", "batch_size", "lr", "amp_dtype", "half_dtype", "threads",
            "workers", "threshold_rule", "inference_repeats", "warmup_batches")


# keys a run cannot do without, and their least value (0 epochs would leave no checkpoint to test)
AT_LEAST = {"epochs": 1, "batch_size": 1, "inference_repeats": 1, "jobs": 1, "min_epochs": 0, "patience": 0, "threads": 0,
            "workers": 0, "warmup_batches": 0}


def validate(cfg: dict) -> None:
    """A ValueError naming the first key of ``cfg`` a run cannot use: a count below its least value, or a task's
    split fractions that leave validation (early stopping, threshold) or test empty."""
    for key, least in AT_LEAST.items():
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{key} must be a whole number >= {least}, got {value!r}")
    for task in cfg["tasks"]:
        fractions = cfg["data"].get(task, {}).get("fractions")
        if fractions is not None and (len(fractions) != 3 or not all(f > 0 for f in fractions)):
            raise ValueError(f"data.{task}.fractions must be three positive fractions (train, val, test): a run "
                             f"trains, early-stops on val and reports test, got {fractions!r}")


def concurrent_runs(cfg: dict) -> int:
    """How many runs go at a time: ``jobs`` for runs in a process of their own; one when each run already uses
    ``nproc`` > 1 processes, or runs inside this process (isolate = false)."""
    return int(cfg["jobs"]) if cfg["isolate"] and cfg["nproc"] == 1 else 1


def expand(cfg: dict) -> list[dict]:
    """The runs of a config: tasks x models x settings x seeds x scales, then the down-sampling grid (duplicates
    dropped). Each run is a self-contained dict; its hash names its folder and decides whether it is finished."""
    validate(cfg)
    grids = [(cfg["tasks"], cfg["models"], cfg["settings"], cfg["scales"])]
    ds = cfg["downsample"]
    if ds.get("scales"):
        # a sub-grid of the main one: narrowing the tasks, models or settings (on the command line) narrows it too
        grids.append((*([v for v in ds.get(key) or cfg[key] if v in cfg[key]] for key in ("tasks", "models", "settings")),
                      ds["scales"]))
    device = resolve_device(cfg["device"])
    from pyquant.experiment.parallel import check

    nproc = check(cfg["nproc"], cfg["batch_size"])
    runs, seen = [], set()
    for tasks, models, settings, scales in grids:
        for task in tasks:
            for model in models:
                for setting in settings:
                    for scale in scales:
                        for seed in cfg["seeds"]:
                            run = {
                                "task": task, "model": model, "setting": setting, "seed": int(seed), "scale": int(scale),
                                "device": device, "data": cfg["data"].get(task, {}),
                                "model_args": cfg["model_args"].get(model, {}),
                                "pretrained": cfg["pretrained"].get(model),
                                **{k: cfg[k] for k in RUN_KEYS},
                            }
                            if nproc > 1:  # only then: single-process runs keep the hashes they always had
                                run["nproc"] = nproc
                            run["hash"] = run_hash(run)
                            if run["hash"] not in seen:
                                seen.add(run["hash"])
                                runs.append(run)
    return runs


def identity(run: dict) -> dict:
    """What makes a run what it is: its dict without the hash and without ``data.write_generated``, which only says
    whether generated data may be written, not which data is read (so the flag never makes a finished run rerun)."""
    body = {k: v for k, v in run.items() if k != "hash"}
    if "write_generated" in body.get("data", {}):
        body["data"] = {k: v for k, v in body["data"].items() if k != "write_generated"}
    return body


def run_hash(run: dict) -> str:
    return hashlib.sha256(json.dumps(identity(run), sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_name(run: dict) -> str:
    return f"{run['task']}_{run['model']}_{run['setting']}_S{run['scale']}_seed{run['seed']}_{run['hash']}"
