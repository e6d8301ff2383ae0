"""The resident data path: images and cached targets held on the device, views replayed there in batch.

For datasets that fit in memory (CIFAR: 150 MB of uint8 images), decoding once and replaying the stored views
on the device removes per-sample Python from the training loop: a batch is one gather of padded images (the
crop and the flip are both index arithmetic) plus one gather of each target array, indexed by a device
permutation. The batches are exactly those of the DataLoader path (`ReplayViews` + `KeyBatches`) for the same
seed: same samples, same views, same pixels, same targets.

It applies to views that are pure crops (box height and width equal the output size, as in the `cifar` and
`none` policies on square images); views that need resizing stay on the DataLoader path.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from softcache.data import ArraySource, Source

RESIDENT_BYTES = 4 << 30  # images and targets up to this size are held in memory (on the device)


def decode_all(source: Source, workers: int = 0) -> torch.Tensor | None:
    """Every image of `source` as one uint8 tensor `[N, 3, H, W]`, or None if the images differ in size."""
    if isinstance(source, ArraySource):  # already decoded
        return torch.from_numpy(source.images).permute(0, 3, 1, 2).contiguous()
    loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=workers)
    images, shape = [], None
    for image, _ in loader:
        if shape is not None and image.shape != shape:
            return None
        shape = image.shape
        images.append(image)
    return torch.stack(images)


def padding_for(boxes: np.ndarray, height: int, width: int, size: int) -> int:
    """How far crops of `size` at `boxes [..., 4]` reach past a `height x width` image, in pixels."""
    return int(max(0, -boxes[..., :2].min(), (boxes[..., 0] + size - height).max(), (boxes[..., 1] + size - width).max()))


def crop_only(boxes: np.ndarray, image_size: int) -> bool:
    """Whether every stored view is a crop of the output size (no resize), so it can be replayed by gathering."""
    return bool((boxes[..., 2] == image_size).all() and (boxes[..., 3] == image_size).all())


class ViewGather:
    """Images `[N, 3, H, W]` uint8 held on `device`, zero-padded once, and their crop-only views
    `boxes [N, V, 4]`, `flips [N, V]`: `gather(index, view)` replays views in batch."""

    def __init__(self, images: torch.Tensor, boxes: np.ndarray, flips: np.ndarray, *, image_size: int,
                 device: torch.device, pad: int | None = None):
        self.size, self.device, self.height, self.width = image_size, device, images.shape[2], images.shape[3]
        p = self.pad = padding_for(boxes, self.height, self.width, image_size) if pad is None else pad
        self.images = torch.nn.functional.pad(images, (p, p, p, p)).to(device)  # zeros past the edge, as TF.crop
        self.offsets = torch.arange(image_size, device=device)
        self.set_views(boxes, flips)

    def set_views(self, boxes: np.ndarray, flips: np.ndarray) -> None:
        """Replace the views (`boxes [N, V, 4]`, `flips [N, V]`), keeping the images where they are."""
        assert crop_only(boxes, self.size), "resident replay needs crop-only views"
        assert padding_for(boxes, self.height, self.width, self.size) <= self.pad, "views reach past the padding"
        self.corner = torch.as_tensor(boxes[..., :2] + self.pad, dtype=torch.int64, device=self.device)  # [N, V, 2]
        self.flips = torch.as_tensor(np.ascontiguousarray(flips), device=self.device)

    def gather(self, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """The stored views `view [B]` of samples `index [B]` as uint8 `[B, 3, S, S]`."""
        corner, flip = self.corner[index, view], self.flips[index, view]
        rows = corner[:, :1] + self.offsets                                    # [B, S]
        cols = corner[:, 1:] + torch.where(flip[:, None], self.offsets.flip(0), self.offsets)
        images = self.images[index]                                            # [B, 3, Hp, Wp]
        b, c, _, wp = images.shape
        images = images.gather(2, rows[:, None, :, None].expand(b, c, self.size, wp))
        return images.gather(3, cols[:, None, None, :].expand(b, c, self.size, self.size))


class ResidentReplay:
    """Batches of `(views [B, 3, S, S] uint8, labels [B], index [B], view [B])`, replayed on `device`.

    `images [N, 3, H, W]` uint8, `boxes [N, V, 4]`, `flips [N, V]` as stored; `order(epoch) -> (sample order
    [N], view choice [N])` gives the epoch's visiting order and the view each sample replays.
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray, boxes: np.ndarray, flips: np.ndarray, *,
                 image_size: int, batch_size: int, drop_last: bool, device: torch.device, order,
                 followers=(), refresh=None, pad: int | None = None):
        self.views = ViewGather(images, boxes, flips, image_size=image_size, device=device, pad=pad)
        self.followers = list(followers)  # e.g. the streaming target reader, which follows the epoch
        self.refresh = refresh            # epoch -> (boxes, flips): fresh views per epoch (plain training)
        self.labels = torch.as_tensor(labels, dtype=torch.int64, device=device)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.device, self.order, self.epoch = device, order, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.refresh is not None:
            self.views.set_views(*self.refresh(epoch))
        for follower in self.followers:
            follower.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        order, choice = self.order(self.epoch)
        order = torch.as_tensor(order, device=self.device)
        choice = torch.as_tensor(choice, device=self.device)
        for k in range(len(self)):
            index = order[k * self.batch_size:(k + 1) * self.batch_size]
            view = choice[index]
            yield self.views.gather(index, view), self.labels[index], index, view
