"""Where training batches and their teacher targets come from: the data paths.

Images reach a step either resident (decoded once, views gathered on the device; softcache.resident) or from
a DataLoader replaying each view on CPU workers; cached targets are held in memory or streamed from the store
(softcache.streaming). Every combination visits the same samples with the same views and targets for a seed.

    CacheTargets       cached teacher outputs for (sample, view) pairs, in memory or read per batch
    OnlineTargets      the teacher run on the batch (online KD, for tests and benchmarks)
    student_data       batches + targets for train-student, on the path that fits
    augmented_batches  batches of fresh views for plain training (train-teacher)
"""
from __future__ import annotations

import logging
import math
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from softcache.data import Source
from softcache.device import prepare_model, teacher_outputs
from softcache.distributed import World, check_global_batch, rank_share, share_position
from softcache.errors import SoftcacheError
from softcache.models import Tapped
from softcache.planner import RESIDENT_BYTES, image_bytes, plan
from softcache.resident import ResidentReplay, crop_only, decode_all, padding_for
from softcache.store import MAIN, CacheReader, feature_name, logits_prefix, stream_augment, stream_prefix
from softcache.streaming import StreamingTargets, window_order
from softcache.targets import TOPK_TEMPERATURES, LogitsFormat
from softcache.views import Augment, AugmentedViews, KeyBatches, ReplayViews, epoch_order, replay_slot

log = logging.getLogger(__name__)

# (views [B, 3, S, S] uint8, index [B], view [B]) -> (KD target, {teacher layer: feature or attention map})
Targets = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


