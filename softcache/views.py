"""Replayable augmentation views.

A view is `(box, flip)`: `box = (top, left, height, width)` in source-image pixels, which may reach past the
image edge (zero padding, as `torchvision.transforms.v2.functional.crop` does); the crop is resized to the
output size, then flipped horizontally if `flip`. One representation covers CIFAR's pad-and-crop and
ImageNet's RandomResizedCrop, and because boxes are in source pixels a student can replay a view at another
resolution than the teacher saw.

Policies (softcache.policies, one object each):
    none      a centred square of the whole image (CIFAR: the image itself), one view
    cifar     pad 4, random crop of the source size, horizontal flip: 9 x 9 offsets x 2 flips = 162 views
    imagenet  RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3)) + flip; continuous
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable, Hashable, Iterator, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from softcache.data import Source
from softcache.errors import SoftcacheError

from softcache.policies import POLICIES as POLICY_OBJECTS
from softcache.policies import Policy

POLICIES = tuple(POLICY_OBJECTS)  # ("cifar", "imagenet", "none"): the names the CLI offers (names.POLICIES)
VIEW_BLOCK = 64  # samples whose stored views are drawn from one generator (see Augment.stored_views)


@dataclass(frozen=True)
class Augment:
    """An augmentation policy and the output size of its views."""

    policy: str = "none"                         # one of POLICIES
    image_size: int = 32                         # side of the square tensor a view becomes
    pad: int = 4                                 # cifar: zero padding on each side before the crop
    scale: tuple[float, float] = (0.08, 1.0)     # imagenet: crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # imagenet: crop aspect-ratio range

    def __post_init__(self) -> None:
        if self.policy not in POLICY_OBJECTS:
            raise SoftcacheError(f"unknown augmentation policy '{self.policy}'; valid: {', '.join(POLICY_OBJECTS)}")
        if self.image_size < 1:
            raise SoftcacheError(f"--image-size must be a positive number of pixels, got {self.image_size}")

    @classmethod
    def from_manifest(cls, augment: dict, image_size: int | None = None) -> Augment:
        """The policy a cache records (`manifest["augment"]`), at its view size or at `image_size`."""
        return cls(augment["policy"], image_size=image_size or augment["image_size"], pad=augment["pad"],
                   scale=tuple(augment["scale"]), ratio=tuple(augment["ratio"]))

    @property
    def rule(self) -> Policy:
        """The policy object (softcache.policies) that makes this policy's views."""
        return POLICY_OBJECTS[self.policy]

    @property
    def finite(self) -> bool:
        return self.rule.finite

    @property
    def crop_pad(self) -> int:
        """How far this policy's crops reach past the image edge: what resident images are padded by."""
        return self.rule.crop_pad(self)

    def count_all(self) -> int:
        """How many distinct views `--views all` enumerates (finite policies only)."""
        if not self.finite:
            raise SoftcacheError(f"--views all needs a finite policy (cifar, none); '{self.policy}' samples "
                                 "crops from a continuous range: give a number of views, e.g. --views 8")
        return self.rule.count(self)

    def resolve_views(self, views: int | str) -> int:
        """Number of views per sample for `--views K|all`, checked against the policy."""
        if views == "all":
            return self.count_all()
        try:
            k = int(views)
        except ValueError:
            k = 0
        if k < 1:
            raise SoftcacheError(f"--views must be a positive number or 'all', got {views}")
        if self.finite and k > self.count_all():
            raise SoftcacheError(f"--views {k} exceeds the {self.count_all()} distinct views of policy "
                                 f"'{self.policy}'; use --views all to store every one")
        return k

    def eval_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The evaluation view: a centred square (87.5% of the shorter side for imagenet)."""
        return self.rule.eval_box(self, height, width)

    def all_views(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Every view of a finite policy: `boxes [V, 4] float32`, `flips [V] bool`, in a fixed order."""
        self.count_all()  # refuses a continuous policy
        return self.rule.views(self, height, width)

    def epoch_choice(self, n: int, key: Sequence[int]) -> np.ndarray:
        """Finite policies, plain training: which of the `count_all()` views each of `n` samples takes this
        epoch, `[n]`, drawn from `key` (e.g. `(seed, epoch)`) in one go."""
        return np.random.default_rng([*key, 0x7EAC]).integers(self.count_all(), size=n)

    def stored_views(self, height: int, width: int, k: int, *, seed: int,
                     indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The `k` views a cache stores for samples `indices [n]` (images of `height x width`), in storage-slot
        order: `boxes [n, k, 4] float32`, `flips [n, k] bool`, each sample's a pure function of `(seed, index)`.

        Finite policies store k distinct views in a random order (with k = `count_all()`, every view in a random
        order), drawn for all samples at once: a generator seeded by `(seed, block)` scores every view of the
        VIEW_BLOCK samples of a block and each sample keeps its k best-scored views. The random slot order is
        what lets a student replay one slot per epoch (`replay_slot`) and still see a uniform draw.
        Imagenet draws k RandomResizedCrop boxes per sample (`sample_views`).
        """
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return np.zeros((0, k, 4), np.float32), np.zeros((0, k), bool)
        if not self.finite:
            table = [self.sample_views(height, width, k, (seed, int(i))) for i in indices]
            return np.stack([t[0] for t in table]), np.stack([t[1] for t in table])
        boxes, flips = self.all_views(height, width)
        blocks, where = np.unique(indices // VIEW_BLOCK, return_inverse=True)
        drawn = np.stack([np.random.default_rng([seed, int(b), 0x5107]).random((VIEW_BLOCK, len(boxes)))
                          for b in blocks])
        scores = drawn[where.reshape(-1), indices % VIEW_BLOCK]
        if k < len(boxes):  # the k best without sorting them all
            best = np.argpartition(scores, k - 1, axis=1)[:, :k]
            pick = np.take_along_axis(best, np.argsort(np.take_along_axis(scores, best, 1), axis=1), 1)
        else:
            pick = np.argsort(scores, axis=1)
        return boxes[pick], flips[pick]

    def sample_views(self, height: int, width: int, k: int, key: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """`k` views of one image, a pure function of `key` (e.g. `(seed, index)`).

        Finite policies draw k distinct views; imagenet draws k RandomResizedCrop boxes.
        Returns `boxes [k, 4] float32`, `flips [k] bool`.
        """
        rng = np.random.default_rng(list(key))
        if self.finite:
            boxes, flips = self.all_views(height, width)
            pick = rng.choice(len(boxes), size=k, replace=False)
            return boxes[pick], flips[pick]
        return self.rule.draw(self, height, width, k, rng)


def apply_view(image: torch.Tensor, box: Sequence[float], flip: bool, size: int) -> torch.Tensor:
    """Crop `image [3, H, W] uint8` to `box` (zero outside), resize to `size x size`, flip if `flip`."""
    top, left, height, width = (round(float(b)) for b in box)
    view = TF.crop(image, top, left, height, width)
    if (height, width) != (size, size):
        view = TF.resize(view, [size, size], antialias=True)
    return TF.horizontal_flip(view) if flip else view


# ---------------------------------------------------------------- datasets over views

class DumpViews(torch.utils.data.Dataset):
    """Sample `i` -> its `k` views for the teacher: `(views [k, 3, S, S] uint8, label, boxes [k, 4], flips [k])`.

    Views are drawn from `(seed, i)` (`Augment.stored_views`; with `views='all'` every view, in an order drawn
    from `(seed, i)`), so a dump is the same whatever the batch size, worker count or device.
    """

    def __init__(self, source: Source, augment: Augment, views: int | str, seed: int):
        self.source, self.augment, self.seed = source, augment, seed
        self.k = augment.resolve_views(views)

    def __len__(self) -> int:
        return len(self.source)

    def views_of(self, i: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored views of sample `i` (an image of `height x width`): `boxes [k, 4]`, `flips [k]`."""
        boxes, flips = self.augment.stored_views(height, width, self.k, seed=self.seed, indices=np.asarray([i]))
        return boxes[0], flips[0]

    def __getitem__(self, i: int):
        image, label = self.source[i]
        boxes, flips = self.views_of(i, *image.shape[-2:])
        size = self.augment.image_size
        stacked = torch.stack([apply_view(image, b, f, size) for b, f in zip(boxes, flips)])
        return stacked, label, torch.from_numpy(boxes), torch.from_numpy(flips)


class AugmentedViews(torch.utils.data.Dataset):
    """Key `(i, epoch)` -> `(view [3, S, S] uint8, label, i, epoch)`: a fresh view for plain training;
    epoch < 0 is the eval view.

    Finite policies take view `epoch_choice(N, (seed, epoch))[i]` of `all_views`, imagenet draws from
    `(seed, epoch, i)`.
    """

    def __init__(self, source: Source, augment: Augment, seed: int):
        self.source, self.augment, self.seed = source, augment, seed
        self._choice: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def view_of(self, i: int, epoch: int, height: int, width: int) -> tuple[Sequence[float], bool]:
        if epoch < 0:
            return self.augment.eval_box(height, width), False
        if self.augment.finite:
            if self._choice is None or self._choice[0] != epoch:  # once per epoch and worker
                self._choice = (epoch, self.augment.epoch_choice(len(self.source), (self.seed, epoch)))
            boxes, flips = self.augment.all_views(height, width)
            k = self._choice[1][i]
            return boxes[k], bool(flips[k])
        boxes, flips = self.augment.sample_views(height, width, 1, (self.seed, epoch, i))
        return boxes[0], bool(flips[0])

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = key
        image, label = self.source[i]
        box, flip = self.view_of(i, epoch, *image.shape[-2:])
        return apply_view(image, box, flip, self.augment.image_size), label, i, epoch


class ReplayViews(torch.utils.data.Dataset):
    """Key `(i, v)` -> `(view [3, S, S] uint8, label, i, v)`: the stored view `v` of sample `i`, replayed."""

    def __init__(self, source: Source, boxes: np.ndarray, flips: np.ndarray, image_size: int):
        assert boxes.shape[:2] == flips.shape and len(boxes) == len(source), (
            "boxes [N, V, 4] and flips [N, V] must match the source")
        self.source, self.boxes, self.flips, self.image_size = source, boxes, flips, image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        i, v = key
        image, label = self.source[i]
        return apply_view(image, self.boxes[i, v], bool(self.flips[i, v]), self.image_size), label, i, v


class KeyBatches(torch.utils.data.Sampler):
    """Batches of dataset keys for one epoch: a shuffled (or ordered) pass over `n` samples.

    `key_fn(epoch, indices [n]) -> list of keys` turns sample indices into keys, e.g. `(i, epoch)` or
    `(i, view)`. The order is `order_fn(epoch)`, else drawn from `(seed, epoch)`; call `set_epoch` before
    each pass.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool, drop_last: bool,
                 key_fn: Callable[[int, np.ndarray], list[Hashable]],
                 order_fn: Callable[[int], np.ndarray] | None = None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last, self.key_fn, self.order_fn = shuffle, drop_last, key_fn, order_fn
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[Hashable]]:
        if self.order_fn is not None:
            order = self.order_fn(self.epoch)
        else:
            order = epoch_order(self.n, seed=self.seed, epoch=self.epoch) if self.shuffle else np.arange(self.n)
        keys = self.key_fn(self.epoch, order)
        for b in range(len(self)):
            yield keys[b * self.batch_size:(b + 1) * self.batch_size]


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order samples are visited in at `epoch`: a permutation `[n]` drawn from `(seed, epoch)`."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def replay_slot(num_views: int, *, seed: int, epoch: int) -> int:
    """The stored view slot every sample replays at `epoch`: `(epoch + shift) mod V`, with `shift` drawn from `seed`.

    Each sample's views are stored in a random order (`Augment.stored_views`), so slot `s` holds a uniform
    draw of its views, and over V consecutive epochs a sample replays every stored view once. All samples
    share the slot, so an epoch reads one slot of each array: 1/V of the cache.
    """
    shift = int(np.random.default_rng([seed, 0x5107]).integers(num_views))
    return (epoch + shift) % num_views
