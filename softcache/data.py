"""Datasets by spec string, their fingerprints, and the procedural `synthetic` set.

A *source* is a split of a dataset seen as raw images: `source[i]` gives `(image, label)` with `image` a
uint8 tensor `[3, H, W]` in source pixels, before any augmentation. Views (crop boxes, flips, resizing) are
applied later by `softcache.views`, identically for the teacher at dump time and the student at replay time.

Spec strings:
    synthetic[:N]      built-in 10-class shapes set, N training images (default 2000), N // 5 test images
    cifar10[:ROOT]     torchvision CIFAR-10 under ROOT (default data/); fetched only with download=True
    cifar100[:ROOT]    likewise for CIFAR-100
    imagefolder:ROOT   ROOT/train and ROOT/test (or ROOT/val) in torchvision's ImageFolder layout
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torchvision
from torchvision.transforms.v2 import functional as TF

from softcache.errors import SoftcacheError

SPLITS = ("train", "test")
DEFAULT_ROOT = "data"

# Per-channel statistics used to normalise inputs; recorded in every cache manifest.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SYNTHETIC_STATS = ((0.5, 0.5, 0.5), (0.29, 0.29, 0.29))


class Source(torch.utils.data.Dataset):
    """One split of a dataset as raw uint8 images `[3, H, W]` with integer labels."""

    spec: str
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    @property
    def labels(self) -> np.ndarray:
        """All labels, `[N]` int64, without decoding images."""
        raise NotImplementedError

    def images(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The images at `indices`, uint8 `[3, H, W]` each: what `source[i][0]` gives, possibly decoded in one call."""
        return [self[i][0] for i in indices]

    def content_hash(self) -> str:
        """sha256 over what identifies the split's content (file names and sizes, or the arrays)."""
        raise NotImplementedError

    def image_sizes(self) -> dict[tuple[int, int], tuple[int, str]]:
        """Every image size `(H, W)` in the split: how many images have it and the first one's name. Subclasses
        read it without decoding where they can."""
        found: dict[tuple[int, int], tuple[int, str]] = {}
        for i in range(len(self)):
            size = tuple(self[i][0].shape[-2:])
            count, first = found.get(size, (0, f"sample {i}"))
            found[size] = (count + 1, first)
        return found

    def fingerprint(self) -> dict[str, Any]:
        """Sample count, class names and content hash; stored with every cache and checked by students."""
        return {"num_samples": len(self), "classes": list(self.classes), "sha256": self.content_hash()}


