"""Augmentation policies: one small object each, in one registry (`POLICIES`). A policy turns an image size into
views, `(box, flip)` with box = (top, left, height, width) in source pixels: a finite policy lists every view it
has, a continuous one draws views from a generator; each gives its evaluation box and how far its crops reach
past the image edge. `views.Augment` holds a policy's name and settings and does the rest (stored views,
replay slots, the datasets over views). A new policy is one class here (or in a module of its own, registered
here) and its test; `names.POLICIES` lists the names for the CLI without importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torchvision.transforms import v2 as T

if TYPE_CHECKING:
    from softcache.views import Augment

Views = tuple[np.ndarray, np.ndarray]  # boxes [V, 4] float32, flips [V] bool


class Policy:
    """What a policy says about the views of an image of `height x width` under the settings `a`."""

    name: ClassVar[str]
    finite: ClassVar[bool] = True  # a fixed list of views (which `--views all` stores), or drawn from a range
    image_size: ClassVar[int | None] = None  # the view side without --image-size; None: the images' own

    def count(self, a: Augment) -> int:
        """How many distinct views a finite policy has."""
        raise NotImplementedError

    def views(self, a: Augment, height: int, width: int) -> Views:
        """Every view of a finite policy, in a fixed order."""
        raise NotImplementedError

    def draw(self, a: Augment, height: int, width: int, k: int, rng: np.random.Generator) -> Views:
        """`k` views of a continuous policy, drawn from `rng`."""
        raise NotImplementedError

    def eval_box(self, a: Augment, height: int, width: int) -> tuple[int, int, int, int]:
        """The evaluation view: a centred square of the shorter side."""
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side

    def crop_pad(self, a: Augment) -> int:
        """How far the crops reach past the image edge: what resident images are padded by."""
        return 0


class Centre(Policy):
    """`none`: a centred square of the whole image (CIFAR: the image itself), one view."""

    name = "none"

    def count(self, a: Augment) -> int:
        return 1

    def views(self, a: Augment, height: int, width: int) -> Views:
        return np.asarray([self.eval_box(a, height, width)], np.float32), np.zeros(1, bool)


class PadCrop(Policy):
    """`cifar`: pad by `a.pad` (4), crop the source size at every offset, with and without a horizontal flip:
    9 x 9 offsets x 2 flips = 162 views."""

    name = "cifar"

    def count(self, a: Augment) -> int:
        return (2 * a.pad + 1) ** 2 * 2

    def views(self, a: Augment, height: int, width: int) -> Views:
        offsets = range(-a.pad, a.pad + 1)
        boxes = [(top, left, height, width) for top in offsets for left in offsets]
        return np.asarray(boxes * 2, np.float32), np.repeat(np.asarray([False, True]), len(boxes))

    def crop_pad(self, a: Augment) -> int:
        return a.pad


class ResizedCrop(Policy):
    """`imagenet`: RandomResizedCrop(image_size, scale=a.scale, ratio=a.ratio) + flip; continuous. Evaluated
    on the centred square of `a.crop_pct` (87.5%, or the model's own, e.g. timm's 0.9 for ViTs) of the shorter side."""

    name = "imagenet"
    finite = False
    image_size = 224

    def draw(self, a: Augment, height: int, width: int, k: int, rng: np.random.Generator) -> Views:
        # torchvision's own RandomResizedCrop sampler, fed from a generator seeded by `rng`
        image = torch.empty(0, height, width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**62)))
            boxes = [T.RandomResizedCrop.get_params(image, list(a.scale), list(a.ratio)) for _ in range(k)]
        return np.asarray(boxes, np.float32), rng.random(k) < 0.5

    def eval_box(self, a: Augment, height: int, width: int) -> tuple[int, int, int, int]:
        side = max(1, round(min(height, width) * a.crop_pct))
        return (height - side) // 2, (width - side) // 2, side, side


class UserPipeline(Policy):
    """`--augment package.module:callable`: the user's transform makes the whole view from the whole image (its own
    crop included), so there is no crop to store: a view's box is the whole image, unflipped. Continuous; evaluated
    on the centred square, as `none`."""

    name = "package.module:callable"
    finite = False

    def draw(self, a: Augment, height: int, width: int, k: int, rng: np.random.Generator) -> Views:
        return np.tile(np.asarray([0, 0, height, width], np.float32), (k, 1)), np.zeros(k, bool)


POLICIES: dict[str, Policy] = {p.name: p for p in (PadCrop(), ResizedCrop(), Centre())}
USER = UserPipeline()


def policy_of(name: str) -> Policy:
    """The policy object of a policy name, or of a user's `package.module:callable`."""
    return USER if ":" in name else POLICIES[name]