class CacheTargets:
    """The cached teacher targets for `(sample, view)` pairs.

    `__call__(views, index [B], view [B]) -> (kd_target, {layer: feature [B, C, H, W] or map [B, H, W]})` on
    `device`, where `kd_target` is what `KDLoss.from_target` takes. With several cached teachers, `teachers`
    picks one by name or averages their probabilities at `temperature` ('mean'). Small caches are read into
    memory once (`resident`); larger ones are read per batch, each needed row once.
    """

    def __init__(self, cache: CacheReader, layers: Sequence[str], device: torch.device, *, temperature: float = 4.0,
                 teachers: str = "mean", resident: bool | None = None, stream: str = MAIN):
        manifest = cache.manifest
        self.format = LogitsFormat.from_json(manifest["storage"]["logits"])
        names = [t["name"] for t in manifest["teachers"]]
        if teachers != "mean" and teachers not in names:
            raise SoftcacheError(f"--teachers '{teachers}' is not in the cache; valid: mean, {', '.join(names)}")
        self.teachers = names if teachers == "mean" else [teachers]
        if len(self.teachers) > 1 and self.format.kind in ("topk", "sampled"):
            raise SoftcacheError(f"--teachers mean needs full logits; this cache stores {self.format.kind} logits: "
                                 f"pick one teacher with --teachers NAME ({', '.join(names)})")
        if self.format.kind == "sampled" and temperature != self.format.temperature:
            raise SoftcacheError(f"this cache's sampled logits were drawn at T={self.format.temperature:g}; "
                                 f"use --temperature {self.format.temperature:g}")
        if self.format.kind == "topk" and temperature not in TOPK_TEMPERATURES:
            raise SoftcacheError("top-k caches hold the tail mass at T in "
                                 f"{', '.join(f'{t:g}' for t in TOPK_TEMPERATURES)}; "
                                 f"--temperature {temperature:g} is not among them")
        self.temperature = temperature
        self.logit_arrays = {t: {suffix: logits_prefix(manifest, t, stream) + suffix
                                 for suffix in self.format.arrays(len(manifest["dataset"]["classes"]))}
                             for t in self.teachers}
        self.feature_arrays = {layer: feature_name(manifest, layer, stream) for layer in layers}
        needed = ([a for arrays in self.logit_arrays.values() for a in arrays.values()]
                  + list(self.feature_arrays.values()))
        self.needed = needed
        self.cache, self.device, self.resident, self.data = cache, device, False, {}
        if resident or (resident is None and self.size(cache, needed) <= RESIDENT_BYTES):
            self.load()

    def load(self) -> None:
        """Hold every needed array on the device, to be gathered there with the batch's index tensors."""
        self.data = {a: torch.from_numpy(_signed(self.cache.read(a))).to(self.device) for a in self.needed}
        self.resident = True
        self.nbytes = sum(t.numel() * t.element_size() for t in self.data.values())

    def _rows(self, name: str, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        if self.resident:  # index and view are on the device already, or pinned host tensors from a DataLoader
            return self.data[name][index.to(self.device, non_blocking=True), view.to(self.device, non_blocking=True)]
        unique, inverse = np.unique(index.cpu().numpy(), return_inverse=True)
        rows = self.cache.rows(name, unique)[inverse, view.cpu().numpy()]
        return torch.from_numpy(_signed(np.ascontiguousarray(rows))).to(self.device, non_blocking=True)

    @staticmethod
    def size(cache: CacheReader, names: Sequence[str]) -> int:
        return sum(int(np.prod(cache.shape(a), dtype=np.int64)) * cache.dtype(a).itemsize for a in names)

    def __call__(self, views: torch.Tensor, index: torch.Tensor, view: torch.Tensor):
        return self.assemble({a: self._rows(a, index, view) for a in self.needed})

    def assemble(self, rows: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Rows of the needed arrays (`[B, ...]` tensors on the device) -> (KD target, features)."""
        per_teacher = [self.format.decode({suffix: rows[a] for suffix, a in arrays.items()})
                       for arrays in self.logit_arrays.values()]
        if len(per_teacher) > 1:  # the ensemble: mean of the teachers' probabilities at T
            log_p = torch.stack([torch.log_softmax(t["logits"] / self.temperature, dim=1) for t in per_teacher])
            target = {"log_p": torch.logsumexp(log_p, dim=0) - math.log(len(per_teacher))}
        else:
            target = per_teacher[0]
        if "tail_lse" in target:
            target["tail_lse"] = target["tail_lse"][:, TOPK_TEMPERATURES.index(self.temperature)]
        features = {layer: rows[a].float() for layer, a in self.feature_arrays.items()}
        return target, features


def _signed(array: np.ndarray) -> np.ndarray:
    """uint16 (stored bfloat16 bit patterns) viewed as int16, which torch indexes everywhere."""
    return array.view(np.int16) if array.dtype == np.uint16 else array


class OnlineTargets:
    """The teacher run on each batch of views (online KD): same contract as `CacheTargets`.

    Used by tests and benchmarks to compare against the cache; train-student never builds one.
    """

    def __init__(self, teacher: nn.Module, layers: Sequence[str], *, mean: Sequence[float], std: Sequence[float],
                 device: torch.device):
        # channels_last on CUDA, as the dump runs it, so online-vs-cached comparisons are fair
        self.teacher = prepare_model(Tapped(teacher, layers), device).eval()
        self.mean, self.std, self.device = mean, std, device

    def __call__(self, views: torch.Tensor, index: torch.Tensor, view: torch.Tensor):
        logits, features = teacher_outputs(self.teacher, views, mean=self.mean, std=self.std, device=self.device)
        return {"logits": logits.float()}, {k: v.float() for k, v in features.items()}


def augmented_batches(source: Source, augment: Augment, *, batch_size: int, seed: int, workers: int,
                      device: torch.device, data_path: str = "auto", world: World = World()) -> Any:
    """Plain-training batches `(views [B, 3, S, S] uint8, labels [B], ...)`: samples in `epoch_order`, sample i
    taking a fresh view each epoch (AugmentedViews). With resident images (finite crop-only policies that fit,
    or `data_path='resident'`) the views are gathered on the device; else a DataLoader crops them. Same batches.
    Under torchrun (`world`), `batch_size` is the global batch and each rank gets its share of every one.
    """
    n = len(source)
    per_rank = check_global_batch(batch_size, world)

    def order(epoch: int) -> np.ndarray:
        return rank_share(epoch_order(n, seed=seed, epoch=epoch), batch_size, world)
    share = len(order(0))
    wanted = plan(data_path, crops=augment.finite and augment.plain,
                  images=image_bytes(n, augment.image_size, augment.crop_pad),
                  what=f"'{augment.describe()}' views").images == "resident"
    images = decode_all(source, workers) if wanted else None
    if images is not None:
        height, width = images.shape[-2:]
        boxes, flips = augment.all_views(height, width)
        if crop_only(boxes, augment.image_size):
            def views(epoch: int) -> tuple[np.ndarray, np.ndarray]:
                k = augment.epoch_choice(n, (seed, epoch))
                return boxes[k], flips[k]

            return ResidentReplay(images, source.labels, views=views, order=order, samples=share,
                                  image_size=augment.image_size,
                                  pad=padding_for(boxes, height, width, augment.image_size),
                                  batch_size=per_rank, drop_last=True, device=device)
    if data_path == "resident":
        raise SoftcacheError("--data-path resident needs crop-only views (cifar, none) of images of one size, "
                             "without pixel work or mixing")
    batches = KeyBatches(share, per_rank, seed=seed, shuffle=True, drop_last=True, order_fn=order,
                         key_fn=lambda epoch, visit: [(int(i), epoch) for i in visit])
    loader = torch.utils.data.DataLoader(AugmentedViews(source, augment, seed), batch_sampler=batches,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")
    return EpochBatches(loader)


def eval_batches(source: Source, augment: Augment, *, batch_size: int, workers: int, device: torch.device,
                 data_path: str = "auto") -> Any:
    """The test split at the policy's evaluation view, in order: `(views [B, 3, S, S] uint8, labels [B], ...)`.

    Resident (decoded once, gathered on the device) when the evaluation view is a crop that fits in memory,
    unless `data_path` is 'loader'; else a DataLoader. The same batches either way.
    """
    n = len(source)
    wanted = plan("loader" if data_path == "loader" else "auto", crops=True,
                  images=image_bytes(n, augment.image_size, 0)).images == "resident"  # the evaluation view: a crop
    images = decode_all(source, workers) if wanted else None
    if images is not None:
        height, width = images.shape[-2:]
        boxes = np.broadcast_to(np.asarray(augment.eval_box(height, width), np.float32), (n, 4))
        if crop_only(boxes, augment.image_size):
            return ResidentReplay(images, source.labels, views=lambda epoch: (boxes, np.zeros(n, bool)),
                                  order=lambda epoch: np.arange(n), image_size=augment.image_size,
                                  pad=padding_for(boxes, height, width, augment.image_size), batch_size=batch_size,
                                  drop_last=False, device=device)
    batches = KeyBatches(n, batch_size, seed=0, shuffle=False, drop_last=False,
                         key_fn=lambda epoch, order: [(int(i), -1) for i in order])
    return torch.utils.data.DataLoader(AugmentedViews(source, augment, seed=0), batch_sampler=batches,
                                       num_workers=workers, persistent_workers=workers > 0)


def student_data(reader: CacheReader, source: Source, *, teacher_layers: Sequence[str], temperature: float,
                 teachers: str, image_size: int, batch_size: int, seed: int, workers: int, device: torch.device,
                 data_path: str = "auto", targets: Targets | None = None,
                 world: World = World(), stream: str = MAIN, target_stream: str | None = None
                 ) -> tuple[Any, Targets, str]:
    """The training batches, the teacher targets for them, and the data path chosen (see `softcache.planner`),
    e.g. 'resident images, stream targets'.

    Every path visits samples in `window_order` over the cache's shards and, at epoch e, replays the stored
    view slot `replay_slot(V, seed, e)` of every sample, so all of them yield identical batches and targets
    for one seed. Under torchrun (`world`) `batch_size` is the global batch: each rank visits its share of
    every global batch (`rank_share`), and streams only the targets of its own samples. The views replayed are
    view stream `stream`'s, the targets `target_stream`'s (default: the same) at the same (sample, slot).
    """
    prefix = stream_prefix(reader.manifest, stream)
    n, num_views = reader.shape(prefix + "views/flip")
    per_rank = check_global_batch(batch_size, world)
    block = reader.chunk_samples("labels")  # the same samples in every array's chunks
    augment = Augment.from_manifest(stream_augment(reader.manifest, stream), image_size)

    def order(epoch: int) -> tuple[np.ndarray, np.ndarray]:
        visit, bounds = window_order(n, block=block, window=STREAM_WINDOW, seed=seed, epoch=epoch)
        if world.size == 1:
            return visit, bounds
        return (rank_share(visit, batch_size, world),
                np.array([share_position(int(b), batch_size, world, n) for b in bounds], dtype=np.int64))

    def slot(epoch: int) -> int:
        return replay_slot(num_views, seed=seed, epoch=epoch)

    # finite plain crops: every slot alike; pixel work and mixing replay in DataLoader workers
    crops = augment.finite and augment.plain and crop_only(reader.read(prefix + "views/box", slot=0), image_size)
    followers = []
    if targets is None:
        cached = CacheTargets(reader, teacher_layers, device, temperature=temperature, teachers=teachers,
                              resident=False, stream=stream if target_stream is None else target_stream)
        chosen = plan(data_path, crops=crops, images=image_bytes(len(source), image_size, augment.crop_pad),
                      targets=CacheTargets.size(reader, cached.needed), stage_targets=True)
        images, where = chosen.images, chosen.targets
        if where == "stream":
            targets = StreamingTargets(reader, cached.needed, block=block, order=order, slot=slot,
                                       assemble=cached.assemble, device=device)
            followers.append(targets)
        else:
            cached.load()
            targets = cached
    else:
        chosen = plan(data_path, crops=crops, images=image_bytes(len(source), image_size, augment.crop_pad),
                      stage_targets=True)
        images, where = chosen.images, chosen.targets
    log.info("images: %s, targets: %s", images, where)
    batches = replay_batches(reader, source, augment, order=lambda epoch: order(epoch)[0], slot=slot,
                             batch_size=per_rank, workers=workers, device=device, images=images, followers=followers,
                             samples=len(order(0)[0]), stream=stream)
    return batches, targets, f"{images} images, {where} targets"


STREAM_WINDOW = 64  # chunks of samples, from all over the cache, shuffled together (all of it, up to 64 chunks)


class EpochBatches:
    """A DataLoader over `KeyBatches`, with the objects that must follow its epoch (a streaming reader)."""

    def __init__(self, loader: torch.utils.data.DataLoader, followers: Sequence[Any] = ()):
        self.loader, self.followers = loader, list(followers)

    def set_epoch(self, epoch: int) -> None:
        self.loader.batch_sampler.set_epoch(epoch)
        for follower in self.followers:
            follower.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def replay_batches(reader: CacheReader, source: Source, augment: Augment, *, order: Callable[[int], np.ndarray],
                   slot: Callable[[int], int], batch_size: int, workers: int, device: torch.device,
                   images: str = "loader", followers: Sequence[Any] = (), samples: int | None = None,
                   stream: str = MAIN) -> Any:
    """Training batches `(views [B, 3, S, S] uint8, labels, index, view)` replaying the stored views.

    Epoch e visits the samples in `order(e)` and replays view slot `slot(e)` of each. With `images='resident'`
    the images are decoded once and each epoch's views (that slot of `views/box`, `views/flip`: N rows) are
    gathered on the device (softcache.resident); with 'loader' a DataLoader replays each view. Both yield
    identical batches.
    """
    prefix = stream_prefix(reader.manifest, stream)
    if images == "resident":
        decoded = decode_all(source, workers)
        if decoded is None:
            raise SoftcacheError("--data-path resident needs images of one size; use --data-path loader")
        height, width = decoded.shape[-2:]
        pad = padding_for(augment.all_views(height, width)[0], height, width, augment.image_size)
        return ResidentReplay(decoded, source.labels, image_size=augment.image_size, pad=pad, batch_size=batch_size,
                              drop_last=True, device=device, order=order, slot=slot, followers=followers,
                              samples=samples,
                              views=lambda epoch: (reader.read(prefix + "views/box", slot=slot(epoch)),
                                                   reader.read(prefix + "views/flip", slot=slot(epoch))))
    replay = ReplayViews.from_cache(reader, source, augment.image_size, stream=stream)
    batches = KeyBatches(len(source) if samples is None else samples, batch_size, seed=0, shuffle=True,
                         drop_last=True, order_fn=order,
                         key_fn=lambda epoch, visit: [(i, slot(epoch)) for i in visit.tolist()])
    loader = torch.utils.data.DataLoader(replay, batch_sampler=batches,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")
    return EpochBatches(loader, followers)


class PairedBatches:
    """Two replays of one cache in lockstep: at every step the same samples and view slots of two view streams
    (a weak and a strong view of each sample, for `mlkd`), each stream's batch as `student_data` gives it, the
    second appended as the last item of the first: `(views, labels, index, view[, partner, lam], second_batch)`.
    `targets` are the teacher targets of the second stream's views."""

    def __init__(self, first: Any, second: Any, targets: Targets):
        self.first, self.second, self.targets = first, second, targets

    def set_epoch(self, epoch: int) -> None:
        self.first.set_epoch(epoch)
        self.second.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.first)

    def __iter__(self):
        for a, b in zip(self.first, self.second, strict=True):
            yield (*a, b)