class ArraySource(Source):
    """A split held in memory as `images [N, H, W, 3] uint8` and `labels [N]` (CIFAR, synthetic)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], classes: Sequence[str], spec: str,
                 mean: Sequence[float], std: Sequence[float]):
        assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8, (
            "images must be [N, H, W, 3] uint8")
        self.images = images
        self._labels = np.asarray(labels, dtype=np.int64)
        self.classes, self.spec = list(classes), spec
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1), int(self._labels[i])

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def image_sizes(self) -> dict[tuple[int, int], tuple[int, str]]:
        return {tuple(self.images.shape[1:3]): (len(self), "sample 0")} if len(self) else {}

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).data)
        h.update(self._labels.data)
        return h.hexdigest()


class _KnownClasses(torchvision.datasets.ImageFolder):
    """An ImageFolder whose labels follow a given class list (the training split's), by class name."""

    def __init__(self, root: str, classes: Sequence[str]):
        self._known = list(classes)
        super().__init__(root, allow_empty=True)  # a split may lack some classes

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        unknown = [c for c in present if c not in self._known]
        if unknown:
            raise SoftcacheError(f"'{directory}' has class folder '{unknown[0]}', which the training split does not "
                                 f"have; its classes are: {', '.join(self._known)}")
        return self._known, {c: k for k, c in enumerate(self._known)}


class FolderSource(Source):
    """A split in torchvision's ImageFolder layout (`ROOT/<class>/<file>`), decoded per access.

    `classes` (the training split's class list) makes the labels follow it by class name, so a test split
    that lacks a class keeps the training split's label numbers."""

    def __init__(self, root: Path, spec: str, mean: Sequence[float] = IMAGENET_STATS[0],
                 std: Sequence[float] = IMAGENET_STATS[1], classes: Sequence[str] | None = None):
        self.root = Path(root)
        self.folder = (torchvision.datasets.ImageFolder(str(self.root)) if classes is None
                       else _KnownClasses(str(self.root), classes))
        self.classes, self.spec = list(self.folder.classes), spec
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images([i])[0], self.folder.samples[i][1]

    def images(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Decoded with torchvision (libjpeg-turbo; the same pixels as PIL), JPEGs in one batched call; formats
        torchvision does not read go through PIL, as ImageFolder's own loader does."""
        paths = [self.folder.samples[i][0] for i in indices]
        raw = []
        for path in paths:
            with open(path, "rb") as f:
                raw.append(f.read())
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)
                for b in raw]
        jpeg = [k for k, b in enumerate(raw) if b[:2] == b"\xff\xd8"]
        out: list[torch.Tensor | None] = [None] * len(paths)
        if jpeg:
            try:
                decoded = torchvision.io.decode_jpeg([data[k] for k in jpeg], mode=torchvision.io.ImageReadMode.RGB)
            except RuntimeError:  # one of them is damaged: decode them one by one below, to name it
                decoded = [None] * len(jpeg)
            for k, image in zip(jpeg, decoded):
                out[k] = image
        return [image if image is not None else self._decode_one(path, raw_data)
                for image, path, raw_data in zip(out, paths, data)]

    def _decode_one(self, path: str, data: torch.Tensor) -> torch.Tensor:
        """One image through torchvision, else PIL (BMP, TIFF, ...); one that neither reads is named."""
        try:
            return torchvision.io.decode_image(data, mode=torchvision.io.ImageReadMode.RGB)
        except RuntimeError:
            pass
        try:
            return TF.pil_to_tensor(self.folder.loader(path))
        except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
            what = "it is empty" if data.numel() == 0 else f"{type(err).__name__}: {str(err).splitlines()[0]}"
            raise SoftcacheError(f"image '{path}' cannot be read ({what}); replace or remove it and rerun "
                                 "(that changes the dataset: a dump it stopped then starts over, "
                                 "with --overwrite)") from None

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.folder.targets, dtype=np.int64)

    def image_sizes(self) -> dict[tuple[int, int], tuple[int, str]]:
        """From each file's header (PIL reads no pixels for it): about 40 us an image (CIFAR-10's 50,000: 1.9 s)."""
        found: dict[tuple[int, int], tuple[int, str]] = {}
        for path, _ in self.folder.samples:
            try:
                with PIL.Image.open(path) as image:
                    width, height = image.size
            except (OSError, ValueError):  # name the file that cannot be read, and why
                with open(path, "rb") as f:
                    raw = bytearray(f.read())
                data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                height, width = self._decode_one(path, data).shape[-2:]
            count, first = found.get((height, width), (0, path))
            found[(height, width)] = (count + 1, first)
        return found

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for path, label in self.folder.samples:
            rel = os.path.relpath(path, self.root)
            h.update(f"{rel}\t{os.path.getsize(path)}\t{label}\n".encode())
        return h.hexdigest()


class WrappedSource(Source):
    """Any map-style dataset yielding `(PIL image | tensor | ndarray, label)`, for Python users."""

    def __init__(self, dataset: torch.utils.data.Dataset, classes: Sequence[str], spec: str = "python",
                 mean: Sequence[float] = IMAGENET_STATS[0], std: Sequence[float] = IMAGENET_STATS[1]):
        self.dataset, self.classes, self.spec = dataset, list(classes), spec
        self.mean, self.std = tuple(mean), tuple(std)
        self._labels_cache: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[i]
        image = TF.to_image(image).as_subclass(torch.Tensor)
        if image.dtype != torch.uint8:
            raise SoftcacheError(f"sample {i} is {image.dtype}; softcache needs uint8 images (PIL or uint8 tensors)")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image, int(label)

    @property
    def labels(self) -> np.ndarray:
        if self._labels_cache is None:
            self._labels_cache = np.asarray([int(self.dataset[i][1]) for i in range(len(self))], dtype=np.int64)
        return self._labels_cache

    def content_hash(self) -> str:
        # No files to name: hash every decoded image, one pass over the data.
        h = hashlib.sha256()
        for i in range(len(self)):
            image, label = self[i]
            h.update(image.contiguous().numpy().data)
            h.update(str(label).encode())
        return h.hexdigest()


