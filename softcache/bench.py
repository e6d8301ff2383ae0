"""`softcache bench`: what caching buys, measured on the current device in one process.

    (a) teacher inference only           images/s of the teacher's forward pass on device-resident batches
    (b) dump-teacher end to end          logits + one feature layer, and logits only (views written / s)
    (w) cache writer, host only          MB/s of raw teacher outputs compressed and written to a cache, with
                                         one writer thread and with every core: logits, feature maps and
                                         attention maps of the bench teacher (meaningful on any machine)
    (c) student CE only                  student training steps, cross-entropy on the replayed views
    (d) student from the cache           KD, KD+AT, KD+FitNets, targets read from the cache (the data path
                                         train-student would choose, or --data-path), and KD+AT streamed
    (e) online KD                        the teacher in the loop on the same views

Load on a shared machine comes and goes, so rows timed one after the other distort every ratio. The rows are
therefore taken in interleaved rounds (a, b, w, c, d, e, then again): each row reports the median over
rounds and its spread, `(max - min) / median`; each ratio is the median of the ratios taken within a round
(student rows to (c), dump rows to (a)). A spread above SPREAD_WARN is flagged. Timings are wall clock after
warm-up, synchronised on CUDA; they are measurements, never asserted anywhere.
"""
from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from softcache.batches import OnlineTargets, student_data
from softcache.data import load_source
from softcache.device import autocast, model_inputs, prepare_model, teacher_outputs
from softcache.dump import dump_teacher, resolve_image_size, usable_cores
from softcache.losses import attention_map, resolve_weights
from softcache.models import Tapped, build_model, load_weights
from softcache.store import Existing, array_layout, open_cache, prepare_cache
from softcache.store.base import plan_shards
from softcache.train import build_criterion
from softcache.training.steps import DistillStep
from softcache.views import Augment

log = logging.getLogger(__name__)

SPREAD_WARN = 0.15    # a row whose rounds spread wider than this (max - min, relative to the median) is flagged
WRITER_BYTES = 32 << 20  # raw bytes per writer measurement


@dataclass
class Measurement:
    """One row: `run()` does one timed unit of work and returns how much it processed (images, or bytes)."""

    name: str
    unit: str                          # images/s | MB/s
    run: Callable[[], float]
    ref: str | None = None             # the row this one's ratio is taken to
    repeat: int = 1                    # units per timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(batches):
    """Replay batches forever, epoch after epoch."""
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def timed_rate(m: Measurement, device: torch.device) -> float:
    """The rate of `m` (its unit) over `m.repeat` units of work, synchronised on CUDA."""
    _sync(device)
    started, amount = time.perf_counter(), 0.0
    for _ in range(m.repeat):
        amount += m.run()
    _sync(device)
    rate = amount / (time.perf_counter() - started)
    return rate / 2**20 if m.unit == "MB/s" else rate


def summarise(per_round: dict[str, list[float]], refs: dict[str, str | None]) -> list[dict[str, Any]]:
    """Per row: the rates of every round, their median and spread, and the median of the per-round ratios to
    the row's reference (1.0 for a reference itself)."""
    rows = []
    for name, rates in per_round.items():
        median = statistics.median(rates)
        row: dict[str, Any] = {"name": name, "per_round": rates, "median": median,
                               "spread": (max(rates) - min(rates)) / median if median else 0.0}
        ref = refs[name]
        if ref is not None:
            row["ratio_to"] = ref
            row["ratio"] = statistics.median(a / b for a, b in zip(rates, per_round[ref]))
        rows.append(row)
    return rows


