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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softcache.batches import OnlineTargets, Targets, student_data
from softcache.data import Source, load_source
from softcache.device import autocast, model_inputs, prepare_model, teacher_outputs
from softcache.dump import dump_teacher, resolve_image_size, usable_cores
from softcache.losses import attention_map, resolve_weights
from softcache.models import Tapped, build_model, check_classes, input_norm, load_weights
from softcache.store import Existing, array_layout, open_cache, prepare_cache
from softcache.store.base import CacheReader, plan_shards
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
    """Wait for `device`'s queued work, so a timing covers it (CUDA runs asynchronously)."""
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


@dataclass(frozen=True)
class BenchSetup:
    """What every row shares: the training split, its views, the teacher and the run's settings."""

    source: Source
    augment: Augment
    teacher: nn.Module
    student: str                       # student model name
    layer: str                         # the feature layer of the dump, the writer and the AT/FitNets rows
    views: int
    batch_size: int
    steps: int                         # timed units per measurement and round
    warmup: int
    workers: int
    device: str                        # as given: dump_teacher takes the name
    dev: torch.device
    seed: int
    data_path: str                     # the student rows' --data-path

    @property
    def classes(self) -> int:
        return len(self.source.classes)


def build_setup(*, teacher: str, weights: str | None, data: str, seed: int, views_options: Any = None,
                **settings: Any) -> BenchSetup:
    """The training split of `data`, its views (plain cifar crops unless `views_options`) at its image size, and
    the teacher (seeded, random weights unless `weights`); `settings` are BenchSetup's remaining fields."""
    source = load_source(data, "train")
    policy = views_options.augment if views_options is not None else "cifar"
    size = resolve_image_size(policy, getattr(views_options, "image_size", None), source, teacher)
    augment = (Augment.from_options(views_options, size) if views_options is not None
               else Augment("cifar", image_size=size))
    torch.manual_seed(seed)
    teacher_model = build_model(teacher, len(source.classes), weights_follow=bool(weights))
    if weights:
        load_weights(teacher_model, weights)
    check_classes(teacher_model, teacher, len(source.classes), size)  # a size the model cannot take: one line
    check_classes(build_model(settings["student"], len(source.classes)), settings["student"], len(source.classes),
                  size)
    return BenchSetup(source=source, augment=augment, teacher=teacher_model, seed=seed, **settings)


def dump_measurements(b: BenchSetup, out: Path) -> tuple[list[Measurement], CacheReader]:
    """(b): dump-teacher with logits + `b.layer` and with logits only, into `out/cache_feat` and
    `out/cache_logits`; also the reader of the first, which the student rows read."""
    measurements, caches = [], {}
    for name, layers in ((f"dump: logits + {b.layer}", [b.layer]), ("dump: logits only", [])):
        path = out / ("cache_feat" if layers else "cache_logits")

        def dump(path=path, layers=layers) -> float:
            dump_teacher(b.teacher, b.source, path, augment=b.augment, views=b.views, layers=layers, seed=b.seed,
                         batch_size=b.batch_size, workers=b.workers, device=b.device, overwrite=True)
            return float(len(b.source) * b.views)

        dump()  # the first dump is the warm-up, and makes the cache the student rows read
        measurements.append(Measurement(name, "images/s", dump, ref="teacher inference only"))
        caches[bool(layers)] = open_cache(path)
    return measurements, caches[True]


def student_batches(b: BenchSetup, reader: CacheReader, path: str, layers: list[str],
                    online: bool = False) -> tuple[Iterator[Any], Targets, str]:
    """Endless batches and their targets as train-student builds them (online: the teacher computes the
    targets), and the data path chosen (softcache.planner decides it, inside student_data)."""
    targets = None
    if online:
        mean, std = input_norm(b.teacher, b.source)
        targets = OnlineTargets(b.teacher, layers, mean=mean, std=std, device=b.dev)
    batches, targets, chosen = student_data(reader, b.source, teacher_layers=layers, temperature=4.0,
                                            teachers="mean", image_size=b.augment.image_size,
                                            batch_size=b.batch_size, seed=b.seed, workers=b.workers, device=b.dev,
                                            data_path=path, targets=targets)
    return _cycle(batches), targets, chosen