def from_dataset(dataset: torch.utils.data.Dataset, classes: Sequence[str], *, name: str = "python",
                 mean: Sequence[float] = IMAGENET_STATS[0], std: Sequence[float] = IMAGENET_STATS[1]) -> Source:
    """Wrap a user's own dataset (yielding `(image, label)`) as a source softcache can dump and replay."""
    return WrappedSource(dataset, classes, spec=name, mean=mean, std=std)


# ---------------------------------------------------------------- synthetic

SYNTHETIC_CLASSES = ["disk", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "diamond",
                     "checker", "saltire"]
SYNTHETIC_SIZE = 32
_SYNTHETIC_SEED = 20261125


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Class `cls`'s shape on unit coordinates `u` (right) and `v` (down), centred on the object."""
    r, box = np.hypot(u, v), np.maximum(np.abs(u), np.abs(v))
    masks = {
        0: r < 1.0,
        1: box < 0.8,
        2: (v < 0.75) & (v > -0.95 + 1.7 * np.abs(u)),
        3: ((np.abs(u) < 0.3) | (np.abs(v) < 0.3)) & (box < 1.0),
        4: (r > 0.55) & (r < 1.0),
        5: (r < 1.0) & (np.sin(v * np.pi * 2.5) > 0),
        6: (r < 1.0) & (np.sin(u * np.pi * 2.5) > 0),
        7: np.abs(u) + np.abs(v) < 1.0,
        8: (box < 0.9) & ((np.floor(u * 2.2) + np.floor(v * 2.2)) % 2 == 0),
        9: ((np.abs(u - v) < 0.35) | (np.abs(u + v) < 0.35)) & (box < 0.9),
    }
    return masks[cls]


def render_synthetic(index: int, split: str) -> tuple[np.ndarray, int]:
    """Deterministically render one image `[32, 32, 3] uint8` and its label from `(split, index)`.

    A shape or texture of class `index % 10` at a random position, scale and colour over a random
    background, with pixel noise: learnable by a small CNN, not trivially separable by colour.
    """
    rng = np.random.default_rng([_SYNTHETIC_SEED, SPLITS.index(split), index])
    label = index % len(SYNTHETIC_CLASSES)
    size = SYNTHETIC_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cy, cx = rng.uniform(0.32, 0.68, 2) * size
    radius = rng.uniform(0.2, 0.36) * size
    mask = _shape_mask(label, (xx - cx) / radius, (yy - cy) / radius)
    background = rng.uniform(0.0, 1.0, 3)
    foreground = (background + 0.5 + rng.uniform(-0.25, 0.25, 3)) % 1.0
    image = np.where(mask[..., None], foreground, background)
    image = image + rng.normal(0.0, 0.08, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), label


