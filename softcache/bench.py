"""`softcache bench`: what caching buys, measured on the current device in one process.

    (a) teacher inference only           images/s of the teacher's forward pass on device-resident batches
    (b) dump-teacher end to end          logits + one feature layer, and logits only (views written / s)
    (c) student CE only                  student training steps, cross-entropy on the replayed views
    (d) student from the cache           KD, KD+AT, KD+FitNets, targets read from the cache (the data path
                                         train-student would choose, or --data-path), and KD+AT streamed
    (e) online KD                        the teacher in the loop on the same views

Student rows give images/s and the ratio to (c); dump rows the ratio to (a). Timings are wall clock after
warm-up steps, synchronised on CUDA; they are measurements, never asserted anywhere.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from softcache.data import load_source
from softcache.device import autocast, model_inputs, prepare_model
from softcache.dump import dump_teacher, resolve_image_size
from softcache.losses import resolve_weights
from softcache.models import Tapped, build_model, load_weights
from softcache.store import open_cache
from softcache.batches import OnlineTargets, student_data
from softcache.train import build_criterion, distill_step
from softcache.views import Augment


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], int], device: torch.device, steps: int, warmup: int) -> float:
    """Images per second of `fn` (one step, returns its image count) over `steps` steps after `warmup`."""
    for _ in range(warmup):
        fn()
    _sync(device)
    started, images = time.perf_counter(), 0
    for _ in range(steps):
        images += fn()
    _sync(device)
    return images / (time.perf_counter() - started)


def _cycle(batches):
    """Replay batches forever, epoch after epoch."""
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def run_bench(*, teacher: str, student: str, data: str, out: str | Path, weights: str | None = None,
              layer: str = "layer3", views: int = 2, batch_size: int = 512, steps: int = 50, warmup: int = 5,
              workers: int = 8, device: str = "cpu", seed: int = 0, data_path: str = "auto") -> dict[str, Any]:
    """Measure (a)-(e) and write `out/bench.json`; returns the table as a dict."""
    dev, out = torch.device(device), Path(out)
    source = load_source(data, "train")
    classes = len(source.classes)
    augment = Augment("cifar", image_size=resolve_image_size("cifar", None, source))
    torch.manual_seed(seed)
    teacher_model = build_model(teacher, classes)
    if weights:
        load_weights(teacher_model, weights)
    rows: list[dict[str, Any]] = []

    # (b) first: the caches it writes feed the student rows
    caches = {}
    for name, layers in (("dump: logits + " + layer, [layer]), ("dump: logits only", [])):
        path = out / ("cache_feat" if layers else "cache_logits")
        started = time.perf_counter()
        dump_teacher(teacher_model, source, path, augment=augment, views=views, layers=layers, seed=seed,
                     batch_size=batch_size, workers=workers, device=device, overwrite=True)
        _sync(dev)
        rows.append({"name": name, "images_per_s": len(source) * views / (time.perf_counter() - started)})
        caches[bool(layers)] = open_cache(path)
    reader = caches[True]

    def student_batches(path: str, layers: list[str], online: bool = False):
        """Batches and targets as train-student builds them (online: the teacher computes the targets)."""
        targets = None
        if online:
            targets = OnlineTargets(teacher_model, layers, mean=source.mean, std=source.std, device=dev)
        batches, targets, chosen = student_data(reader, source, teacher_layers=layers, temperature=4.0, teachers="mean",
                                                image_size=augment.image_size, batch_size=batch_size, seed=seed,
                                                workers=workers, device=dev, data_path=path, targets=targets)
        return _cycle(batches), targets, chosen

    stream, _, chosen_path = student_batches(data_path, [])

    # (a) teacher inference on device-resident batches (the data path excluded)
    tapped_teacher = Tapped(teacher_model, []).to(dev).eval()
    if dev.type == "cuda":
        tapped_teacher = tapped_teacher.to(memory_format=torch.channels_last)
    fixed = model_inputs(next(stream)[0].to(dev), source.mean, source.std, dev)

    @torch.no_grad()
    def infer() -> int:
        with autocast(dev):
            tapped_teacher(fixed)
        return len(fixed)

    rows.insert(0, {"name": "teacher inference only", "images_per_s": _timed(infer, dev, steps, warmup)})

    # (c)-(e) student training steps
    def student_rate(terms: list[str], targets_kind: str) -> float:
        torch.manual_seed(seed)
        model = build_model(student, classes)
        pairs = {layer: layer} if {"at", "fitnets"} & set(terms) else {}
        tapped = Tapped(model, list(pairs)).to(dev)
        if dev.type == "cuda":
            tapped = tapped.to(memory_format=torch.channels_last)
        weights_ = resolve_weights(terms, alpha=0.9, beta=1000.0, hint_weight=100.0)
        criterion = build_criterion(tapped, reader, weights=weights_, temperature=4.0, pairs=pairs,
                                    image_size=augment.image_size, device=dev)
        path = "stream" if targets_kind == "stream" else data_path
        stream, targets, _ = student_batches(path, sorted(set(pairs.values())), online=targets_kind == "online")
        step_loss = distill_step(tapped, criterion, targets, mean=source.mean, std=source.std, device=dev)
        opt = torch.optim.SGD(list(tapped.parameters()) + list(criterion.parameters()), lr=0.05, momentum=0.9)
        tapped.train()

        def one_step() -> int:
            loss_terms, logits, _ = step_loss(next(stream))
            opt.zero_grad(set_to_none=True)
            loss_terms["loss"].backward()
            opt.step()
            return len(logits)

        return _timed(one_step, dev, steps, warmup)

    base = student_rate(["ce"], "cache")
    rows.append({"name": "student CE only", "images_per_s": base})
    for name, terms, kind in (("student KD (cache)", ["kd"], "cache"),
                              ("student KD+AT (cache)", ["kd", "at"], "cache"),
                              ("student KD+FitNets (cache)", ["kd", "fitnets"], "cache"),
                              ("student KD+AT (cache, streamed)", ["kd", "at"], "stream"),
                              ("student KD (online teacher)", ["kd"], "online"),
                              ("student KD+AT (online teacher)", ["kd", "at"], "online")):
        rows.append({"name": name, "images_per_s": student_rate(terms, kind)})
    teacher_rate = rows[0]["images_per_s"]
    for row in rows:
        ref = teacher_rate if row["name"].startswith(("dump", "teacher")) else base
        row["ratio"] = row["images_per_s"] / ref
        row["ratio_to"] = "(a)" if ref is teacher_rate else "(c)"
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"device": device_name, "teacher": teacher, "student": student, "data": data, "views": views,
              "batch_size": batch_size, "steps": steps, "data_path": chosen_path, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_bench(result: dict[str, Any]) -> str:
    lines = [f"{result['teacher']} -> {result['student']} on {result['data']} ({result['device']}, batch "
             f"{result['batch_size']}, {result['views']} views, {result['data_path']})",
             f"{'measurement':<34} {'images/s':>12} {'ratio':>12}"]
    for row in result["rows"]:
        lines.append(f"{row['name']:<34} {row['images_per_s']:>12,.0f} {row['ratio']:>7.2f} x {row['ratio_to']}")
    return "\n".join(lines)
