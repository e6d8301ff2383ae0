"""Hugging Face image classifiers (`hf:PATH_OR_ID`): transformers' AutoModelForImageClassification (ViT, DeiT,
ConvNeXt, Swin, ...) as a plain `nn.Module` that maps pixels to logits.

`HFClassifier` registers the Hugging Face model's own children as its own, so its module names (the layers
softcache taps: `vit.layers.11`, `classifier`) and its state_dict keys are the model's. A folder written by
`save_pretrained` loads with `hf:FOLDER,pretrained=true` (transformers converts the key names it stores, which
can differ from the modules' own); `--weights` takes what softcache itself writes (`model.pt`). Its input conventions
(mean, std, size, resampling, crop) are the image processor's (`preprocessor_config.json`); without one, the
dataset's normalisation.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from softcache.errors import SoftcacheError
from softcache.models import CONVENTIONS_ATTR, Conventions

# PIL resampling codes, as the image processors store them
RESAMPLING = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HFClassifier(nn.Module):
    """`forward(pixel_values [B, 3, H, W]) -> logits [B, K]` of a transformers image classifier."""

    def __init__(self, model: nn.Module, conventions: Conventions | None):
        super().__init__()
        if model._parameters or model._buffers:
            raise SoftcacheError(f"{type(model).__name__} holds parameters outside its submodules; "
                                 "softcache cannot serve it as hf:")
        for name, child in model.named_children():
            self.add_module(name, child)
        self._hf = (model,)  # a tuple, so the model is not registered twice (its children already are)
        setattr(self, CONVENTIONS_ATTR, conventions)

    def train(self, mode: bool = True) -> HFClassifier:
        super().train(mode)
        self._hf[0].training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._hf[0](pixel_values=x).logits


def hf_conventions(path: str, overrides: dict[str, Any] | None = None) -> Conventions | None:
    """The image processor's conventions at `path`, or None where there is none (the dataset's normalisation);
    an `image_size` override of the config is the input size."""
    from transformers import AutoImageProcessor
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):  # no preprocessor_config.json
        return None
    if getattr(processor, "image_mean", None) is None:
        return None
    side = getattr(processor, "size", None) or {}
    side = {"height": side} if isinstance(side, int) else dict(side)
    found = (overrides or {}).get("image_size") or side.get("height") or side.get("shortest_edge")
    return Conventions(tuple(float(v) for v in processor.image_mean), tuple(float(v) for v in processor.image_std),
                       int(found) if found else None, RESAMPLING.get(getattr(processor, "resample", 2), "bilinear"),
                       float(getattr(processor, "crop_pct", None) or 0.875), "hf image processor")


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def build_hf(path: str, num_classes: int, *, pretrained: bool, overrides: dict[str, Any]) -> HFClassifier:
    """The classifier at `path` (a folder written by `save_pretrained`, or a Hub id: a download) with a
    `num_classes`-way head: its config (`overrides` set attributes of it, e.g. `num_hidden_layers=2`) freshly
    initialised, or with `pretrained` its weights, the head re-initialised when the class count differs."""
    from transformers import AutoConfig, AutoModelForImageClassification
    try:
        config = AutoConfig.from_pretrained(path, num_labels=num_classes, **overrides)
    except (OSError, ValueError) as err:
        raise SoftcacheError(f"hf:{path}: no Hugging Face model there ({_first_line(err)}); give a folder "
                             "written by save_pretrained, or a Hub id such as google/vit-base-patch16-224") from None
    try:
        if pretrained:
            model = AutoModelForImageClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True)
        else:
            model = AutoModelForImageClassification.from_config(config)
    except ValueError as err:
        raise SoftcacheError(f"hf:{path} is a {type(config).__name__}, not an image classifier "
                             f"({_first_line(err)}); give an AutoModelForImageClassification model") from None
    return HFClassifier(model, hf_conventions(path, overrides))
