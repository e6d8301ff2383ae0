"""Models by name, checkpoints, input conventions and feature taps.

A model name is one of (`SOURCES`, tried in this order):

    resnet56, resnet8x4, ...       the CIFAR ResNets of `softcache.cifar_resnet`
    timm:NAME[,KEY=VALUE,...]      `timm.create_model(NAME, num_classes=K, KEY=VALUE, ...)`, e.g.
                                   `timm:vit_tiny_patch16_224,img_size=32,patch_size=4,drop_path_rate=0.1`
    hf:PATH_OR_ID[,KEY=VALUE,...]  a Hugging Face image classifier (`softcache.hf`); KEY=VALUE set its config
    package.module:callable        a user's own, called as `callable(num_classes=K)`
    resnet18, vit_b_16, ...        any torchvision classification model

`pretrained=true` (timm, hf) loads the zoo's published weights (a download, for users with internet); without
it the model is freshly initialised and `--weights` loads a checkpoint (`softcache.weights`).
"""
from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from softcache.cifar_resnet import CIFAR_RESNETS, cifar_resnet
from softcache.errors import SoftcacheError
from softcache.imports import import_callable
from softcache.weights import file_sha256, load_weights  # noqa: F401  (re-exported: callers load from here)

ZOOS = ("timm", "hf")  # the `SOURCE:` prefixes that name a model zoo rather than a user's package.module


def torchvision_models() -> list[str]:
    """torchvision's classification model names (not detection, segmentation or video)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _value(text: str) -> Any:
    """A `KEY=VALUE` value: an int, a float, true / false / none, or the text itself."""
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: its source, the name within it, and the `KEY=VALUE` options after it."""

    source: str                          # cifar, timm, hf, callable, torchvision
    name: str                            # resnet56, vit_tiny_patch16_224, ./my-vit, pkg.mod:fn, resnet18
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        zoo, sep, rest = spec.partition(":")
        if sep and zoo in ZOOS:
            name, *pairs = rest.split(",")
            options = []
            for pair in pairs:
                key, eq, value = pair.partition("=")
                if not eq or not key.strip():
                    raise SoftcacheError(f"model '{spec}': option '{pair}' is not KEY=VALUE; write "
                                         f"{zoo}:NAME,KEY=VALUE,... (e.g. timm:resnet18,drop_path_rate=0.1)")
                options.append((key.strip(), _value(value.strip())))
            if not name:
                raise SoftcacheError(f"model '{spec}' names no {zoo} model; write {zoo}:NAME")
            return cls(zoo, name, tuple(options))
        if spec in CIFAR_RESNETS:
            return cls("cifar", spec)
        return cls("callable" if sep else "torchvision", spec)

    @property
    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.options if k != "pretrained"}

    @property
    def pretrained(self) -> bool:
        return bool(dict(self.options).get("pretrained", False))


def _zoo_import(module: str, how: str):
    try:
        return __import__(module)
    except ImportError:
        raise SoftcacheError(f"{module} models need the {module} package: pip install {module} ({how})") from None


def _suggest(name: str, valid: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    return f"unknown {what} '{name}'" + (f"; closest: {', '.join(close)}" if close else "")


def _timm(spec: ModelSpec, num_classes: int) -> nn.Module:
    timm = _zoo_import("timm", "a softcache dependency")
    if not timm.is_model(spec.name):
        raise SoftcacheError(_suggest(spec.name, timm.list_models(), "timm model")
                             + " (timm.list_models() lists them all)")
    kwargs = spec.kwargs
    if "img_size" in kwargs:  # the conventions follow the size the model is built for
        size = kwargs["img_size"]
        kwargs["pretrained_cfg_overlay"] = {"input_size": (3, *((size, size) if isinstance(size, int) else size))}
    try:
        model = timm.create_model(spec.name, pretrained=spec.pretrained, num_classes=num_classes, **kwargs)
    except TypeError as err:
        if not spec.kwargs:
            raise
        raise SoftcacheError(f"timm:{spec.name} does not take {', '.join(spec.kwargs)} ({err}); "
                             "give the keyword arguments its model class takes") from None
    setattr(model, CONVENTIONS_ATTR, Conventions.from_timm(dict(model.pretrained_cfg)))
    return model


def _hf(spec: ModelSpec, num_classes: int) -> nn.Module:
    _zoo_import("transformers", "or pip install 'softcache[hf]'")
    from softcache.hf import build_hf
    return build_hf(spec.name, num_classes, pretrained=spec.pretrained, overrides=spec.kwargs)


def _callable(spec: ModelSpec, num_classes: int) -> nn.Module:
    name = spec.name
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


def _torchvision(spec: ModelSpec, num_classes: int) -> nn.Module:
    if spec.name not in torchvision_models():
        raise SoftcacheError(f"unknown model '{spec.name}'; valid: {', '.join(CIFAR_RESNETS)}, any torchvision "
                             "classification model (e.g. resnet18, mobilenet_v3_small), timm:NAME, hf:PATH_OR_ID, "
                             "or package.module:callable")
    return torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes)


