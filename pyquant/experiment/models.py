"""Models by name: a registry like timm's, built offline with one input channel.

    @register_model("my_net")
    def my_net(in_chans=1, num_classes=2, img_size=None, **kwargs):
        return MyNet(in_chans, num_classes)

    model = create_model("densenet121", in_chans=1, num_classes=2)                 # random init
    model = create_model("densenet121", pretrained="weights/densenet121.pth")      # weights from a local file

Every builder takes ``in_chans``, ``num_classes`` and ``img_size`` (the input side length; CNNs ignore it, ViT and
Swin need it) plus its own keyword arguments. Nothing is downloaded: ``pretrained`` is None or a local file, loaded
through timm (which adapts a 3-channel stem to ``in_chans`` and drops a classifier of another size) for timm models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register ``fn(in_chans, num_classes, img_size=None, **kwargs) -> nn.Module`` under ``name``."""

    def decorate(fn):
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return decorate


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(
    name: str, in_chans: int = 1, num_classes: int = 2, pretrained: str | Path | None = None, **kwargs
) -> nn.Module:
    """Build the registered model ``name``; ``pretrained`` is None or a path to a local weights file."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())} (add one with @register_model)")
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained weights {pretrained}: no such file (nothing is downloaded)")
    return MODELS[name](in_chans=in_chans, num_classes=num_classes, pretrained=pretrained, **kwargs)


def _load_local(model: nn.Module, path) -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a pyquant experiment checkpoint
        state = state["model"]
    model.load_state_dict(state)
    return model


def _timm(arch: str, in_chans: int, num_classes: int, pretrained=None, **kwargs) -> nn.Module:
    import timm

    if pretrained is None:
        return timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=num_classes, **kwargs)
    return timm.create_model(
        arch, pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)},
        in_chans=in_chans, num_classes=num_classes, **kwargs,
    )


def _timm_cnn(arch: str):
    def build(in_chans=1, num_classes=2, img_size=None, pretrained=None, **kwargs):
        return _timm(arch, in_chans, num_classes, pretrained, **kwargs)

    return build


def _timm_vit(arch: str):
    def build(in_chans=1, num_classes=2, img_size=224, pretrained=None, **kwargs):
        return _timm(arch, in_chans, num_classes, pretrained, img_size=img_size or 224, **kwargs)

    return build


def _timm_swin(arch: str):
    def build(in_chans=1, num_classes=2, img_size=224, pretrained=None, window_size=None, **kwargs):
        img_size = img_size or 224
        if window_size is None:  # the last stage's grid (img_size / 32) when it is at most 8, else 7 (timm pads)
            window_size = img_size // 32 if img_size % 32 == 0 and 1 <= img_size // 32 <= 8 else 7
        return _timm(arch, in_chans, num_classes, pretrained, img_size=img_size, window_size=window_size, **kwargs)

    return build


# The paper's models (timm names) and small variants for the quick preset.
for _name, _arch in [("densenet121", "densenet121"), ("efficientnet_b0", "efficientnet_b0"), ("resnet18", "resnet18")]:
    register_model(_name)(_timm_cnn(_arch))
for _name, _arch in [
    ("vit_tiny", "vit_tiny_patch16_224"), ("vit_small", "vit_small_patch16_224"), ("vit_base", "vit_base_patch16_224")
]:
    register_model(_name)(_timm_vit(_arch))
for _name, _arch in [("swin_tiny", "swin_tiny_patch4_window7_224"), ("swin_base", "swin_base_patch4_window7_224")]:
    register_model(_name)(_timm_swin(_arch))


@register_model("densenet_small")
def densenet_small(in_chans=1, num_classes=2, img_size=None, pretrained=None, growth_rate=16, block_config=(4, 8, 8)):
    """timm's DenseNet with growth 16 and three dense blocks (4, 8, 8): DenseNet-121's design at 1/20 of its size,
    down-sampling 16x instead of 32x so that it takes images from 16 px up."""
    from timm.models.densenet import DenseNet

    model = DenseNet(growth_rate=growth_rate, block_config=tuple(block_config), in_chans=in_chans, num_classes=num_classes)
    return model if pretrained is None else _load_local(model, pretrained)


class MLP(nn.Sequential):
    """Flatten, then Linear-ReLU-Dropout blocks and a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden=(256, 128), dropout: float = 0.1):
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)


@register_model("mlp")
def mlp(in_chans=1, num_classes=2, img_size=None, pretrained=None, hidden=(256, 128), dropout=0.1):
    """An MLP on ``in_chans`` features (tabular), or on flattened ``in_chans x img_size x img_size`` images."""
    features = in_chans * (img_size * img_size if img_size else 1)
    model = MLP(features, num_classes, tuple(hidden), dropout)
    return model if pretrained is None else _load_local(model, pretrained)
