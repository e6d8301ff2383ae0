"""The dump-teacher stage: run the teacher(s) once over replayable views and write the outputs to a cache.

A dump is identified by its cache id (see store.manifest): dumping to a folder that already holds a complete
cache with the same id runs no teacher; an interrupted dump with the same id continues from its committed
shards. Batches never straddle a shard, so a resumed dump computes every remaining shard exactly as an
uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from softcache import distributed, progress
from softcache.config import DumpConfig, to_json
from softcache.device import check_device, prepare_model, teacher_outputs, to_host
from softcache.data import Source, absolute_spec, load_source
from softcache.errors import SoftcacheError
from softcache.locks import WriterLock, cache_lock_path
from softcache.models import (Tapped, build_model, check_classes, check_layers, check_published_head, conventions,
                              file_sha256, is_pretrained, load_weights, spec_conventions, teacher_params)
from softcache.weights import check_weights_file
from softcache.planner import image_bytes, plan
from softcache.policies import policy_of
from softcache.resident import ViewGather, crop_only, decode_all, padding_for, view_corners
from softcache.store import where
from softcache.store.backends import BACKENDS
from softcache.store.base import ShardWriter
from softcache.store import (MAIN, Existing, array_layout, backend_of, build_manifest, check_existing, feature_name,
                             logits_prefix, prepare_cache, stream_names, stream_prefix, swap_in, teacher_norm)
from softcache.store import stream_augment as store_stream_augment
from softcache.store.manifest import encode_params
from softcache.targets import TARGET_KINDS, LogitsFormat, feature_targets
from softcache.mixing import Mix
from softcache.pixels import Pixels
from softcache.views import Augment, DumpViews, apply_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DumpResult:
    path: Path
    action: str                 # new | restart | resume | reuse | replace
    manifest: dict[str, Any]
    resumed_from: int = 0       # samples found committed
    computed_shards: int = 0    # shards this process computed and committed


STREAM_KEYS = {"augment": str, "aa": str, "color_jitter": float, "reprob": float, "mixup": float, "cutmix": float,
               "mix_prob": float, "mix_switch_prob": float}


def parse_stream(spec: str, main: Augment) -> Augment:
    """A named stream's augmentation from `KEY=VALUE,...` (STREAM_KEYS; `aa` is --aa), over no pixel work, no
    mixing and the main stream's crop policy (so streams of one crop policy share each slot's crop)."""
    options: dict[str, Any] = {"augment": main.policy}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in STREAM_KEYS:
            raise SoftcacheError(f"stream setting '{item}' is not KEY=VALUE with KEY one of {', '.join(STREAM_KEYS)} "
                                 "(e.g. aa=rand-m9-n2,reprob=0.25)")
        try:
            options[key] = STREAM_KEYS[key](value.strip())
        except ValueError:
            raise SoftcacheError(f"stream setting '{item}': {key} takes a number") from None
    return Augment(options["augment"], image_size=main.image_size, pad=main.pad, scale=main.scale, ratio=main.ratio,
                   pixels=Pixels(auto_augment=options.get("aa", ""), color_jitter=options.get("color_jitter", 0.0),
                                 reprob=options.get("reprob", 0.0)),
                   mix=Mix(options.get("mixup"), options.get("cutmix"), options.get("mix_prob", 1.0),
                           options.get("mix_switch_prob", 0.5)))


def stream_augments(streams: Sequence[tuple[str, str]], main: Augment, views: int | str) -> dict[str, Augment]:
    """`--stream NAME:KEY=VALUE,...` entries -> {name: Augment}; names are lowercase words, each given once, and
    every stream has the main stream's number of views (`--views`)."""
    out: dict[str, Augment] = {}
    k = main.resolve_views(views)
    for name, spec in streams:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == MAIN or name in out:
            raise SoftcacheError(f"stream name '{name}' must be a new lowercase word (letters, digits, _) other than "
                                 f"'{MAIN}' and {', '.join(out) or 'the others'}")
        out[name] = parse_stream(spec, main)
        try:
            same = out[name].resolve_views(views) == k
        except SoftcacheError:
            same = False
        if not same:
            raise SoftcacheError(f"--views {views} gives the main stream {k} views a sample, but not stream '{name}' "
                                 f"({out[name].describe()}); streams store the same number of views: give --views as "
                                 "a number both policies have")
    return out