SOURCES: dict[str, Callable[[ModelSpec, int], nn.Module]] = {
    "cifar": lambda spec, k: cifar_resnet(spec.name, k),
    "timm": _timm,
    "hf": _hf,
    "callable": _callable,
    "torchvision": _torchvision,
}


def is_pretrained(name: str) -> bool:
    """Whether `name` asks for its zoo's published weights (`timm:NAME,pretrained=true`)."""
    return ModelSpec.parse(name).pretrained


def build_model(name: str, num_classes: int, *, weights_follow: bool = False) -> nn.Module:
    """The model `name` (see the module docstring) with a `num_classes`-way classifier: freshly initialised,
    or with its zoo's published weights for `pretrained=true`, unless `weights_follow` (a weights file is
    loaded next: a run's model.pt of a model fine-tuned from them needs no download)."""
    spec = ModelSpec.parse(name)
    if weights_follow and spec.pretrained:
        spec = replace(spec, options=tuple((k, v) for k, v in spec.options if k != "pretrained"))
    return SOURCES[spec.source](spec, num_classes)


@dataclass(frozen=True)
class Conventions:
    """How a zoo model expects its input (timm's `pretrained_cfg`, a Hugging Face image processor): what its
    views are normalised with, the view side it is built for, the resampling and the evaluation crop."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int | None = None   # the default view side of the `imagenet` policy (instead of 224)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875         # the `imagenet` policy's evaluation crop (a centred square of this fraction)
    source: str = ""                # where they were read: "timm pretrained_cfg", "hf image processor"

    def to_json(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "input_size": self.input_size,
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "source": self.source}

    @classmethod
    def from_timm(cls, cfg: dict[str, Any]) -> Conventions | None:
        if not cfg or "mean" not in cfg or "std" not in cfg:
            return None
        size = cfg.get("input_size")
        return cls(tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),
                   int(size[-1]) if size else None, str(cfg.get("interpolation") or "bilinear"),
                   float(cfg.get("crop_pct") or 0.875), "timm pretrained_cfg")


CONVENTIONS_ATTR = "softcache_conventions"  # set on the models built from timm: and hf: names


def conventions(model: nn.Module) -> Conventions | None:
    """A model's input conventions, as `build_model` recorded them for a timm: or hf: name; None for the CIFAR
    ResNets, torchvision and user models, a timm model returned by a user's callable included (they keep the
    dataset's normalisation and the policies' sizes)."""
    return getattr(model, CONVENTIONS_ATTR, None)


def spec_conventions(name: str) -> Conventions | None:
    """`conventions(build_model(name, K))`, read without building the model (a dump describes its cache, and
    reuses a finished one, before any teacher is built)."""
    spec = ModelSpec.parse(name)
    if spec.source == "timm":
        timm = _zoo_import("timm", "a softcache dependency")
        found = timm.models.get_pretrained_cfg(spec.name)
        cfg = found.to_dict() if found is not None else {}
        size = spec.kwargs.get("img_size")
        if size is not None:
            cfg["input_size"] = (3, *((size, size) if isinstance(size, int) else size))
        return Conventions.from_timm(cfg)
    if spec.source == "hf":
        _zoo_import("transformers", "or pip install 'softcache[hf]'")
        from softcache.hf import hf_conventions
        return hf_conventions(spec.name, spec.kwargs)
    return None


def published_classes(name: str) -> int | None:
    """How many classes the published weights of a `pretrained=true` zoo name classify (timm's
    `pretrained_cfg['num_classes']`, a Hugging Face config's `num_labels`); None where unknown or not pretrained."""
    spec = ModelSpec.parse(name)
    if not spec.pretrained or spec.source not in ZOOS:
        return None
    if spec.source == "timm":
        found = _zoo_import("timm", "a softcache dependency").models.get_pretrained_cfg(spec.name)
        return int(found.num_classes) if found is not None and found.num_classes else None
    from transformers import AutoConfig
    return int(AutoConfig.from_pretrained(spec.name).num_labels)


def check_published_head(name: str, num_classes: int, what: str = "teacher") -> None:
    """Refuse a pretrained zoo teacher used as it is whose published classifier does not fit the data: the zoo
    would give it a fresh, random head (and a cache of random logits)."""
    published = published_classes(name)
    if published is not None and published != num_classes:
        raise SoftcacheError(f"{what} '{name}' is used with its published weights, whose classifier has {published} "
                             f"classes, but the data has {num_classes}: the zoo would give it a random "
                             f"{num_classes}-way head; fine-tune it first (train-teacher --model {name}) and give "
                             "its model.pt as --weights")


def input_norm(model: nn.Module, source: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The `(mean, std)` `model`'s views are normalised with: its own conventions, else the dataset's
    (`source.mean`, `source.std`)."""
    found = conventions(model)
    return (found.mean, found.std) if found is not None else (tuple(source.mean), tuple(source.std))


@torch.no_grad()
def check_classes(model: nn.Module, name: str, num_classes: int, image_size: int) -> None:
    """Refuse a model that cannot take `image_size` views, or whose output is not `[B, num_classes]` logits (a
    custom callable that ignores num_classes, weights of another dataset), from one forward of a blank image,
    before any training."""
    training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(torch.zeros(1, 3, image_size, image_size, device=device))
    except (AssertionError, RuntimeError, ValueError) as err:  # timm asserts, HF raises ValueError, convs RuntimeError
        size = conventions(model)
        hint = (f"; it is built for {size.input_size}x{size.input_size}: give --image-size {size.input_size}"
                if size is not None and size.input_size else "")
        zoo = ", or build it for this size (timm: NAME,img_size=S; hf: PATH,image_size=S)" if size else ""
        raise SoftcacheError(f"model '{name}' cannot take {image_size}x{image_size} views "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__}){hint}{zoo}") from None
    finally:
        model.train(training)
    shape = tuple(getattr(out, "shape", ()))
    if shape != (1, num_classes):
        got = f"{shape[-1]} logits" if len(shape) == 2 else f"an output of shape {list(shape) or type(out).__name__}"
        raise SoftcacheError(f"model '{name}' gives {got} per image, but the data has {num_classes} classes; "
                             f"give a model with a {num_classes}-way classifier "
                             f"(custom callables get num_classes={num_classes})")


EMBEDDING = "embedding"
DIST_LOGITS = "dist_logits"  # a DeiT student's distillation-head logits, beside its features (`Tapped`)


def classifier_name(model: nn.Module) -> str | None:
    """The model's final classifier: timm's `pretrained_cfg['classifier']` (the first, for DeiT's two heads),
    else its last `nn.Linear` in module order (CIFAR and torchvision ResNets' `fc`, torchvision's
    `classifier.N` or `heads.head`, a Hugging Face model's `classifier`), or None when it has none."""
    modules = dict(model.named_modules())
    named = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    named = named[0] if isinstance(named, (list, tuple)) else named
    if isinstance(named, str) and isinstance(modules.get(named), nn.Linear):
        return named
    return next((name for name, m in reversed(list(modules.items())) if isinstance(m, nn.Linear)), None)


PRE_RELU = ".pre_relu"  # LAYER.pre_relu: LAYER's output before its final ReLU (OFD, ReviewKD, AB use these)
INPUT_GRADIENT = "input_gradient"  # the input-gradient attention map of the model's top class (gat)


def input_gradient_map(gradient: torch.Tensor) -> torch.Tensor:
    """Gradient-based attention (Zagoruyko & Komodakis 2017, sec. 3.2): `|∂z/∂x|` summed over the colour channels
    and L2-normalised over positions, `[B, 3, H, W] -> [B, H, W]` float32."""
    b, _, h, w = gradient.shape
    return F.normalize(gradient.float().abs().sum(1).flatten(1), dim=1).view(b, h, w)


def pre_relu_module(model: nn.Module, layer: str) -> str:
    """The module whose input `LAYER.pre_relu` is: the last `nn.ReLU` registered inside LAYER (in a ResNet stage,
    its last block's final activation, whose input is the block's sum before the ReLU; the last call wins where
    one ReLU module serves a block twice, as torchvision's does). Refused when LAYER has no ReLU module."""
    base = layer[:-len(PRE_RELU)]
    module = dict(model.named_modules())[base]
    relus = [name for name, m in module.named_modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise SoftcacheError(f"'{layer}': {base} ({type(module).__name__}) has no nn.ReLU module, so its output before "
                             f"the final ReLU cannot be tapped (a functional relu leaves no hook); tap '{base}'")
    return f"{base}.{relus[-1]}" if relus[-1] else base


def bn_before_relu(model: nn.Module, layer: str) -> nn.BatchNorm2d | None:
    """The BatchNorm whose output `LAYER.pre_relu` sums before its ReLU: the last BatchNorm2d of the block that
    holds the ReLU, outside its shortcut (`shortcut`, `downsample`): a basic block's bn2, a bottleneck's bn3
    (mdistiller's `get_bn_before_relu`). None where the block has none."""
    block = pre_relu_module(model, layer).rpartition(".")[0]
    found = [m for name, m in dict(model.named_modules())[block].named_modules()
             if isinstance(m, nn.BatchNorm2d) and not {"shortcut", "downsample"} & set(name.split("."))]
    return found[-1] if found else None


def teacher_params(model: nn.Module, layers: Sequence[str], head: bool = False) -> dict[str, torch.Tensor]:
    """What a cache stores of the teacher itself, once (not per sample), by name, float32 on the CPU: for every
    `LAYER.pre_relu` layer the affine parameters and running statistics of `bn_before_relu` (OFD's margins
    come from them), as `bn/LAYER.pre_relu/{weight, bias, running_mean, running_var}`; with `head`, the final
    classifier's `classifier/{weight, bias}` (SimKD reuses it)."""
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        bn = bn_before_relu(model, layer) if layer.endswith(PRE_RELU) else None
        for key in ("weight", "bias", "running_mean", "running_var") if bn is not None else ():
            value = getattr(bn, key)
            if value is not None:
                out[f"bn/{layer}/{key}"] = value.detach().float().cpu().clone()
    if head:
        name = classifier_name(model)
        if name is None:
            raise SoftcacheError(f"{type(model).__name__} has no final nn.Linear classifier to store "
                                 "(--teacher-head); drop --teacher-head")
        fc = dict(model.named_modules())[name]
        out["classifier/weight"] = fc.weight.detach().float().cpu().clone()
        out["classifier/bias"] = (fc.bias.detach().float().cpu().clone() if fc.bias is not None
                                  else torch.zeros(fc.out_features))
    return out


def layer_names(model: nn.Module) -> list[str]:
    """Every tappable name: the module names, and `embedding` (the classifier's input) when there is one."""
    names = [name for name, _ in model.named_modules() if name]
    return ([EMBEDDING] if classifier_name(model) is not None else []) + names


def check_layers(model: nn.Module, layers: Sequence[str], what: str = "layer") -> None:
    """Refuse unknown module names, listing the nearest valid ones and the top-level ones."""
    if EMBEDDING in layers and classifier_name(model) is None:
        raise SoftcacheError(f"{type(model).__name__} has no final nn.Linear classifier, so it has no '{EMBEDDING}' "
                             "(the classifier's input); tap a named layer instead")
    names = layer_names(model) + [INPUT_GRADIENT]
    unknown = [layer for layer in layers
               if (layer[:-len(PRE_RELU)] if layer.endswith(PRE_RELU) else layer) not in names]
    if unknown:
        top = [n for n in names if "." not in n]
        close = [n for n in difflib.get_close_matches(unknown[0], names, n=4, cutoff=0.6) if n not in top]
        nested = len(names) - len(top)
        hint = (f"; nearest: {', '.join(close)}" if close else
                f" (and {nested} nested names such as {next(n for n in names if '.' in n)})" if nested else "")
        raise SoftcacheError(f"unknown {what} '{unknown[0]}'; valid: {', '.join(top)}{hint}")
    for layer in layers:
        if layer.endswith(PRE_RELU):
            pre_relu_module(model, layer)  # refuses a layer without a ReLU module


def prefix_tokens(count: int) -> int:
    """How many of `count` tokens `[N, D]` come before the patch grid (class, distillation, register tokens): the
    patch tokens are the last `g * g`, `g = isqrt(N)`; e.g. 197 = 1 + 14 * 14, 198 = 2 + 14 * 14, 64 = 0 + 8 * 8."""
    side = math.isqrt(count)
    return count - side * side


def class_token(tokens: torch.Tensor) -> torch.Tensor:
    """`[B, N, D] -> [B, D]`: the first (class) token when there are prefix tokens, else the mean of the patch
    tokens (a ViT without a class token). What the relation and embedding terms take from a token feature."""
    return tokens[:, 0] if prefix_tokens(tokens.shape[1]) else tokens.mean(1)


class Tapped(nn.Module):
    """`model` with forward hooks on named layers: `forward(x) -> (logits [B, K], {layer: feature})`.

    Features are what the module outputs: maps `[B, C, H, W]` of CNNs, tokens `[B, N, D]` of ViT blocks (the
    first tensor of a block that returns a tuple); `LAYER.pre_relu` is LAYER's output before its final ReLU (the
    input of its last `nn.ReLU`, `pre_relu_module`); `input_gradient` the input-gradient attention map of the
    model's top class (`input_gradient_map`, a backward pass through the model; its outputs are then detached:
    a teacher's pseudo-layer, for `dump-teacher --layers input_gradient`). The layer `embedding` is the input of
    the final classifier (`classifier_name`), flattened: `[B, D]`, e.g. the 64 pooled channels of a CIFAR
    ResNet-56, the 512 of a torchvision ResNet-18, timm's `forward_head(pre_logits=True)`. A DeiT student
    training its distillation head (timm's `set_distilled_training`) returns two logits: the class head's are
    `logits`, the distillation head's `features[DIST_LOGITS]`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        super().__init__()
        check_layers(model, layers)
        self.model, self.layers = model, list(layers)
        self._features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._hooks = [modules[classifier_name(model)].register_forward_pre_hook(self._embedding_hook())
                       if name == EMBEDDING else None if name == INPUT_GRADIENT else
                       modules[pre_relu_module(model, name)].register_forward_pre_hook(self._pre_relu_hook(name))
                       if name.endswith(PRE_RELU) else modules[name].register_forward_hook(self._hook(name))
                       for name in self.layers]

    def _pre_relu_hook(self, name: str):
        def store(_module: nn.Module, inputs: tuple) -> None:
            self._features[name] = inputs[0].clone()  # an in-place ReLU would overwrite it
        return store

    def _hook(self, name: str):
        def store(_module: nn.Module, _inputs, output) -> None:
            self._features[name] = output[0] if isinstance(output, (tuple, list)) else output
        return store

    def _embedding_hook(self):
        def store(_module: nn.Module, inputs: tuple) -> None:
            self._features[EMBEDDING] = torch.flatten(inputs[0], 1)
        return store

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._features = {}
        gradient = INPUT_GRADIENT in self.layers
        with torch.enable_grad() if gradient else contextlib.nullcontext():  # a teacher's map, under no_grad too
            if gradient:
                x = x.detach().requires_grad_(True)
            logits = self.model(x)
            if gradient:  # each sample's top logit (samples are independent: the sum's gradient is each one's)
                top = (logits[0] if isinstance(logits, tuple) else logits).float().max(1).values.sum()
                (grad,) = torch.autograd.grad(top, x)
                # a teacher's outputs, all of them detached: the graph that made the map is spent
                self._features = {k: v.detach() for k, v in self._features.items()}
                self._features[INPUT_GRADIENT] = input_gradient_map(grad)
                logits = tuple(z.detach() for z in logits) if isinstance(logits, tuple) else logits.detach()
        features, self._features = self._features, {}
        if isinstance(logits, tuple):  # DeiT's (class head, distillation head) while training distillation
            logits, features[DIST_LOGITS] = logits
        return logits, features
