"""Replayable augmentation views.

A view is `(box, flip)`: `box = (top, left, height, width)` in source-image pixels, which may reach past the
image edge (zero padding, as `torchvision.transforms.v2.functional.crop` does); the crop is resized to the
output size, then flipped horizontally if `flip`. One representation covers CIFAR's pad-and-crop and
ImageNet's RandomResizedCrop, and because boxes are in source pixels a student can replay a plain crop view at
another resolution than the teacher saw.

Policies (softcache.policies, one object each):
    none      a centred square of the whole image (CIFAR: the image itself), one view
    cifar     pad 4, random crop of the source size, horizontal flip: 9 x 9 offsets x 2 flips = 162 views
    imagenet  RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3)) + flip; continuous
    package.module:callable   a user's pipeline, from the whole image to the view

After the crop a view may go through pixel work (softcache.pixels: RandAugment, colour jitter, erasing, or the
user's pipeline) under torch's generator seeded per view, and be mixed with a partner view (softcache.mixing:
Mixup, CutMix). Such views carry records besides the box and flip, stored per view in the cache (`RECORDS`,
`MIX_RECORDS`): the seed, the CRC-32 of the unmixed pixels, the mix and the CRC-32 of the mixed view (what every
replay is checked against).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from softcache.data import Source
from softcache.errors import SoftcacheError
from softcache.mixing import NO_MIX, Mix, mix_pixels
from softcache.pixels import Pixels, built, call_user, check_output, checksum, identity, run_seeded, what_changed
from softcache.policies import POLICIES as POLICY_OBJECTS
from softcache.policies import Policy, policy_of
from softcache.store import MAIN, stream_augment, stream_prefix
from softcache.store.manifest import describe_augment

POLICIES = tuple(POLICY_OBJECTS)  # ("cifar", "imagenet", "none"): the names the CLI offers (names.POLICIES)
VIEW_BLOCK = 64  # samples whose stored views are drawn from one generator (see Augment.stored_views)
RECORD_TAG = 0x51C0  # in the key of the generator a view's record (seed, mix) is drawn from
# The per-view records of a cache whose views have pixel work or mixing: name -> (shape of one view's, dtype)
RECORDS = {"views/seed": ((), "int64"), "views/crc": ((), "uint32")}
MIX_RECORDS = {"views/mix": ((6,), "int32"), "views/lam": ((), "float32"), "views/mixed_crc": ((), "uint32")}


@dataclass(frozen=True)
class Augment:
    """An augmentation policy, the output size of its views, their pixel work and their mixing."""

    policy: str = "none"                         # one of POLICIES, or a user's package.module:callable
    image_size: int = 32                         # side of the square tensor a view becomes
    pad: int = 4                                 # cifar: zero padding on each side before the crop
    scale: tuple[float, float] = (0.08, 1.0)     # imagenet: crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # imagenet: crop aspect-ratio range
    pixels: Pixels = field(default_factory=Pixels)  # after the crop: RandAugment, jitter, erasing (softcache.pixels)
    mix: Mix = field(default_factory=Mix)        # Mixup / CutMix (softcache.mixing)
    crop_pct: float = 0.875                      # imagenet: the evaluation view's centred crop (a model's own:
                                                 # `for_model`); an evaluation setting, not stored in caches

    def __post_init__(self) -> None:
        if ":" not in self.policy and self.policy not in POLICY_OBJECTS:
            raise SoftcacheError(f"unknown augmentation policy '{self.policy}'; valid: {', '.join(POLICY_OBJECTS)}, "
                                 "or a pipeline of your own as package.module:callable")
        if self.image_size < 1:
            raise SoftcacheError(f"--image-size must be a positive number of pixels, got {self.image_size}")
        if ":" in self.policy and self.pixels.user != self.policy:  # the user's pipeline is pixel work too
            object.__setattr__(self, "pixels", replace(self.pixels, user=self.policy))

    @classmethod
    def from_manifest(cls, augment: dict, image_size: int | None = None) -> Augment:
        """The augmentation a cache records (`manifest["augment"]`), at its view size or at `image_size`
        (plain crops only: pixel work and mixing replay at the size the teacher saw)."""
        found = cls(augment["policy"], image_size=augment["image_size"], pad=augment["pad"],
                    scale=tuple(augment["scale"]), ratio=tuple(augment["ratio"]),
                    pixels=Pixels(**augment.get("pixels", {})), mix=Mix(**augment.get("mix", {})))
        if image_size is None or image_size == found.image_size:
            return found
        if not found.plain:
            raise SoftcacheError(f"this cache's views go through {found.describe()}: they replay only at the "
                                 f"{found.image_size}x{found.image_size} the teacher saw; drop --image-size "
                                 f"{image_size} (or give {found.image_size})")
        return replace(found, image_size=image_size)

    @classmethod
    def from_options(cls, options: Any, image_size: int) -> Augment:
        """The augmentation a stage's config asks for (its `augment` policy and `config.ViewOptions`)."""
        return cls(options.augment, image_size=image_size,
                   pixels=Pixels(auto_augment=options.auto_augment, color_jitter=options.color_jitter,
                                 reprob=options.reprob),
                   mix=Mix(options.mixup, options.cutmix, options.mix_prob, options.mix_switch_prob))

    def for_model(self, model: Any) -> Augment:
        """These views as `model` is evaluated on them: its input conventions' evaluation crop, if it has any
        (`models.conventions`: timm's `crop_pct`, a Hugging Face processor's)."""
        from softcache.models import conventions
        found = conventions(model)
        return self if found is None else replace(self, crop_pct=found.crop_pct)

    @property
    def plain(self) -> bool:
        """Crop and flip only: no pixel work, no mixing (what the resident, gathered-on-the-device path serves)."""
        return not self.pixels.active and not self.mix.active

    def describe(self) -> str:
        """The policy, pixel work and mixing in words, e.g. 'cifar, rand-m9-n2, reprob 0.25, mixup 0.8'."""
        return describe_augment({"policy": self.policy, "pixels": self.pixels.to_json(), "mix": self.mix.to_json()})

    def to_json(self) -> dict[str, Any]:
        """The manifest's record of the pixel work and mixing (none for plain crops, so old cache ids hold)."""
        if self.plain:
            return {}
        return {"pixels": self.pixels.to_json(), "mix": self.mix.to_json(),
                "pixel_identity": identity(self.pixels, self.image_size) if self.pixels.active else None}

    def record_layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The per-view record arrays this augmentation stores (RECORDS, MIX_RECORDS): none for plain crops."""
        if self.plain:
            return {}
        return {**RECORDS, **(MIX_RECORDS if self.mix.active else {})}

    def view_record(self, key: Sequence[int], *, samples: int, views: int) -> tuple[int, tuple[int, ...], float]:
        """One view's `(seed, mix record, λ)`, a pure function of `key`: `(seed, sample, view)` for a stored view,
        `(seed, epoch, sample)` for a fresh one. The seed is what torch's generator is seeded with for the
        view's pixel work; the mix is `mixing.Mix.draw`'s."""
        rng = np.random.default_rng([*key, RECORD_TAG])
        seed = int(rng.integers(2**63))
        mix, lam = self.mix.draw(rng, samples=samples, views=views, size=self.image_size)
        return seed, mix, lam

    def stored_records(self, i: int, k: int, *, seed: int, samples: int) -> dict[str, np.ndarray]:
        """The records of sample `i`'s `k` stored views (without the checksums, which come from the pixels):
        `views/seed [k]`, and with mixing `views/mix [k, 6]`, `views/lam [k]`."""
        drawn = [self.view_record((seed, i, v), samples=samples, views=k) for v in range(k)]
        out = {"views/seed": np.asarray([d[0] for d in drawn], np.int64)}
        if self.mix.active:
            out["views/mix"] = np.asarray([d[1] for d in drawn], np.int32)
            out["views/lam"] = np.asarray([d[2] for d in drawn], np.float32)
        return out

    def probe(self, source: Source) -> None:
        """Build the pipeline and make one view of sample 0 here, so a callable that cannot be imported or returns
        the wrong thing is refused in one line before any worker starts."""
        if self.pixels.active and len(source):
            image = source[0][0]
            box, flip = self.sample_views(*image.shape[-2:], 1, (0, 0)) if not self.finite else \
                (self.all_views(*image.shape[-2:])[0][:1], np.zeros(1, bool))
            self.view(image, box[0], bool(flip[0]), 0)

    def view(self, image: torch.Tensor, box: Sequence[float], flip: bool, seed: int = 0) -> torch.Tensor:
        """The unmixed view `[3, S, S] uint8` of `image [3, H, W] uint8`: the crop `(box, flip)` (or the user's
        pipeline on the whole image), then the pixel work with torch's generator seeded by `seed`."""
        size = self.image_size
        if not self.pixels.active:
            return apply_view(image, box, flip, size)
        user, ops = built(self.pixels, size)

        def make(whole: torch.Tensor) -> torch.Tensor:
            out = check_output(call_user(user, whole, self.pixels.user), size, self.pixels.user) if user \
                else apply_view(whole, box, flip, size)
            return ops(out) if ops is not None else out

        return run_seeded(make, image, seed)

    @property
    def rule(self) -> Policy:
        """The policy object (softcache.policies) that makes this policy's views."""
        return policy_of(self.policy)

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
            raise SoftcacheError(f"--views all needs a finite policy (cifar, none); '{self.policy}' draws its "
                                 "views from a continuous range: give a number of views, e.g. --views 8")
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
    """Sample `i` -> its `k` views for the teacher: `(views [k, 3, S, S] uint8, label, rows)`, `rows` the sample's
    records for the cache: `views/box [k, 4]`, `views/flip [k]` and, for views with pixel work or mixing,
    `views/seed`, `views/crc` (of the unmixed pixels), `views/mix`, `views/lam`, `views/mixed_crc` (of the
    pixels the teacher got, mixed or not) (see `Augment.record_layout`).

    Views are drawn from `(seed, i)` (`Augment.stored_views`; with `views='all'` every view, in an order drawn
    from `(seed, i)`), records from `(seed, i, view)`, so a dump is the same whatever the batch size, worker
    count or device. A mixed view's partner is rebuilt from the partner's own records.
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

    def rows_of(self, i: int, height: int, width: int) -> dict[str, np.ndarray]:
        """Sample `i`'s records but the checksums: box, flip and (pixel work or mixing) seed, mix, lam."""
        boxes, flips = self.views_of(i, height, width)
        rows = {"views/box": boxes, "views/flip": flips}
        if not self.augment.plain:
            rows.update(self.augment.stored_records(i, self.k, seed=self.seed, samples=len(self.source)))
        return rows

    def _unmixed(self, image: torch.Tensor, rows: dict[str, np.ndarray], v: int) -> torch.Tensor:
        seed = int(rows["views/seed"][v]) if "views/seed" in rows else 0
        return self.augment.view(image, rows["views/box"][v], bool(rows["views/flip"][v]), seed)

    def __getitem__(self, i: int):
        image, label = self.source[i]
        rows = self.rows_of(i, *image.shape[-2:])
        views = [self._unmixed(image, rows, v) for v in range(self.k)]
        if not self.augment.plain:
            rows["views/crc"] = np.asarray([checksum(x) for x in views], np.uint32)
        for v, record in enumerate(rows.get("views/mix", ())):
            if record[0] >= 0:  # the partner's view, from its box, flip and seed alone
                j, w = int(record[0]), int(record[1])
                partner = self.source[j][0]
                boxes, flips = self.views_of(j, *partner.shape[-2:])
                seed = self.augment.view_record((self.seed, j, w), samples=len(self.source), views=self.k)[0]
                other = self.augment.view(partner, boxes[w], bool(flips[w]), seed)
                views[v] = mix_pixels(views[v], other, record, float(rows["views/lam"][v]))
        if "views/mix" in rows:  # what the teacher got: a partner rebuilt here is checked on replay through it
            rows["views/mixed_crc"] = np.asarray([checksum(x) for x in views], np.uint32)
        return torch.stack(views), label, rows


