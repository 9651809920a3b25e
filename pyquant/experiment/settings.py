"""Settings: named training recipes. A setting is data, not code: which optimizer, which autocast dtype, which
model dtype, whether to scale the loss. One training loop (pyquant.experiment.loop) runs them all.

    register_setting(Setting("amp+8bit", optimizer="8bit", autocast="auto"))
    register_optimizer("sgd")(lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))

"auto" dtypes resolve per device: float16 on CUDA (the paper's AMP and half precision), bfloat16 on CPU (CPU
autocast's default; float16 matmul and convolution run 20-40x slower than bfloat16 in torch on CPU). The resolved
dtypes and whether the loss was scaled go into each run's record.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch

OPTIMIZERS: dict[str, Callable] = {}
SETTINGS: dict[str, "Setting"] = {}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register_optimizer(name: str):
    """Decorator: register ``factory(params, lr) -> torch.optim.Optimizer`` under ``name``."""

    def decorate(factory):
        OPTIMIZERS[name] = factory
        return factory

    return decorate


@register_optimizer("adam")
def _adam(params, lr):
    return torch.optim.Adam(params, lr=lr)


@register_optimizer("8bit")
def _adam8bit(params, lr):
    import pyquant

    return pyquant.Adam8bit(params, lr=lr)


@register_optimizer("adam4bit")
def _adam4bit(params, lr):
    import pyquant

    return pyquant.Adam4bit(params, lr=lr)  # Adam (weight decay 0), as the baseline's torch.optim.Adam


@register_optimizer("lion8bit")
def _lion8bit(params, lr):
    import pyquant

    # Lion's update is a sign, larger per element than Adam's normalised step: its authors (Chen et al. 2023) use a
    # learning rate 3-10x smaller than AdamW's; the setting takes the smallest reduction.
    return pyquant.Lion8bit(params, lr=lr / 3)


# The rest of bitsandbytes' 8-bit family, by name. Each keeps its class defaults; the learning rate is the study's
# (Adam's) times the ratio of the algorithm's usual rate to Adam's 1e-3: SGD with momentum 0.9 and Adagrad take
# 10x (torch's Adagrad default is 1e-2; bench/family_accuracy.py trains both at 1e-2 on digits and breast cancer),
# LARS (momentum 0.9, trust coefficient 0.02) 100x, as there; RMSprop, AdEMAMix and LAMB (whose update has norm
# lr * ||p||) Adam's own.
FAMILY = {
    "sgd8bit": ("SGD8bit", 10.0, {"momentum": 0.9}),
    "rmsprop8bit": ("RMSprop8bit", 1.0, {}),
    "adagrad8bit": ("Adagrad8bit", 10.0, {}),
    "ademamix8bit": ("AdEMAMix8bit", 1.0, {}),
    "lamb8bit": ("LAMB8bit", 1.0, {}),
    "lars8bit": ("LARS8bit", 100.0, {"momentum": 0.9}),
}


def _family_factory(class_name: str, lr_factor: float, options: dict):
    def factory(params, lr):
        import pyquant

        return getattr(pyquant, class_name)(params, lr=lr * lr_factor, **options)

    return factory


for _name, (_class, _factor, _options) in FAMILY.items():
    register_optimizer(_name)(_family_factory(_class, _factor, _options))


@register_optimizer("bnb-8bit")
def _bnb_adam8bit(params, lr):
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("setting 'bnb-8bit' needs bitsandbytes (pip install bitsandbytes)") from e
    return bnb.optim.Adam8bit(params, lr=lr)


@dataclass(frozen=True)
class Setting:
    """A recipe. ``autocast`` / ``model_dtype``: None (float32), "auto", "bfloat16" or "float16".
    ``loss_scaling``: "auto" (when anything runs in float16), "always" or "never".
    ``norms_fp32``: in a half-precision model, keep normalisation layers (and their statistics) in float32.
    Data selection (pyquant.subsets; set through name modifiers, see :func:`get_setting`): ``subset`` is a method
    of ``pyquant.experiment.subset_settings.SUBSET_METHODS`` keeping ``subset_fraction`` of the training data
    before training, ``importance_sampling`` turns on Katharopoulos & Fleuret's sampler, ``time_budget_s`` stops
    training after the first epoch that ends past that many seconds (for comparisons at equal wall-clock)."""

    name: str
    optimizer: str = "adam"
    autocast: Optional[str] = None
    model_dtype: Optional[str] = None
    loss_scaling: str = "auto"
    norms_fp32: bool = True
    description: str = ""
    subset: str | None = None
    subset_fraction: float = 1.0
    importance_sampling: bool = False
    time_budget_s: float | None = None


def register_setting(setting: Setting) -> Setting:
    SETTINGS[setting.name] = setting
    return setting


def get_setting(name: str) -> Setting:
    """A registered setting, or a composite name: a registered setting followed by modifiers joined with "+", e.g.
    ``amp+8bit+subset:proxy@0.25``, ``8bit+importance-sampling``; modifiers alone apply to ``baseline``
    (``subset:moderate@0.5``). Modifiers: ``subset:<method>@<fraction>`` (fraction in (0, 1]),
    ``importance-sampling``, ``budget:<seconds>s``. The composite keeps its full name, so it is what records show."""
    if name in SETTINGS:
        return SETTINGS[name]
    base, changes = [], {}
    for part in name.split("+"):
        modifier = _modifier(part, name)
        if modifier is None:
            if changes:
                raise ValueError(f"setting {name!r}: modifiers come after the registered setting, found {part!r} after them")
            base.append(part)
        elif set(modifier) & set(changes):
            raise ValueError(f"setting {name!r}: {part!r} repeats a modifier")
        else:
            changes.update(modifier)
    base_name = "+".join(base) or "baseline"
    if not changes or base_name not in SETTINGS:
        raise KeyError(f"unknown setting {base_name!r}; registered: {', '.join(SETTINGS)} (add one with register_setting), "
                       "optionally followed by +subset:<method>@<fraction>, +importance-sampling, +budget:<seconds>s")
    return replace(SETTINGS[base_name], name=name, **changes)


def _modifier(part: str, name: str) -> dict | None:
    """The Setting fields a name modifier sets, or None when ``part`` is not a modifier."""
    if part == "importance-sampling":
        return {"importance_sampling": True}
    if part.startswith("budget:"):
        text = part.removeprefix("budget:")
        seconds = _number(text.removesuffix("s"), f"setting {name!r}: budget {text!r} must be seconds, e.g. budget:60s")
        if not text.endswith("s") or not 0 < seconds < math.inf:
            raise ValueError(f"setting {name!r}: budget {text!r} must be a positive number of seconds, e.g. budget:60s")
        return {"time_budget_s": seconds}
    if part.startswith("subset:"):
        from pyquant.experiment.subset_settings import SUBSET_METHODS

        method, at, fraction_text = part.removeprefix("subset:").partition("@")
        if method not in SUBSET_METHODS:
            raise ValueError(f"setting {name!r}: unknown subset method {method!r}; use one of {', '.join(SUBSET_METHODS)}")
        fraction = _number(fraction_text, f"setting {name!r}: {part!r} needs a fraction, e.g. subset:{method}@0.5")
        if not at or not 0 < fraction <= 1:
            raise ValueError(f"setting {name!r}: subset fraction must be in (0, 1], got {fraction_text!r}")
        return {"subset": method, "subset_fraction": fraction}
    return None


def _number(text: str, message: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(message) from None


PAPER_SETTINGS = ("baseline", "amp", "8bit", "amp+8bit", "half+8bit")
for _s in [
    Setting("baseline", description="float32 model, torch.optim.Adam"),
    Setting("amp", autocast="auto", description="autocast (float16 on CUDA, bfloat16 on CPU) + loss scaling in float16"),
    Setting("8bit", optimizer="8bit", description="pyquant.Adam8bit: 8-bit optimizer states"),
    Setting("amp+8bit", optimizer="8bit", autocast="auto", description="autocast + pyquant.Adam8bit"),
    Setting("half+8bit", optimizer="8bit", model_dtype="auto",
            description="half-precision model (norms in float32), pyquant.Adam8bit, loss scaling in float16"),
    Setting("4bit", optimizer="adam4bit", description="pyquant.Adam4bit: 4-bit optimizer states (rank-1 second moment)"),
    Setting("amp+4bit", optimizer="adam4bit", autocast="auto", description="autocast + pyquant.Adam4bit"),
    Setting("lion8bit", optimizer="lion8bit", description="pyquant.Lion8bit (8-bit momentum) at a third of Adam's lr"),
    Setting("amp+lion8bit", optimizer="lion8bit", autocast="auto", description="autocast + pyquant.Lion8bit"),
    *(Setting(name, optimizer=name, description=f"pyquant.{cls}" + (f" at {factor:g}x Adam's learning rate" if factor != 1 else "")
              + "".join(f", {k}={v}" for k, v in options.items()))
      for name, (cls, factor, options) in FAMILY.items()),
    Setting("bnb-8bit", optimizer="bnb-8bit", description="bitsandbytes.optim.Adam8bit, for comparison"),
    Setting("bf16", autocast="bfloat16", description="bfloat16 autocast, torch.optim.Adam"),
]:
    register_setting(_s)


@dataclass(frozen=True)
class Recipe:
    """A setting resolved for one device: concrete dtypes and whether the loss is scaled."""

    setting: Setting
    device_type: str
    autocast_dtype: Optional[torch.dtype]
    model_dtype: torch.dtype
    loss_scaling: bool

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        if self.setting.optimizer not in OPTIMIZERS:
            raise KeyError(f"unknown optimizer {self.setting.optimizer!r}; registered: {', '.join(OPTIMIZERS)}")
        return OPTIMIZERS[self.setting.optimizer](params, lr)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Cast a float32 model to the model dtype (keeping norms in float32 when the setting says so).

        float16 on a CPU without FP16 arithmetic goes through `pyquant.amp.half`: there torch's float16
        convolutions and matmuls are 20-40x slower than float32, pyquant's Conv2d16 / Linear16 are not
        (docs/low_precision.md, section 8). Elsewhere (bfloat16, CUDA) torch's own kernels are fast: a plain
        cast, which also keeps the run's numerics independent of any speed measurement."""
        if self.model_dtype == torch.float32:
            return model
        from pyquant.nn.half_precision import default_impl

        device = next(iter(model.parameters()), torch.empty(0)).device
        if default_impl(device, self.model_dtype) == "pyquant":
            from pyquant.amp import half

            return half(model, self.model_dtype, keep_norm_fp32=self.setting.norms_fp32)
        model.to(self.model_dtype)
        if self.setting.norms_fp32:
            norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
            for module in model.modules():
                if isinstance(module, norms):
                    module.float()
        return model

    def record(self) -> dict:
        return {
            **asdict(self.setting),
            "device_type": self.device_type,
            "autocast_dtype": None if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch."),
            "model_dtype": str(self.model_dtype).removeprefix("torch."),
            "loss_scaling_used": self.loss_scaling,
        }


def _dtype(value: Optional[str], device_type: str, override: str) -> Optional[torch.dtype]:
    if value is None:
        return None
    if value == "auto":
        value = override if override != "auto" else ("float16" if device_type == "cuda" else "bfloat16")
    if value not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[value]


def resolve(setting: Setting | str, device_type: str, amp_dtype: str = "auto", half_dtype: str = "auto") -> Recipe:
    """Concrete dtypes for ``device_type``; ``amp_dtype`` / ``half_dtype`` replace "auto" when not "auto"."""
    setting = get_setting(setting) if isinstance(setting, str) else setting
    autocast_dtype = _dtype(setting.autocast, device_type, amp_dtype)
    model_dtype = _dtype(setting.model_dtype, device_type, half_dtype) or torch.float32
    if setting.loss_scaling not in ("auto", "always", "never"):
        raise ValueError(f"loss_scaling must be auto, always or never, got {setting.loss_scaling!r}")
    uses_fp16 = torch.float16 in (autocast_dtype, model_dtype)
    scaling = setting.loss_scaling == "always" or (setting.loss_scaling == "auto" and uses_fp16)
    return Recipe(setting, device_type, autocast_dtype, model_dtype, scaling)