def inference_measurement(b: BenchSetup, views: torch.Tensor) -> tuple[Measurement, nn.Module]:
    """(a): the teacher's forward pass on one device-resident batch of uint8 `views [B, 3, S, S]` (the data
    path excluded), warmed up; also the teacher tapped at `b.layer`, on the device."""
    tapped_teacher = prepare_model(Tapped(b.teacher, [b.layer]), b.dev).eval()
    fixed = model_inputs(views.to(b.dev), *input_norm(b.teacher, b.source), b.dev)

    @torch.no_grad()
    def infer() -> float:
        with autocast(b.dev):
            tapped_teacher(fixed)
        return float(len(fixed))

    for _ in range(b.warmup):
        infer()
    return Measurement("teacher inference only", "images/s", infer, repeat=b.steps), tapped_teacher


def writer_measurements(b: BenchSetup, tapped_teacher: nn.Module, views: torch.Tensor, scratch: Path,
                        cores: int) -> list[Measurement]:
    """(w): the writer, host only, on the bench teacher's own outputs for uint8 `views [B, 3, S, S]` (logits,
    `b.layer`'s features and their attention maps), with one thread and with `cores`; caches go in `scratch`."""
    mean, std = input_norm(b.teacher, b.source)
    logits, features = teacher_outputs(tapped_teacher, views, mean=mean, std=std, device=b.dev)
    feature = features[b.layer]
    attention = attention_map(feature).view(len(logits), *feature.shape[2:]).half()
    outputs = {"logits": logits.cpu().numpy(), f"features {b.layer}": feature.cpu().numpy(),
               f"attention {b.layer}": attention.cpu().numpy()}
    measurements = []
    for kind, per_view in outputs.items():
        for threads in sorted({1, cores}):
            label = "1 thread" if threads == 1 else f"{threads} threads"
            measurements.append(writer_measurement(f"writer: {kind}, {label}", per_view, b.views, threads, scratch,
                                                   len(b.source)))
    return measurements


# (c)-(e): name, loss terms, where the targets come from (cache: --data-path; stream; online: the teacher)
STUDENT_ROWS = (("student CE only", ["ce"], "cache"),
                ("student KD (cache)", ["kd"], "cache"),
                ("student KD+AT (cache)", ["kd", "at"], "cache"),
                ("student KD+FitNets (cache)", ["kd", "fitnets"], "cache"),
                ("student KD+AT (cache, streamed)", ["kd", "at"], "stream"),
                ("student KD (online teacher)", ["kd"], "online"),
                ("student KD+AT (online teacher)", ["kd", "at"], "online"))


def student_measurement(b: BenchSetup, reader: CacheReader, name: str, terms: list[str],
                        targets_kind: str) -> Measurement:
    """(c)-(e): SGD steps of a fresh student (seeded) on `terms`, targets as `targets_kind` says; warmed up.
    Every row but CE itself reports its ratio to student CE."""
    torch.manual_seed(b.seed)
    model = build_model(b.student, b.classes)
    pairs = {b.layer: b.layer} if {"at", "fitnets"} & set(terms) else {}
    tapped = prepare_model(Tapped(model, list(pairs)), b.dev)
    weights = resolve_weights(terms, alpha=0.9, beta=1000.0, hint_weight=100.0)
    criterion = build_criterion(tapped, reader, weights=weights, temperature=4.0, pairs=pairs,
                                image_size=b.augment.image_size, device=b.dev)
    path = "stream" if targets_kind == "stream" else b.data_path
    batches, targets, _ = student_batches(b, reader, path, sorted(set(pairs.values())),
                                          online=targets_kind == "online")
    mean, std = input_norm(model, b.source)
    step_loss = DistillStep(tapped, criterion, targets, mean=mean, std=std, device=b.dev)
    opt = torch.optim.SGD(list(tapped.parameters()) + list(criterion.parameters()), lr=0.05, momentum=0.9)
    tapped.train()

    def one_step() -> float:
        loss_terms, logits, _ = step_loss(next(batches))
        opt.zero_grad(set_to_none=True)
        loss_terms["loss"].backward()
        opt.step()
        return float(len(logits))

    for _ in range(b.warmup):
        one_step()
    ref = None if name == "student CE only" else "student CE only"
    return Measurement(name, "images/s", one_step, ref=ref, repeat=b.steps)