def synthetic_source(split: str, num_train: int = 2000) -> ArraySource:
    n = num_train if split == "train" else max(len(SYNTHETIC_CLASSES), num_train // 5)
    rendered = [render_synthetic(i, split) for i in range(n)]
    images = np.stack([image for image, _ in rendered])
    labels = [label for _, label in rendered]
    spec = "synthetic" if num_train == 2000 else f"synthetic:{num_train}"
    return ArraySource(images, labels, SYNTHETIC_CLASSES, spec, *SYNTHETIC_STATS)


# ---------------------------------------------------------------- spec strings

def _cifar_source(kind: str, root: str, split: str, download: bool) -> ArraySource:
    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(root, train=split == "train", download=download)
    except RuntimeError as err:
        raise SoftcacheError(f"{kind} not found under '{root}' ({err}); pass --download to fetch it, "
                             f"or give {kind}:ROOT pointing at the folder that holds it") from None
    stats = CIFAR10_STATS if kind == "cifar10" else CIFAR100_STATS
    return ArraySource(ds.data, ds.targets, ds.classes, f"{kind}:{root}", *stats)


def _folder_source(root: str, split: str) -> FolderSource:
    base = Path(root)
    if not base.is_dir():
        raise SoftcacheError(f"dataset folder '{root}' does not exist; "
                             "imagefolder:ROOT needs ROOT/train and ROOT/test (or ROOT/val)")
    names = ["train"] if split == "train" else ["test", "val"]
    classes = None
    if split != "train" and (base / "train").is_dir():  # test labels follow the training split's classes
        classes = sorted(e.name for e in os.scandir(base / "train") if e.is_dir())
    for name in names:
        if (base / name).is_dir():
            try:
                return FolderSource(base / name, spec=f"imagefolder:{root}", classes=classes)
            except (FileNotFoundError, OSError) as err:
                raise SoftcacheError(f"'{base / name}' is not an ImageFolder tree ({err}); "
                                     f"expected {name}/<class>/<image>") from None
    raise SoftcacheError(f"'{root}' has no {' or '.join(n + '/' for n in names)} folder; "
                         "imagefolder:ROOT needs ROOT/train and ROOT/test (or ROOT/val)")



def absolute_spec(spec: str) -> str:
    """`spec` with its folder made absolute (cifar10, cifar100, imagefolder), so it reads from any directory."""
    kind, _, arg = spec.partition(":")
    if kind in ("cifar10", "cifar100", "imagefolder") and (arg or kind != "imagefolder"):
        return f"{kind}:{Path(arg or DEFAULT_ROOT).resolve()}"
    return spec


def recorded_source(dataset: dict[str, Any], split: str, *, download: bool = False) -> Source:
    """The `split` of the dataset a cache records (`manifest["dataset"]`): its absolute spec, else the spec as
    typed; a dataset no longer there is refused saying where the spec came from and that --data overrides it."""
    spec = dataset.get("resolved", dataset["spec"])
    try:
        return load_source(spec, split, download=download)
    except SoftcacheError as err:
        raise SoftcacheError(f"the dataset recorded in the cache ('{dataset['spec']}', at {spec}) cannot be read: "
                             f"{err}; pass --data SPEC to give where it is now") from None


def load_source(spec: str, split: str, *, download: bool = False) -> Source:
    """The `split` ('train' or 'test') of the dataset named by `spec` (see the module docstring)."""
    assert split in SPLITS, f"split must be one of {SPLITS}, got {split!r}"
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        if arg and not (arg.isdigit() and int(arg) >= 10):
            raise SoftcacheError(f"bad dataset spec '{spec}'; "
                                 "synthetic takes a training-set size of at least 10, e.g. synthetic:2000")
        return synthetic_source(split, int(arg) if arg else 2000)
    if kind in ("cifar10", "cifar100"):
        return _cifar_source(kind, arg or DEFAULT_ROOT, split, download)
    if kind == "imagefolder":
        if not arg:
            raise SoftcacheError("imagefolder needs a folder: imagefolder:ROOT")
        return _folder_source(arg, split)
    raise SoftcacheError(f"unknown dataset '{spec}'; "
                         "valid: cifar10[:ROOT], cifar100[:ROOT], imagefolder:ROOT, synthetic[:N]")


def check_data_matches(cache: Any, source: Source) -> None:
    """Refuse a training set that is not the one the cache (a CacheReader) was dumped from."""
    recorded = cache.manifest["dataset"]
    if len(recorded["classes"]) != len(source.classes):
        raise SoftcacheError(f"class-count mismatch: the cache has {len(recorded['classes'])} classes, "
                             f"--data {source.spec} has {len(source.classes)}")
    if recorded["fingerprint"] != source.fingerprint():
        raise SoftcacheError(f"--data {source.spec} is not the dataset the cache was dumped from "
                             f"({recorded['spec']}, {recorded['num_samples']} samples): fingerprints differ; "
                             "give the same data, or dump a cache for this one")