def writer_measurement(name: str, per_view: np.ndarray, views: int, threads: int, scratch: Path,
                       num_samples: int) -> Measurement:
    """Write `per_view [M, ...]` (real teacher outputs, tiled) as a cache array of `views` views with `threads`
    writer threads, in the shards a dump of `num_samples` samples would use: 4 shards per thread (at least
    WRITER_BYTES raw, at most the whole dataset). Returns the raw bytes written (labels included)."""
    row_bytes = per_view[0].nbytes * views
    full = array_layout(num_samples, views, {"target": (per_view.shape[1:], str(per_view.dtype))})
    del full["views/box"], full["views/flip"]
    shard, _ = plan_shards(full)
    n = min(num_samples, max(4 * threads * shard, WRITER_BYTES // row_bytes))
    tiled = per_view[np.arange(n * views) % len(per_view)].reshape(n, views, *per_view.shape[1:])
    layout = {"labels": ((n,), "int64"), "target": ((n, *full["target"][0][1:]), full["target"][1])}
    labels = np.zeros(n, np.int64)
    manifest = {"id": "bench", "storage": {"planned_samples": num_samples}}

    def run() -> float:
        path = Path(tempfile.mkdtemp(dir=scratch))
        writer = prepare_cache(path / "c", layout, manifest, existing=Existing("new"), backend="zarr", threads=threads)
        step = writer.shard_samples
        for lo in range(0, n, step):
            writer.write(lo, {"labels": labels[lo:lo + step], "target": tiled[lo:lo + step]})
        writer.finish()
        shutil.rmtree(path)
        return float(tiled.nbytes + labels.nbytes)

    return Measurement(name, "MB/s", run)


def run_bench(*, teacher: str, student: str, data: str, out: str | Path, weights: str | None = None,
              layer: str = "layer3", views: int = 2, batch_size: int = 512, steps: int = 50, warmup: int = 5,
              rounds: int = 3, workers: int = 8, device: str = "cpu", seed: int = 0,
              data_path: str = "auto") -> dict[str, Any]:
    """Measure (a)-(e) and the writer in `rounds` interleaved rounds; write `out/bench.json`; return the table."""
    dev, out = torch.device(device), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = load_source(data, "train")
    classes = len(source.classes)
    augment = Augment("cifar", image_size=resolve_image_size("cifar", None, source))
    torch.manual_seed(seed)
    teacher_model = build_model(teacher, classes)
    if weights:
        load_weights(teacher_model, weights)
    measurements: list[Measurement] = []

    # (b) the dumps; their caches feed the student rows
    caches = {}
    for name, layers in ((f"dump: logits + {layer}", [layer]), ("dump: logits only", [])):
        path = out / ("cache_feat" if layers else "cache_logits")

        def dump(path=path, layers=layers) -> float:
            dump_teacher(teacher_model, source, path, augment=augment, views=views, layers=layers, seed=seed,
                         batch_size=batch_size, workers=workers, device=device, overwrite=True)
            return float(len(source) * views)

        dump()  # the first dump is the warm-up, and makes the cache the student rows read
        measurements.append(Measurement(name, "images/s", dump, ref="teacher inference only"))
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
    first_views = next(stream)[0]

    # (a) teacher inference on device-resident batches (the data path excluded)
    tapped_teacher = prepare_model(Tapped(teacher_model, [layer]), dev).eval()
    fixed = model_inputs(first_views.to(dev), source.mean, source.std, dev)

    @torch.no_grad()
    def infer() -> float:
        with autocast(dev):
            tapped_teacher(fixed)
        return float(len(fixed))

    for _ in range(warmup):
        infer()
    measurements.insert(0, Measurement("teacher inference only", "images/s", infer, repeat=steps))

    # (w) the writer, host only, on the bench teacher's own outputs
    logits, features = teacher_outputs(tapped_teacher, first_views, mean=source.mean, std=source.std, device=dev)
    outputs = {"logits": logits.cpu().numpy(), f"features {layer}": features[layer].cpu().numpy(),
               f"attention {layer}": attention_map(features[layer]).view(len(logits), *features[layer].shape[2:]).half().cpu().numpy()}
    scratch = Path(tempfile.mkdtemp(dir=out, prefix="writer-"))
    cores = usable_cores()
    for kind, per_view in outputs.items():
        for threads in sorted({1, cores}):
            label = "1 thread" if threads == 1 else f"{threads} threads"
            measurements.append(writer_measurement(f"writer: {kind}, {label}", per_view, views, threads, scratch,
                                                   len(source)))

    # (c)-(e) student training steps
    def student_measurement(name: str, terms: list[str], targets_kind: str) -> Measurement:
        torch.manual_seed(seed)
        model = build_model(student, classes)
        pairs = {layer: layer} if {"at", "fitnets"} & set(terms) else {}
        tapped = prepare_model(Tapped(model, list(pairs)), dev)
        weights_ = resolve_weights(terms, alpha=0.9, beta=1000.0, hint_weight=100.0)
        criterion = build_criterion(tapped, reader, weights=weights_, temperature=4.0, pairs=pairs,
                                    image_size=augment.image_size, device=dev)
        path = "stream" if targets_kind == "stream" else data_path
        batches, targets, _ = student_batches(path, sorted(set(pairs.values())), online=targets_kind == "online")
        step_loss = DistillStep(tapped, criterion, targets, mean=source.mean, std=source.std, device=dev)
        opt = torch.optim.SGD(list(tapped.parameters()) + list(criterion.parameters()), lr=0.05, momentum=0.9)
        tapped.train()

        def one_step() -> float:
            loss_terms, logits, _ = step_loss(next(batches))
            opt.zero_grad(set_to_none=True)
            loss_terms["loss"].backward()
            opt.step()
            return float(len(logits))

        for _ in range(warmup):
            one_step()
        ref = None if name == "student CE only" else "student CE only"
        return Measurement(name, "images/s", one_step, ref=ref, repeat=steps)

    for name, terms, kind in (("student CE only", ["ce"], "cache"),
                              ("student KD (cache)", ["kd"], "cache"),
                              ("student KD+AT (cache)", ["kd", "at"], "cache"),
                              ("student KD+FitNets (cache)", ["kd", "fitnets"], "cache"),
                              ("student KD+AT (cache, streamed)", ["kd", "at"], "stream"),
                              ("student KD (online teacher)", ["kd"], "online"),
                              ("student KD+AT (online teacher)", ["kd", "at"], "online")):
        measurements.append(student_measurement(name, terms, kind))

    per_round: dict[str, list[float]] = {m.name: [] for m in measurements}
    for r in range(rounds):
        for m in measurements:
            per_round[m.name].append(timed_rate(m, dev))
        log.info("bench round %d of %d done", r + 1, rounds)
    shutil.rmtree(scratch, ignore_errors=True)
    rows = summarise(per_round, {m.name: m.ref for m in measurements})
    for row, m in zip(rows, measurements):
        row["unit"] = m.unit
    warnings = [f"{row['name']}: rounds spread {row['spread']:.0%} (> {SPREAD_WARN:.0%}); the machine was busy, "
                "rerun with more --rounds or on a quiet machine" for row in rows if row["spread"] > SPREAD_WARN]
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"device": device_name, "cores": cores, "teacher": teacher, "student": student, "data": data,
              "views": views, "batch_size": batch_size, "steps": steps, "rounds": rounds, "data_path": chosen_path,
              "rows": rows, "warnings": warnings}
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_bench(result: dict[str, Any]) -> str:
    lines = [f"{result['teacher']} -> {result['student']} on {result['data']} ({result['device']}, {result['cores']} "
             f"cores, batch {result['batch_size']}, {result['views']} views, {result['data_path']}; median of "
             f"{result['rounds']} interleaved rounds)",
             f"{'measurement':<40} {'median':>12} {'unit':<9} {'spread':>7} {'ratio':>8}  to"]
    for row in result["rows"]:
        ratio = f"{row['ratio']:>7.2f}x  {row['ratio_to']}" if "ratio" in row else ""
        lines.append(f"{row['name']:<40} {row['median']:>12,.1f} {row['unit']:<9} {row['spread']:>6.0%} {ratio}")
    lines += [f"WARNING {w}" for w in result["warnings"]]
    return "\n".join(lines)
