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

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from softcache import progress
from softcache.data import ArraySource, Source



DECODE_BATCH = 256  # images a worker decodes and hands over in one transfer
PROGRESS_IMAGES = 10_000  # decoding at least this many images ends with a line (without a terminal)


class _DecodeBatches(torch.utils.data.Dataset):
    """Worker side of `decode_all`: a list of indices -> their images stacked `[b, 3, H, W]` uint8, or None
    when they differ in size."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, indices: list[int]) -> torch.Tensor | None:
        images = self.source.images(indices)
        if any(image.shape != images[0].shape for image in images):
            return None
        return torch.stack(images)


def decode_all(source: Source, workers: int = 0, indices: Sequence[int] | None = None) -> torch.Tensor | None:
    """The images of `source` (all, or those at `indices`) as one uint8 tensor `[N, 3, H, W]`, or None if they
    differ in size.

    Workers decode `DECODE_BATCH` images at a time and hand each batch over in one transfer, which is copied
    into the output at once: the open shared-memory handles stay at a few batches, whatever the dataset size.
    """
    if isinstance(source, ArraySource):  # already decoded
        images = torch.from_numpy(source.images)
        if indices is not None:
            images = images[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        return images.permute(0, 3, 1, 2).contiguous()
    wanted = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    batches = [wanted[a:a + DECODE_BATCH].tolist() for a in range(0, len(wanted), DECODE_BATCH)]
    loader = torch.utils.data.DataLoader(_DecodeBatches(source), sampler=batches, batch_size=None,
                                         num_workers=min(workers, len(batches)))
    out, at = None, 0
    for batch in progress.track(loader, what="decode", total=len(batches), count=lambda b: 0 if b is None else len(b),
                                amount=len(wanted), amount_unit="images", final=len(wanted) >= PROGRESS_IMAGES):
        if batch is None or (out is not None and batch.shape[1:] != out.shape[1:]):
            return None
        if out is None:
            out = torch.empty((len(wanted), *batch.shape[1:]), dtype=torch.uint8)
        out[at:at + len(batch)] = batch
        at += len(batch)
    return out


def padding_for(boxes: np.ndarray, height: int, width: int, size: int) -> int:
    """How far crops of `size` at `boxes [..., 4]` reach past a `height x width` image, in pixels."""
    return int(max(0, -boxes[..., :2].min(), (boxes[..., 0] + size - height).max(),
                   (boxes[..., 1] + size - width).max()))


def crop_only(boxes: np.ndarray, image_size: int) -> bool:
    """Whether every stored view is a crop of the output size (no resize), so it can be replayed by gathering."""
    return bool((boxes[..., 2] == image_size).all() and (boxes[..., 3] == image_size).all())


def view_corners(boxes: np.ndarray, flips: np.ndarray, pad: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop-only views (`boxes [..., 4]`, `flips [...]`) as device tensors: the crops' corners in images padded
    by `pad` (`[..., 2]` int64) and the flips; copied asynchronously (from pinned memory on CUDA)."""
    corner = torch.from_numpy(np.ascontiguousarray(boxes[..., :2] + pad).astype(np.int64))
    flip = torch.from_numpy(np.ascontiguousarray(flips, dtype=bool))
    if device.type == "cuda":
        corner, flip = corner.pin_memory(), flip.pin_memory()
    return corner.to(device, non_blocking=True), flip.to(device, non_blocking=True)


class ViewGather:
    """Images `[N, 3, H, W]` uint8 held on `device`, zero-padded by `pad` once: `crops(index, corner, flip)`
    replays crop-only views of the size `image_size` in batch (the crop and the flip are index arithmetic)."""

    def __init__(self, images: torch.Tensor, *, image_size: int, pad: int, device: torch.device):
        self.size, self.device, self.pad = image_size, device, pad
        self.height, self.width = images.shape[2], images.shape[3]
        # zeros past the edge, as TF.crop
        self.images = torch.nn.functional.pad(images, (pad, pad, pad, pad)).to(device)
        self.offsets = torch.arange(image_size, device=device)

    def check(self, boxes: np.ndarray) -> None:
        assert crop_only(boxes, self.size), "resident replay needs crop-only views"
        assert padding_for(boxes, self.height, self.width, self.size) <= self.pad, "views reach past the padding"

    def crops(self, index: torch.Tensor, corner: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Views of samples `index [B]` with corners `corner [B, 2]` (padded coordinates), flipped where
        `flip [B]`, as uint8 `[B, 3, S, S]`."""
        rows = corner[:, :1] + self.offsets                                    # [B, S]
        cols = corner[:, 1:] + torch.where(flip[:, None], self.offsets.flip(0), self.offsets)
        images = self.images[index]                                            # [B, 3, Hp, Wp]
        b, c, _, wp = images.shape
        images = images.gather(2, rows[:, None, :, None].expand(b, c, self.size, wp))
        return images.gather(3, cols[:, None, None, :].expand(b, c, self.size, self.size))


class ResidentReplay:
    """Batches of `(views [B, 3, S, S] uint8, labels [B], index [B], view [B])`, replayed on `device`.

    Each epoch, `views(epoch) -> (boxes [N, 4], flips [N])` gives the one crop-only view every sample takes,
    `order(epoch) -> [N]` the visiting order and `slot(epoch)` the stored view slot those views are (reported
    as `view`, for the targets; 0 without it). Per epoch the order and the views go to the device once; a
    step then runs on the device alone.
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray, *, views, order, image_size: int, pad: int,
                 batch_size: int, drop_last: bool, device: torch.device, slot=None, followers=(),
                 samples: int | None = None):
        self.gather = ViewGather(images, image_size=image_size, pad=pad, device=device)
        self.views, self.order, self.slot = views, order, slot
        self.followers = list(followers)  # e.g. the streaming target reader, which follows the epoch
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        self.batch_size, self.drop_last, self.device, self.epoch = batch_size, drop_last, device, 0
        self.samples = len(self.labels) if samples is None else samples  # visited per epoch (a rank's share)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for follower in self.followers:
            follower.set_epoch(epoch)

    def __len__(self) -> int:
        n = self.samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        boxes, flips = self.views(self.epoch)
        self.gather.check(boxes)
        corner, flip = view_corners(boxes, flips, self.gather.pad, self.device)
        order = torch.from_numpy(np.asarray(self.order(self.epoch), dtype=np.int64))
        order = (order.pin_memory() if self.device.type == "cuda" else order).to(self.device, non_blocking=True)
        slot = torch.full((self.batch_size,), self.slot(self.epoch) if self.slot else 0, dtype=torch.int64,
                          device=self.device)
        for k in range(len(self)):
            index = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield self.gather.crops(index, corner[index], flip[index]), self.labels[index], index, slot[:len(index)]