def resolve_image_size(policy: str, image_size: int | None, source: Source, model: str | None = None) -> int:
    """The view side: as given, else for imagenet the input size of `model` (a timm or Hugging Face model's
    conventions, `models.spec_conventions`) or 224, else the images' own side when they all have one size.
    (Given a size, `cifar` and `none` crop each image in its own size and resize the crop to it.) Images of
    several sizes without `image_size` are refused, naming the sizes: no image is shrunk to the first one's."""
    if image_size is not None:
        return image_size
    if policy_of(policy).image_size is not None:  # imagenet: the model's own input size, or 224
        found = spec_conventions(model) if model else None
        return found.input_size if found is not None and found.input_size else policy_of(policy).image_size
    sizes = source.image_sizes()
    if not sizes:
        raise SoftcacheError(f"the {source.spec} split holds no images")
    if len(sizes) > 1:
        common = sorted(sizes.items(), key=lambda item: -item[1][0])
        found = ", ".join(f"{h}x{w} ({count}, e.g. {first})" for (h, w), (count, first) in common[:3])
        raise SoftcacheError(f"the {source.spec} images have {len(sizes)} sizes: "
                             f"{found}{', ...' if len(sizes) > 3 else ''}; "
                             f"the '{policy}' policy makes views of the images' own size: give --image-size S to "
                             "resize every view to S, or --augment imagenet (crops in each image's own pixels)")
    return int(min(next(iter(sizes))))


def input_of(arch: str) -> dict[str, Any]:
    """A teacher's record of its input conventions (`{'input': ...}` for timm and Hugging Face models, whose views
    are normalised their own way), or nothing (the dataset's normalisation: the cache id of such caches is
    unchanged)."""
    found = spec_conventions(arch)
    return {"input": found.to_json()} if found is not None else {}


