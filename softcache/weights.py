"""Checkpoints: weights files into models, refusing the ones that do not fit with the keys that differ.

Formats: a `torch.save`d state_dict (`.pt`, `.pth`, `.pth.tar`: what train-teacher writes), one held under
`state_dict`, `model` or `state_dict_ema` (timm's training checkpoints, their `args` Namespace included; the
first of these found is taken),
and `.safetensors` (timm's and Hugging Face's published files). A DistributedDataParallel `module.` prefix is
dropped; RepDistiller / mdistiller CIFAR ResNet checkpoints load through `repdistiller_keys`.
"""
from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from softcache.cifar_resnet import CifarResNet
from softcache.errors import SoftcacheError

WRAPPERS = ("state_dict", "model", "state_dict_ema")  # checkpoint keys that hold the state_dict, in this order


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listing(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def repdistiller_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A RepDistiller / mdistiller CIFAR ResNet state_dict under softcache's key names. Same architecture, other
    names: their stem `conv1` + `bn1` is softcache's `conv1.0` + `conv1.1`, and their block shortcut
    `downsample.{0,1}` is softcache's `shortcut.{0,1}`; every other key (blocks' conv/bn, `fc`) is the same."""
    out = {}
    for key, value in state.items():
        if key == "conv1.weight":
            key = "conv1.0.weight"
        elif key.startswith("bn1."):
            key = "conv1.1." + key.removeprefix("bn1.")
        out[key.replace(".downsample.", ".shortcut.")] = value
    return out


def check_weights_file(path: str | Path) -> Path:
    """Refuse a weights file that does not exist (checked before any data or model is loaded)."""
    path = Path(path)
    if not path.is_file():
        raise SoftcacheError(f"weights file '{path}' does not exist; give the model.pt a train-teacher run wrote, "
                             "a torch.save'd state_dict or a .safetensors file")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict a weights file holds (see the module docstring), `module.` prefixes dropped."""
    path = check_weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise SoftcacheError(f"'{path}' is not a readable safetensors file ({err})") from None
    else:
        try:  # timm's training checkpoints hold their argparse.Namespace of arguments beside the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a file that is not a checkpoint
            raise SoftcacheError(f"'{path}' is not a readable torch checkpoint ({type(err).__name__}); "
                                 "expected a state_dict file (.pt, .pth) or a .safetensors") from None
    for wrapper in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise SoftcacheError(f"'{path}' holds a {type(state).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights file `path` into `model`, refusing with the missing/unexpected/mis-shaped keys if it
    does not fit."""
    state = read_state_dict(path)
    expected = model.state_dict()
    if isinstance(model, CifarResNet) and set(state) != set(expected):
        renamed = repdistiller_keys(state)
        if set(renamed) == set(expected):  # a RepDistiller / mdistiller CIFAR ResNet checkpoint
            state = renamed
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if misshaped:
            parts.append(f"shape mismatch (checkpoint vs model, a different class count?): {_listing(misshaped, 3)}")
        raise SoftcacheError(f"checkpoint '{path}' does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state)
    return model