class AugmentedViews(torch.utils.data.Dataset):
    """Key `(i, epoch)` -> `(view [3, S, S] uint8, label, i, epoch)`: a fresh view for plain training;
    epoch < 0 is the eval view (no pixel work, no mixing). With mixing, two more items: the partner's label
    and λ (`(..., partner_label, lam)`; the sample's own label and 1.0 when unmixed).

    Finite policies take view `epoch_choice(N, (seed, epoch))[i]` of `all_views`, imagenet draws from
    `(seed, epoch, i)`; the pixel work's seed and the mix come from `(seed, epoch, i)`, a mixed view's partner
    being the partner's own fresh view of that epoch.
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

    def _fresh(self, image: torch.Tensor, i: int, epoch: int) -> tuple[torch.Tensor, tuple[int, ...], float]:
        box, flip = self.view_of(i, epoch, *image.shape[-2:])
        if self.augment.plain:
            return apply_view(image, box, flip, self.augment.image_size), NO_MIX, 1.0
        seed, mix, lam = self.augment.view_record((self.seed, epoch, i), samples=len(self.source), views=1)
        return self.augment.view(image, box, flip, seed), mix, lam

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = key
        image, label = self.source[i]
        if epoch < 0:
            box, flip = self.view_of(i, epoch, *image.shape[-2:])
            return apply_view(image, box, flip, self.augment.image_size), label, i, epoch
        view, mix, lam = self._fresh(image, i, epoch)
        if not self.augment.mix.active:
            return view, label, i, epoch
        partner_label = label
        if mix[0] >= 0:
            partner, partner_label = self.source[mix[0]]
            view = mix_pixels(view, self._fresh(partner, mix[0], epoch)[0], mix, lam)
        return view, label, i, epoch, partner_label, lam


class ReplayViews(torch.utils.data.Dataset):
    """Key `(i, v)` -> `(view [3, S, S] uint8, label, i, v)`: the stored view `v` of sample `i`, replayed from
    its records (`records`: `views/box [N, V, 4]`, `views/flip [N, V]`, and for views with pixel work or mixing
    `views/seed`, `views/crc`, `views/mix`, `views/lam`, `views/mixed_crc`, as a cache stores them). With
    mixing, two more items: the partner's label and λ, as `AugmentedViews` gives them.

    Every replayed view with a stored checksum is checked against it (`verify`), the partner's included: a view
    whose pixels differ from what the teacher saw stops the replay with one line naming the sample, the view
    and what changed (`recorded`: the dump's `pixel_identity`), rather than train on other pixels.
    """

    def __init__(self, source: Source, records: dict[str, np.ndarray], augment: Augment, *,
                 recorded: dict[str, Any] | None = None, verify: bool = True):
        boxes, flips = records["views/box"], records["views/flip"]
        assert boxes.shape[:2] == flips.shape and len(boxes) == len(source), (
            "boxes [N, V, 4] and flips [N, V] must match the source")
        self.source, self.records, self.augment = source, records, augment
        self.recorded, self.verify = recorded, verify
        self.labels = np.asarray(source.labels)

    @classmethod
    def from_cache(cls, reader: Any, source: Source, image_size: int | None = None, stream: str = MAIN,
                   **kwargs: Any) -> ReplayViews:
        """The replay of a cache's stored views of view stream `stream` (every record array, read whole)."""
        recorded = stream_augment(reader.manifest, stream)
        augment = Augment.from_manifest(recorded, image_size)
        prefix = stream_prefix(reader.manifest, stream)
        names = ["views/box", "views/flip", *augment.record_layout()]
        return cls(source, {name: reader.read(prefix + name) for name in names}, augment,
                   recorded=recorded.get("pixel_identity"), **kwargs)

    def __len__(self) -> int:
        return len(self.source)

    def unmixed(self, i: int, v: int, image: torch.Tensor | None = None) -> torch.Tensor:
        """Stored view `v` of sample `i` before mixing, checked against its checksum."""
        image = self.source[i][0] if image is None else image
        seeds = self.records.get("views/seed")
        view = self.augment.view(image, self.records["views/box"][i, v], bool(self.records["views/flip"][i, v]),
                                 int(seeds[i, v]) if seeds is not None else 0)
        self._check(view, "views/crc", i, v)
        return view

    def _check(self, view: torch.Tensor, name: str, i: int, v: int) -> None:
        """Refuse `view` unless its CRC-32 is the one stored in `name` for (i, v), naming what changed."""
        crc = self.records.get(name)
        if not self.verify or crc is None:
            return
        got = checksum(view)
        if got != int(crc[i, v]):
            if name == "views/crc":
                now = identity(self.augment.pixels, self.augment.image_size) if self.augment.pixels.active else {}
                what, why = "the replayed pixels", what_changed(self.recorded, now)
            else:  # the view and its partner passed their own checks just now
                what, why = ("the replayed mixed pixels", "the view and its partner replay as dumped, so the mixing "
                             "itself changed since the dump (softcache's Mixup/CutMix code)")
            raise SoftcacheError(f"sample {i} view {v}: {what} differ from those the teacher saw "
                                 f"(CRC-32 {got:08x}, cached {int(crc[i, v]):08x}); {why}; re-dump the cache "
                                 "with this pipeline or restore the one it was dumped with")

    def __getitem__(self, key: tuple[int, int]):
        i, v = key
        image, label = self.source[i]
        view = self.unmixed(i, v, image)
        mix = self.records.get("views/mix")
        if mix is None:
            return view, label, i, v
        partner, partner_view = int(mix[i, v, 0]), int(mix[i, v, 1])
        lam = float(self.records["views/lam"][i, v])
        if partner < 0:
            return view, label, i, v, label, lam
        view = mix_pixels(view, self.unmixed(partner, partner_view), mix[i, v], lam)
        self._check(view, "views/mixed_crc", i, v)
        return view, label, i, v, int(self.labels[partner]), lam


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