def interleaved_rounds(measurements: list[Measurement], rounds: int, dev: torch.device) -> dict[str, list[float]]:
    """Every row's rate in each of `rounds` rounds, each round timing every row once, in order (so load that
    comes and goes falls on all rows of a round alike)."""
    per_round: dict[str, list[float]] = {m.name: [] for m in measurements}
    for r in range(rounds):
        for m in measurements:
            per_round[m.name].append(timed_rate(m, dev))
        log.info("bench round %d of %d done", r + 1, rounds)
    return per_round


def rows_and_warnings(measurements: list[Measurement], per_round: dict[str, list[float]]) -> dict[str, Any]:
    """bench.json's `rows` (summarise, with each row's unit) and `warnings` (rows spread past SPREAD_WARN)."""
    rows = summarise(per_round, {m.name: m.ref for m in measurements})
    for row, m in zip(rows, measurements):
        row["unit"] = m.unit
    warnings = [f"{row['name']}: rounds spread {row['spread']:.0%} (> {SPREAD_WARN:.0%}); the machine was busy, "
                "rerun with more --rounds or on a quiet machine" for row in rows if row["spread"] > SPREAD_WARN]
    return {"rows": rows, "warnings": warnings}


def run_bench(*, teacher: str, student: str, data: str, out: str | Path, weights: str | None = None,
              layer: str = "layer3", views: int = 2, batch_size: int = 512, steps: int = 50, warmup: int = 5,
              rounds: int = 3, workers: int = 8, device: str = "cpu", seed: int = 0,
              data_path: str = "auto", views_options: Any = None) -> dict[str, Any]:
    """Measure (a)-(e) and the writer in `rounds` interleaved rounds; write `out/bench.json`; return the table.
    `views_options` (an object with `augment` and `config.ViewOptions`' fields) gives the dumped views' policy,
    pixel work and mixing (default: plain `cifar` crops)."""
    dev, out = torch.device(device), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b = build_setup(teacher=teacher, weights=weights, data=data, seed=seed, device=device, dev=dev, student=student,
                    views_options=views_options,
                    layer=layer, views=views, batch_size=batch_size, steps=steps, warmup=warmup, workers=workers,
                    data_path=data_path)
    dumps, reader = dump_measurements(b, out)
    stream, _, chosen_path = student_batches(b, reader, data_path, [])
    first_views = next(stream)[0]
    infer, tapped_teacher = inference_measurement(b, first_views)
    scratch = Path(tempfile.mkdtemp(dir=out, prefix="writer-"))
    cores = usable_cores()
    writers = writer_measurements(b, tapped_teacher, first_views, scratch, cores)
    students = [student_measurement(b, reader, *row) for row in STUDENT_ROWS]
    measurements = [infer, *dumps, *writers, *students]
    per_round = interleaved_rounds(measurements, rounds, dev)
    shutil.rmtree(scratch, ignore_errors=True)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"device": device_name, "cores": cores, "teacher": teacher, "student": student, "data": data,
              "augment": b.augment.describe(), "views": views, "batch_size": batch_size, "steps": steps,
              "rounds": rounds, "data_path": chosen_path,
              **rows_and_warnings(measurements, per_round)}
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_bench(result: dict[str, Any]) -> str:
    """The table `softcache bench` prints: a header, one line per row, a WARNING line per warning."""
    lines = [f"{result['teacher']} -> {result['student']} on {result['data']} ({result['device']}, {result['cores']} "
             f"cores, batch {result['batch_size']}, {result['views']} views of {result.get('augment', 'cifar')}, "
             f"{result['data_path']}; median of "
             f"{result['rounds']} interleaved rounds)",
             f"{'measurement':<40} {'median':>12} {'unit':<9} {'spread':>7} {'ratio':>8}  to"]
    for row in result["rows"]:
        ratio = f"{row['ratio']:>7.2f}x  {row['ratio_to']}" if "ratio" in row else ""
        lines.append(f"{row['name']:<40} {row['median']:>12,.1f} {row['unit']:<9} {row['spread']:>6.0%} {ratio}")
    lines += [f"WARNING {w}" for w in result["warnings"]]
    return "\n".join(lines)