def state_dict_sha256(model: nn.Module) -> str:
    """A hash of a model's weights, for teachers handed over as modules rather than files."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unique_names(archs: Sequence[str]) -> list[str]:
    names, seen = [], {}
    for arch in archs:
        seen[arch] = seen.get(arch, 0) + 1
        names.append(arch if seen[arch] == 1 else f"{arch}_{seen[arch]}")
    return names


def describe_dump(*, teachers: Sequence[dict[str, Any]], source: Source, augment: Augment, views: int | str,
                  layers: Sequence[str], seed: int, logits: LogitsFormat, targets: str, backend: str,
                  shard_mb: float = 64.0, streams: Mapping[str, Augment] | None = None,
                  teacher_head: bool = False) -> dict[str, Any]:
    """The manifest (and so the cache id) of a dump, known before any teacher runs. `streams`: named view
    streams besides the main one (`augment`), of the same samples, view count, seed and view size."""
    if targets not in TARGET_KINDS:
        raise SoftcacheError(f"unknown --targets '{targets}'; valid: {', '.join(TARGET_KINDS)}")
    num_views = augment.resolve_views(views)
    return build_manifest(
        teachers=teachers,
        dataset={"spec": source.spec, "resolved": absolute_spec(source.spec), "fingerprint": source.fingerprint(),
                 "num_samples": len(source), "classes": list(source.classes)},
        augment={"policy": augment.policy, "views": views if views == "all" else int(views), "num_views": num_views,
                 "seed": seed, "image_size": augment.image_size, "pad": augment.pad, "scale": list(augment.scale),
                 "ratio": list(augment.ratio), "mean": list(source.mean), "std": list(source.std),
                 **augment.to_json()},
        layers=layers, storage={"backend": backend, "logits": logits.to_json(), "targets": targets,
                                "shard_bytes": int(shard_mb * 2**20),
                                **({"teacher_head": True} if teacher_head else {})},
        streams={name: {"policy": a.policy, **a.to_json()} for name, a in (streams or {}).items()})


def _batches(start: int, stop: int, shard: int, per_batch: int) -> Iterator[tuple[int, int]]:
    """Sample ranges `[a, b)` of at most `per_batch` samples that never cross a shard boundary (`start` is one)."""
    for lo in range(start, stop, shard):
        hi = min(lo + shard, stop)
        for a in range(lo, hi, per_batch):
            yield a, min(a + per_batch, hi)


def _view_batches(dataset: DumpViews, batches: list[tuple[int, int]], shard: int, workers: int, device: torch.device,
                  data_path: str) -> Iterator[tuple[torch.Tensor, np.ndarray, dict[str, np.ndarray]]]:
    """Per batch of samples `[a, b)`: their views `[B * V, 3, S, S]` uint8 (sample-major), labels, and the view
    records for the cache (`{'views/box': [B, V, 4], 'views/flip': [B, V], ...}`, see `DumpViews`).

    'resident' decodes the images left to dump once and gathers the views on the device (plain crop views,
    one image size), drawing each shard's view table as it starts; 'loader' makes the views in DataLoader
    workers (any view: resizing, pixel work, mixing); 'auto' is resident when that applies and fits in memory.
    Both give the same pixels.
    """
    source, augment, k = dataset.source, dataset.augment, dataset.k
    needed = np.concatenate([np.arange(a, b) for a, b in batches]) if batches else np.zeros(0, np.int64)
    position = np.full(len(source), -1, np.int64)  # sample -> its row among the decoded images
    position[needed] = np.arange(len(needed))
    crops = augment.finite and augment.plain
    resident = plan(data_path, crops=crops, images=image_bytes(len(needed), augment.image_size,
                                                               augment.crop_pad)).images == "resident"
    images = decode_all(source, workers, indices=needed.tolist()) if resident and batches else None
    if images is not None and crops:
        height, width = images.shape[-2:]
        every = augment.all_views(height, width)[0]
        if crop_only(every, augment.image_size):
            gather = ViewGather(images, image_size=augment.image_size, device=device,
                                pad=padding_for(every, height, width, augment.image_size))
            labels, rows = source.labels, torch.as_tensor(position, device=device)  # sample -> image row
            table_lo = -1
            for a, b in batches:
                if a // shard != table_lo:  # a new shard: its view table, drawn and copied to the device once
                    table_lo = a // shard
                    lo, hi = table_lo * shard, min(table_lo * shard + shard, len(source))
                    boxes, flips = augment.stored_views(height, width, k, seed=dataset.seed, indices=np.arange(lo, hi))
                    corner, flip = view_corners(boxes, flips, gather.pad, device)
                index = rows[a:b, None].expand(-1, k).reshape(-1)
                yield (gather.crops(index, corner[a - lo:b - lo].reshape(-1, 2), flip[a - lo:b - lo].reshape(-1)),
                       labels[a:b], {"views/box": boxes[a - lo:b - lo], "views/flip": flips[a - lo:b - lo]})
            return
    if data_path == "resident":
        raise SoftcacheError("--data-path resident needs crop-only views of images of one size, without pixel work "
                             "or mixing; use --data-path loader")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[list(range(a, b)) for a, b in batches],
                                         num_workers=workers, pin_memory=device.type == "cuda")
    for stacked, labels, rows in loader:
        yield stacked.flatten(0, 1), labels.numpy(), {name: value.numpy() for name, value in rows.items()}


def check_replayable(dataset: DumpViews, samples: Iterable[int]) -> None:
    """Draw the views of `samples` (the first batch) twice and refuse a pipeline that does not give the same
    pixels and records both times: its views could not be replayed, so no shard is written."""
    for i in samples:
        (first, _, a), (second, _, b) = dataset[i], dataset[i]
        differs = [v for v in range(dataset.k) if not torch.equal(first[v], second[v])
                   or any(not np.array_equal(a[name][v], b[name][v]) for name in a)]
        if differs:
            raise SoftcacheError(f"the augmentation pipeline is not deterministic: sample {i} view {differs[0]} came "
                                 f"out differently when drawn twice with the same seed ({dataset.augment.describe()})"
                                 "; softcache seeds torch's generator for every view, so draw from it (as "
                                 "torchvision's v2 transforms do), not from Python's random or NumPy's global "
                                 "generator")


def default_writer_threads() -> int:
    """Shards compressed at once: every core up to 8 (BENCHMARKS.md: 4 threads absorb a ResNet-56 feature dump
    at 64k views/s)."""
    return max(1, min(8, usable_cores()))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _target_layout(tapped: Sequence[Tapped], names: Sequence[str], source: Source, augment: Augment,
                   manifest: dict[str, Any], fmt: LogitsFormat, dev: torch.device) -> dict[str, tuple]:
    """The target arrays' shapes and dtypes, from the teachers' outputs on one view of sample 0; a classifier
    of the wrong width is refused here."""
    image, _ = source[0]
    probe = apply_view(image, augment.eval_box(*image.shape[-2:]), False, augment.image_size)[None]
    arrays: dict[str, tuple[tuple[int, ...], str]] = {}
    for k, (name, teacher) in enumerate(zip(names, tapped)):
        mean, std = teacher_norm(manifest, k)
        logits, features = teacher_outputs(teacher, probe, mean=mean, std=std, device=dev)
        if logits.shape[1] != len(source.classes):
            raise SoftcacheError(f"class-count mismatch: teacher {name} has {logits.shape[1]} outputs, "
                                 f"the dataset {source.spec} has {len(source.classes)} classes")
        for stream in stream_names(manifest):  # every stream holds the same target arrays, under its prefix
            prefix = logits_prefix(manifest, name, stream)
            arrays.update({prefix + suffix: spec for suffix, spec in fmt.arrays(logits.shape[1]).items()})
            if k == 0:
                for layer, f in features.items():
                    if manifest["storage"]["targets"] == "attention" and f.dim() == 3:
                        raise SoftcacheError(f"--targets attention stores AT maps of [C, H, W] feature maps; layer "
                                             f"'{layer}' gives tokens {list(f.shape[1:])}: dump it with --targets "
                                             "features (token features serve fitnets, sp and the embedding terms)")
                    for key, stored in feature_targets(manifest["storage"]["targets"], layer, f).items():
                        arrays[feature_name(manifest, key, stream)] = (tuple(stored.shape[1:]), "float16")
    return arrays


def _open_writer(out: str | Path, layout: dict[str, tuple], manifest: dict[str, Any], existing: Existing, *,
                 threads: int, world: distributed.World) -> ShardWriter:
    """Rank 0 creates, reopens or restarts the store; the other ranks open what it prepared, knowing which
    shards an earlier dump committed."""
    backend = manifest["storage"]["backend"]
    writer = prepare_cache(out, layout, manifest, existing=existing, backend=backend, threads=threads) \
        if world.main else None
    committed = distributed.broadcast(writer.committed if writer else None, world)
    if writer is None:
        writer = prepare_cache(out, layout, manifest, existing=Existing(existing.action, committed), backend=backend,
                               threads=threads, create=False)
    return writer


class _TeacherBatches:
    """The teachers on batches of views, and their outputs into the writer. `launch` queues the teachers on
    a batch (returning at once on CUDA); `store` encodes a launched batch's outputs and hands its rows to
    the writer, with the batch's wall and teacher time."""

    def __init__(self, tapped: Sequence[Tapped], names: Sequence[str], source: Source, manifest: dict[str, Any],
                 writer: ShardWriter, *, num_views: int, dev: torch.device, started: float):
        self.tapped, self.names, self.source, self.manifest, self.writer = tapped, names, source, manifest, writer
        self.fmt = LogitsFormat.from_json(manifest["storage"]["logits"])
        self.num_views, self.dev = num_views, dev
        self.device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        self.last = started  # a batch's wall time runs from the previous store (the first's: set-up included)

    def launch(self, flats: Mapping[str, torch.Tensor]) -> tuple[list, Any, Any]:
        """Outputs of every teacher on each stream's views `flats {stream: [B * V, 3, S, S]}`, copies to host
        started; the last two items time the teachers: (None, seconds) on CPU, (end event, start event) on
        CUDA, read once the batch is done."""
        outputs, cuda = [], self.dev.type == "cuda"
        began = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
        if cuda:
            began.record()
        for stream, flat in flats.items():
            for k, (name, teacher) in enumerate(zip(self.names, self.tapped)):
                mean, std = teacher_norm(self.manifest, k)
                logits, features = teacher_outputs(teacher, flat, mean=mean, std=std, device=self.dev)
                stored = {key: value for layer, f in features.items()
                          for key, value in feature_targets(self.manifest["storage"]["targets"], layer, f).items()}
                outputs.append((stream, name, to_host(logits), {layer: to_host(v) for layer, v in stored.items()}))
        if not cuda:
            return outputs, None, time.perf_counter() - began
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return outputs, event, began

    def store(self, span: tuple[int, int], labels: np.ndarray, records: Mapping[str, dict[str, np.ndarray]],
              outputs: list, event: Any, timing: Any) -> None:
        """`records {stream: {'views/box': ..., ...}}`: each stream's view records, stored under its prefix."""
        if event is not None:
            event.synchronize()
            timing = timing.elapsed_time(event) / 1000
        b, k = span[1] - span[0], self.num_views
        rows = {"labels": labels.astype(np.int64)}
        for stream, arrays in records.items():
            rows.update({stream_prefix(self.manifest, stream) + name: value for name, value in arrays.items()})
        # the sampled-logits draw is a function of (seed, first sample), so a resumed dump draws the same
        generator = torch.Generator().manual_seed(self.manifest["augment"]["seed"] * 1_000_003 + span[0])
        for stream, name, logits, features in outputs:
            prefix = logits_prefix(self.manifest, name, stream)
            for suffix, value in self.fmt.encode(logits, generator).items():
                rows[prefix + suffix] = value.reshape(b, k, *value.shape[1:])
            for layer, value in features.items():
                rows[feature_name(self.manifest, layer, stream)] = value.numpy().reshape(b, k, *value.shape[1:])
        now = time.perf_counter()
        self.writer.write(span[0], rows, cost={"wall_s": now - self.last, "teacher_s": timing,
                                               "views": b * k * len(records), "device": self.device_name})
        self.last = now

    def run(self, batches: list[tuple[int, int]], views: Mapping[str, Iterable], *, what: str) -> None:
        """Every batch, one in flight: while the device runs batch k, the host encodes batch k - 1 and hands
        it to the writer threads, which compress and write whole shards. `views {stream: batches of (views,
        labels, records)}`, one iterator per view stream, in step."""
        pending, todo = None, sum(b - a for a, b in batches)
        for span, *items in progress.track(
                zip(batches, *views.values()), what=what, total=len(batches),
                count=lambda item: item[0][1] - item[0][0], amount=todo, amount_unit="samples", final=True):
            if pending is None:
                log.info("first batch: samples %d-%d of %d", span[0], span[1], len(self.source))
            flats = {stream: item[0] for stream, item in zip(views, items)}
            records = {stream: item[2] for stream, item in zip(views, items)}
            launched = (span, items[0][1], records, *self.launch(flats))
            if pending is not None:
                self.store(*pending)
            pending = launched
        if pending is not None:
            self.store(*pending)


