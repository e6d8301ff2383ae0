"""Models by name, checkpoints, and feature taps.

Names: the CIFAR ResNets of `softcache.cifar_resnet`, any torchvision classification model (`resnet18`,
`mobilenet_v3_small`, ...), or a user's own `package.module:callable` called as `callable(num_classes=K)`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from softcache.cifar_resnet import CIFAR_RESNETS, CifarResNet, cifar_resnet
from softcache.errors import SoftcacheError
from softcache.imports import import_callable


def torchvision_models() -> list[str]:
    """torchvision's classification model names (not detection, segmentation or video)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model with a `num_classes`-way classifier."""
    if name in CIFAR_RESNETS:
        return cifar_resnet(name, num_classes)
    if ":" in name:
        try:
            factory = import_callable(name)
        except (ImportError, AttributeError) as err:
            raise SoftcacheError(f"cannot load custom model '{name}' ({err}); "
                                 "expected package.module:callable") from None
        try:
            model = factory(num_classes=num_classes)
        except TypeError as err:
            raise SoftcacheError(f"custom model '{name}' cannot be called as {name}(num_classes={num_classes}) "
                                 f"({err}); "
                                 "give a callable that takes num_classes and returns a torch.nn.Module") from None
        if not isinstance(model, nn.Module):
            raise SoftcacheError(f"custom model '{name}' returned a {type(model).__name__}, not a torch.nn.Module; "
                                 "give a callable that builds the model, called as callable(num_classes=K)")
        return model
    if name in torchvision_models():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise SoftcacheError(f"unknown model '{name}'; valid: {', '.join(CIFAR_RESNETS)}, any torchvision "
                         "classification model (e.g. resnet18, mobilenet_v3_small), or package.module:callable")


@torch.no_grad()
def check_classes(model: nn.Module, name: str, num_classes: int, image_size: int) -> None:
    """Refuse a model whose output is not `[B, num_classes]` logits (a custom callable that ignores
    num_classes, weights of another dataset), from one forward of a blank image, before any training."""
    training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(training)
    shape = tuple(getattr(out, "shape", ()))
    if shape != (1, num_classes):
        got = f"{shape[-1]} logits" if len(shape) == 2 else f"an output of shape {list(shape) or type(out).__name__}"
        raise SoftcacheError(f"model '{name}' gives {got} per image, but the data has {num_classes} classes; "
                             f"give a model with a {num_classes}-way classifier "
                             f"(custom callables get num_classes={num_classes})")


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


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a `state_dict` file into `model`, refusing with the missing/unexpected/mis-shaped keys if it does not fit.

    Accepts what `train-teacher` writes, a plain `torch.save(model.state_dict())`, or a dict holding one
    under 'state_dict' or 'model'; a DistributedDataParallel 'module.' prefix is dropped. CIFAR ResNet
    checkpoints of RepDistiller and mdistiller (`ckpt_epoch_240.pth`) load through `repdistiller_keys`.
    """
    path = Path(path)
    if not path.is_file():
        raise SoftcacheError(f"weights file '{path}' does not exist; "
                             "give the model.pt a train-teacher run wrote, or a torch.save'd state_dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise SoftcacheError(f"'{path}' is not a readable torch checkpoint ({type(err).__name__}); "
                             "expected a state_dict file") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise SoftcacheError(f"'{path}' holds a {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
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


EMBEDDING = "embedding"


def classifier_name(model: nn.Module) -> str | None:
    """The model's final classifier: its last `nn.Linear` in module order (CIFAR and torchvision ResNets' `fc`,
    torchvision's `classifier.N` or `heads.head`), or None when it has none."""
    return next((name for name, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)


def layer_names(model: nn.Module) -> list[str]:
    """Every tappable name: the module names, and `embedding` (the classifier's input) when there is one."""
    names = [name for name, _ in model.named_modules() if name]
    return ([EMBEDDING] if classifier_name(model) is not None else []) + names


def check_layers(model: nn.Module, layers: Sequence[str], what: str = "layer") -> None:
    """Refuse unknown module names, listing the valid ones (top-level first)."""
    if EMBEDDING in layers and classifier_name(model) is None:
        raise SoftcacheError(f"{type(model).__name__} has no final nn.Linear classifier, so it has no '{EMBEDDING}' "
                             "(the classifier's input); tap a named layer instead")
    names = layer_names(model)
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        top = [n for n in names if "." not in n]
        nested = len(names) - len(top)
        hint = f" (and {nested} nested names such as {next(n for n in names if '.' in n)})" if nested else ""
        raise SoftcacheError(f"unknown {what} '{unknown[0]}'; valid: {', '.join(top)}{hint}")


class Tapped(nn.Module):
    """`model` with forward hooks on named layers: `forward(x) -> (logits [B, K], {layer: feature [B, C, H, W]})`.

    The layer `embedding` is the input of the final classifier (`classifier_name`), flattened: `[B, D]`, e.g.
    the 64 pooled channels of a CIFAR ResNet-56 or the 512 of a torchvision ResNet-18.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        super().__init__()
        check_layers(model, layers)
        self.model, self.layers = model, list(layers)
        self._features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._hooks = [modules[classifier_name(model)].register_forward_pre_hook(self._embedding_hook())
                       if name == EMBEDDING else modules[name].register_forward_hook(self._hook(name))
                       for name in self.layers]

    def _hook(self, name: str):
        def store(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            self._features[name] = output
        return store

    def _embedding_hook(self):
        def store(_module: nn.Module, inputs: tuple) -> None:
            self._features[EMBEDDING] = torch.flatten(inputs[0], 1)
        return store

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._features = {}
        logits = self.model(x)
        features, self._features = self._features, {}
        return logits, features
