"""The dump-teacher stage: run the teacher once over replayable views and write its outputs to a cache."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from softcache.config import DumpConfig, to_json
from softcache.data import Source, load_source
from softcache.errors import SoftcacheError
from softcache.models import Tapped, build_model, file_sha256, load_weights
from softcache.store import array_layout, build_manifest, check_writable, create_cache
from softcache.views import Augment, DumpViews, apply_view, normalize

log = logging.getLogger(__name__)


def resolve_image_size(policy: str, image_size: int | None, source: Source) -> int:
    """The view side: as given, else 224 for imagenet, else the shorter side of the first source image."""
    if image_size is not None:
        return image_size
    if policy == "imagenet":
        return 224
    return int(min(source[0][0].shape[-2:]))


def autocast(device: torch.device, dtype: torch.dtype = torch.float16):
    """Mixed precision on CUDA, full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def teacher_outputs(teacher: Tapped, views: torch.Tensor, *, mean: Sequence[float], std: Sequence[float],
                    device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher on uint8 views `[B, 3, S, S]`: logits `[B, K]` and features `{layer: [B, C, H, W]}` in float16."""
    x = normalize(views.to(device, non_blocking=True), mean, std)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device):
        logits, features = teacher(x)
    return logits.half(), {name: f.half() for name, f in features.items()}


def dump_teacher(teacher: nn.Module, source: Source, out: str | Path, *, augment: Augment, views: int | str = 1,
                 layers: Sequence[str] = (), seed: int = 0, batch_size: int = 256, workers: int = 2,
                 device: str = "cpu", overwrite: bool = False, teacher_info: dict[str, Any] | None = None) -> Path:
    """Run `teacher` (eval mode, no grad) over `views` views of every sample of `source`; write the cache at `out`.

    `views` is a count, drawn from `(seed, index)`, or 'all' to enumerate a finite policy. Returns `out`.
    """
    check_writable(out, overwrite=overwrite)  # refuse before any teacher work
    dev = torch.device(device)
    tapped = Tapped(teacher, layers).to(dev).eval()
    if dev.type == "cuda":
        tapped = tapped.to(memory_format=torch.channels_last)
    dataset = DumpViews(source, augment, views, seed)
    num_views = dataset.k

    # One view of sample 0 tells the output shapes; a classifier of the wrong width is refused here.
    image, _ = source[0]
    probe = apply_view(image, augment.eval_box(*image.shape[-2:]), False, augment.image_size)[None]
    logits, features = teacher_outputs(tapped, probe, mean=source.mean, std=source.std, device=dev)
    num_classes = len(source.classes)
    if logits.shape[1] != num_classes:
        raise SoftcacheError(f"class-count mismatch: the teacher has {logits.shape[1]} outputs, "
                             f"the dataset {source.spec} has {num_classes} classes")
    layout = array_layout(len(source), num_views, num_classes, {k: tuple(f.shape[1:]) for k, f in features.items()})
    manifest = build_manifest(
        teacher=teacher_info or {"arch": type(teacher).__name__, "weights_sha256": None},
        dataset={"spec": source.spec, "fingerprint": source.fingerprint(), "num_samples": len(source),
                 "classes": list(source.classes)},
        augment={"policy": augment.policy, "views": views if views == "all" else int(views), "num_views": num_views,
                 "seed": seed, "image_size": augment.image_size, "pad": augment.pad, "scale": list(augment.scale),
                 "ratio": list(augment.ratio), "mean": list(source.mean), "std": list(source.std)},
        layers=layers)
    writer = create_cache(out, layout, manifest, overwrite=overwrite)

    samples_per_batch = max(1, batch_size // num_views)
    loader = torch.utils.data.DataLoader(dataset, batch_size=samples_per_batch, shuffle=False, num_workers=workers,
                                         pin_memory=dev.type == "cuda", persistent_workers=False)
    start = 0
    for stacked, labels, boxes, flips in tqdm(loader, desc="dump-teacher", unit="batch", disable=None):
        b = len(labels)
        logits, features = teacher_outputs(tapped, stacked.flatten(0, 1), mean=source.mean, std=source.std, device=dev)
        rows = {"labels": labels.numpy().astype(np.int64),
                "logits": logits.view(b, num_views, -1).cpu().numpy(),
                "views/box": boxes.numpy(), "views/flip": flips.numpy()}
        rows.update({f"features/{k}": f.view(b, num_views, *f.shape[1:]).cpu().numpy() for k, f in features.items()})
        writer.write(start, rows)
        start += b
    writer.finish(manifest)
    log.info("cache complete: %s (%d samples x %d views)", out, len(source), num_views)
    return Path(out)


def dump_from_config(cfg: DumpConfig) -> Path:
    """The dump-teacher command: resolve names and specs, then `dump_teacher`."""
    source = load_source(cfg.data, "train", download=cfg.download)
    augment = Augment(cfg.augment, image_size=resolve_image_size(cfg.augment, cfg.image_size, source))
    augment.resolve_views(cfg.views)  # refuse a bad --views before any teacher work
    check_writable(cfg.out, overwrite=cfg.overwrite)
    teacher = build_model(cfg.teacher, num_classes=len(source.classes))
    load_weights(teacher, cfg.weights)
    info = {"arch": cfg.teacher, "weights": str(cfg.weights), "weights_sha256": file_sha256(cfg.weights),
            "config": to_json(cfg)}
    views: int | str = cfg.views if cfg.views == "all" else int(cfg.views)
    return dump_teacher(teacher, source, cfg.out, augment=augment, views=views, layers=cfg.layers, seed=cfg.seed,
                        batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device, overwrite=cfg.overwrite,
                        teacher_info=info)