def run_dump(teachers: Sequence[nn.Module], source: Source, out: str | Path, manifest: dict[str, Any],
             existing: Existing, *, batch_size: int = 256, workers: int = 2, device: str = "cpu",
             data_path: str = "auto", writer_threads: int = 0, world: distributed.World = distributed.World(),
             since: float | None = None) -> DumpResult:
    """Run the teachers over the views the manifest describes and write (or finish) the cache at `out`;
    `writer_threads` shards are compressed at once (0: `default_writer_threads()`). Only the shards not yet
    committed are computed; under torchrun (`world`) each rank computes its own share of them, whole shards,
    and rank 0 completes the cache once all are committed."""
    started = time.perf_counter() if since is None else since  # the first shard's wall time includes set-up
    if existing.action == "reuse":
        return DumpResult(where.location(out), "reuse", manifest)
    params = teacher_params(teachers[0], manifest["layers"], manifest["storage"].get("teacher_head", False))
    if params:  # once per cache: the BatchNorms before tapped ReLUs (OFD), the classifier (SimKD)
        manifest = {**manifest, "teacher_params": encode_params(params)}
    aug = manifest["augment"]
    augment, dev = Augment.from_manifest(aug), torch.device(device)
    tapped = [prepare_model(Tapped(t, manifest["layers"] if k == 0 else []), dev).eval()
              for k, t in enumerate(teachers)]
    streams = {stream: DumpViews(source, Augment.from_manifest(store_stream_augment(manifest, stream)), aug["views"],
                                 aug["seed"]) for stream in stream_names(manifest)}
    dataset = streams[MAIN]
    for stream, views in streams.items():  # what the CLI checks first, for a Python caller too
        if views.k != dataset.k:
            raise SoftcacheError(f"stream '{stream}' has {views.k} views a sample, the main stream {dataset.k}; "
                                 "streams store the same number of views")
    if len(streams) > 1 and data_path == "resident":
        raise SoftcacheError("--data-path resident makes the main stream's views on the device; with streams the "
                             "views are made together by DataLoader workers: use --data-path loader (or auto)")
    names = [t["name"] for t in manifest["teachers"]]
    fmt = LogitsFormat.from_json(manifest["storage"]["logits"])
    records = {stream_prefix(manifest, stream) + name: spec for stream, views in streams.items()
               for name, spec in views.augment.record_layout().items()}
    records.update({stream_prefix(manifest, stream) + name: ((4,), "float32") if name.endswith("box") else ((), "bool")
                    for stream in streams if stream != MAIN for name in ("views/box", "views/flip")})
    layout = array_layout(len(source), dataset.k,
                          {**records, **_target_layout(tapped, names, source, augment, manifest, fmt, dev)})
    for views in streams.values():  # every rank, so none waits on one that refused
        if not views.augment.plain:
            check_replayable(views, range(min(len(source), max(1, batch_size // dataset.k))))
    writer = _open_writer(out, layout, manifest, existing, threads=writer_threads or default_writer_threads(),
                          world=world)
    resumed_from = sum(m["samples"][1] - m["samples"][0] for m in writer.committed.values())
    shard = writer.shard_samples
    mine = writer.missing()[world.rank::world.size]  # whole shards, dealt out in turn: no two writers per shard
    per_batch = max(1, batch_size // dataset.k)
    batches = [span for k in mine
               for span in _batches(k * shard, min(k * shard + shard, len(source)), shard, per_batch)]
    runner = _TeacherBatches(tapped, names, source, manifest, writer, num_views=dataset.k, dev=dev, started=started)
    what = f"dump-teacher {Path(str(out)).name}"  # the cache's name: a recipe may dump several
    progress.say(f"{what}: {sum(b - a for a, b in batches):,} samples x {dataset.k} views to compute on "
                 f"{runner.device_name} ({len(mine)} of {writer.num_shards} shards"
                 + (f"; {resumed_from:,} samples were committed before)" if resumed_from else ")"))
    runner.run(batches, {stream: _view_batches(views, batches, shard, workers, dev, data_path if len(streams) == 1
                                               else "loader") for stream, views in streams.items()}, what=what)
    writer.close()
    distributed.barrier(world)  # every rank's shards are committed
    final = manifest
    if world.main:
        final = writer.finish()
        if str(writer.path) != str(where.location(out)):  # --overwrite: the new cache replaces the old one now
            swap_in(writer.path, Path(out))
        log.info("cache complete: %s (%d samples x %d views)", out, len(source), dataset.k)
    distributed.barrier(world)
    return DumpResult(where.location(out), existing.action, final, resumed_from, writer.stored_shards)


def dump_teacher(teacher: nn.Module | Sequence[nn.Module], source: Source, out: str | Path, *, augment: Augment,
                 views: int | str = 1, layers: Sequence[str] = (), seed: int = 0, batch_size: int = 256,
                 workers: int = 2, device: str = "cpu", overwrite: bool = False, logits: str = "fp16",
                 targets: str = "features", format: str | None = None, temperature: float = 4.0,
                 shard_mb: float = 64.0, data_path: str = "auto", writer_threads: int = 0,
                 teacher_info: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
                 streams: Mapping[str, Augment] | None = None, teacher_head: bool = False) -> DumpResult:
    """Run `teacher` (or several) in eval mode, no grad, over `views` views of every sample; write the cache at `out`.

    `views` is a count, drawn from `(seed, index)`, or 'all' to enumerate a finite policy. `layers` are
    tapped on the first teacher. `logits` and `targets` choose the stored forms (see softcache.targets);
    `format` the backend (zarr, or hdf5; default from the suffix). `teacher_info` names the teachers
    (`name`, `arch`, `weights_sha256`); without it their weights are hashed here. `streams` adds named view
    streams (`{name: Augment}` of the same view size) beside the main one, each with its own teacher outputs.
    `teacher_head` stores the first teacher's classifier once in the cache (SimKD reuses it); the BatchNorms before
    tapped `LAYER.pre_relu` layers are stored with them (OFD's margins).
    """
    modules = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    check_layers(modules[0], layers)
    infos = [dict(teacher_info)] if isinstance(teacher_info, Mapping) else [dict(i) for i in teacher_info or []]
    if not infos:
        archs = [type(m).__name__.lower() for m in modules]
        infos = [{"arch": a, "weights_sha256": state_dict_sha256(m)} for a, m in zip(archs, modules)]
    for info, module in zip(infos, modules):  # a timm or Hugging Face teacher normalises its views its own way
        found = conventions(module)
        if found is not None and "input" not in info:
            info["input"] = found.to_json()
    for info, name in zip(infos, _unique_names([i.get("arch", "teacher") for i in infos])):
        info.setdefault("name", name)
    backend = backend_of(out, format)
    manifest = describe_dump(teachers=infos, source=source, augment=augment, views=views, layers=layers, seed=seed,
                             logits=LogitsFormat.parse(logits, temperature), targets=targets, backend=backend,
                             shard_mb=shard_mb, streams=streams, teacher_head=teacher_head)
    with (WriterLock(cache_lock_path(out), f"cache '{out}'") if not where.is_url(out) else contextlib.nullcontext()):
        existing = check_existing(out, manifest, overwrite=overwrite, backend=backend)
        return run_dump(modules, source, out, manifest, existing, batch_size=batch_size, workers=workers,
                        device=device, data_path=data_path, writer_threads=writer_threads)


def check_dump(cfg: DumpConfig) -> None:
    """The dump's values that need no data or model, checked before anything is loaded or written (and by
    `softcache run` for every stage before its first stage runs)."""
    if len(cfg.weights) != len(cfg.teacher) and not (not cfg.weights and all(map(is_pretrained, cfg.teacher))):
        raise SoftcacheError(f"{len(cfg.teacher)} --teacher but {len(cfg.weights)} --weights; give one --weights per "
                             "--teacher (or none, when every teacher is a zoo model with pretrained=true)")
    augment = Augment.from_options(cfg, cfg.image_size or 1)  # the view count does not depend on the size
    streams = stream_augments(cfg.streams, augment, cfg.views)
    if cfg.data_path == "resident" and streams:
        raise SoftcacheError("--data-path resident makes the main stream's views on the device; with --stream the "
                             "streams' views are made together by DataLoader workers: use --data-path loader (or auto)")
    if cfg.views != "all":
        augment.resolve_views(cfg.views)
    else:
        augment.count_all()
    LogitsFormat.parse(cfg.logits, cfg.temperature)
    if cfg.data_path == "resident" and not (augment.finite and augment.plain):
        raise SoftcacheError(f"--data-path resident needs crop-only views (cifar, none) without pixel work; "
                             f"'{augment.describe()}' resizes its crops or works on their pixels: use --data-path "
                             "loader (or auto)")
    if cfg.batch_size < 1 or cfg.shard_mb <= 0:
        raise SoftcacheError(f"batch_size {cfg.batch_size} and shard_mb {cfg.shard_mb} must be positive")
    backend_of(cfg.out, cfg.format)
    check_device(cfg.device)


def dump_from_config(cfg: DumpConfig) -> DumpResult:
    """The dump-teacher command: identify the dump first, so a cache already made is reused without a teacher."""
    since = time.perf_counter()
    check_dump(cfg)
    source = load_source(cfg.data, "train", download=cfg.download)
    augment = Augment.from_options(cfg, resolve_image_size(cfg.augment, cfg.image_size, source, cfg.teacher[0]))
    streams = stream_augments(cfg.streams, augment, cfg.views)
    views: int | str = "all" if cfg.views == "all" else augment.resolve_views(cfg.views)
    for weights in cfg.weights:
        check_weights_file(weights)
    built: list[nn.Module] = []
    if cfg.weights:
        infos = [{"name": name, "arch": arch, "weights": str(w), "weights_sha256": file_sha256(w), **input_of(arch)}
                 for name, arch, w in zip(_unique_names(cfg.teacher), cfg.teacher, cfg.weights)]
    else:  # the zoos' published weights: downloaded (or found in the zoo's own cache) and hashed here
        for arch in cfg.teacher:
            check_published_head(arch, len(source.classes))
        built = [build_model(arch, num_classes=len(source.classes)) for arch in cfg.teacher]
        infos = [{"name": name, "arch": arch, "weights": "pretrained", "weights_sha256": state_dict_sha256(model),
                  **input_of(arch)} for name, arch, model in zip(_unique_names(cfg.teacher), cfg.teacher, built)]
    infos[0]["config"] = to_json(cfg)
    backend = backend_of(cfg.out, cfg.format)
    manifest = describe_dump(teachers=infos, source=source, augment=augment, views=views, layers=cfg.layers,
                             seed=cfg.seed, logits=LogitsFormat.parse(cfg.logits, cfg.temperature),
                             targets=cfg.targets, backend=backend, shard_mb=cfg.shard_mb, streams=streams,
                             teacher_head=cfg.teacher_head)
    world = distributed.init(cfg.device)
    refusal = BACKENDS[backend].torchrun_refusal
    if world.size > 1 and refusal:
        raise SoftcacheError(refusal)
    device = distributed.local_device(cfg.device, world)
    # rank 0 holds the cache's lock from its first look at --out to the last write, and decides for all
    # (an object store has no lock to take: one dump at a time per cache URL is the user's to keep)
    lock = (WriterLock(cache_lock_path(cfg.out), f"cache '{cfg.out}'") if world.main and not where.is_url(cfg.out)
            else contextlib.nullcontext())
    with lock:
        existing = distributed.broadcast(
            check_existing(cfg.out, manifest, overwrite=cfg.overwrite, backend=backend) if world.main else None, world)
        if existing.action == "reuse":
            return DumpResult(where.location(cfg.out), "reuse", manifest)
        teachers = built or [load_weights(build_model(arch, len(source.classes), weights_follow=True), weights)
                             for arch, weights in zip(cfg.teacher, cfg.weights)]
        for arch, teacher in zip(cfg.teacher, teachers):
            check_classes(teacher, arch, len(source.classes), augment.image_size)
        check_layers(teachers[0], cfg.layers)
        return run_dump(teachers, source, cfg.out, manifest, existing, batch_size=cfg.batch_size, workers=cfg.workers,
                        device=device, data_path=cfg.data_path, writer_threads=cfg.writer_threads, world=world,
                        since=since)
