"""`softcache verify`: is a cache complete, intact, and (given the teacher) what the teacher computes?"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch

from softcache.data import check_data_matches, load_source, recorded_source
from softcache.device import teacher_outputs
from softcache.errors import SoftcacheError
from softcache.dump import state_dict_sha256
from softcache.models import Tapped, build_model, file_sha256, load_weights
from softcache.store import feature_name, logits_prefix, open_cache, stream_names, teacher_norm
from softcache.targets import LogitsFormat, feature_target
from softcache.views import ReplayViews


@dataclass
class VerifyReport:
    path: Path
    arrays: int = 0
    chunks: int = 0
    damaged: list[str] = field(default_factory=list)      # "array 'x' samples lo-hi"
    max_error: dict[str, float] = field(default_factory=dict)  # array -> largest |recomputed - cached|
    samples_checked: int = 0


def check_chunks(path: str | Path) -> VerifyReport:
    """Check the cache against the shard record written at commit (every shard present, its size and crc32c,
    every array, the manifest), then read every chunk of every array; problems are collected, not raised."""
    reader = open_cache(path, check=False)
    report = VerifyReport(Path(path))
    report.damaged += reader.problems(checksums=True)
    for name in reader.names():
        report.arrays += 1
        for lo, hi in reader.chunk_ranges(name):
            report.chunks += 1
            try:
                reader.read(name, lo, hi)
            except SoftcacheError:
                report.damaged.append(f"array '{name}' samples {lo}-{hi}: a chunk fails its checksum")
    return report


def recompute(report: VerifyReport, *, teacher: str, weights: str | None, samples: int = 16, seed: int = 0,
              device: str = "cpu", data: str | None = None, download: bool = False) -> VerifyReport:
    """Run the (first) teacher on `samples` random stored (sample, view) pairs of every view stream; record the
    largest error per array."""
    reader = open_cache(report.path)
    manifest = reader.manifest
    first = manifest["teachers"][0]
    if teacher != first["arch"]:
        raise SoftcacheError(f"--teacher {teacher} is not the cache's first teacher ({first['arch']})")
    if weights is None:  # a pretrained=true teacher: its published weights, hashed as the dump hashed them
        model = build_model(teacher, num_classes=len(manifest["dataset"]["classes"]))
        if state_dict_sha256(model) != first["weights_sha256"]:
            raise SoftcacheError(f"the published weights of {teacher} are not those this cache was dumped with "
                                 "(sha256 differs: the zoo changed them?)")
    elif file_sha256(weights) != first["weights_sha256"]:
        raise SoftcacheError(f"--weights '{weights}' are not the weights this cache was dumped with (sha256 differs)")
    source = (load_source(data, "train", download=download) if data
              else recorded_source(manifest["dataset"], "train", download=download))
    check_data_matches(reader, source)
    if weights is not None:
        model = load_weights(build_model(teacher, num_classes=len(source.classes), weights_follow=True), weights)
    dev = torch.device(device)
    tapped = Tapped(model, manifest["layers"]).to(dev).eval()
    mean, std = teacher_norm(manifest, 0)
    rng = np.random.default_rng(seed)
    n, v = reader.shape("views/flip")
    index, view = rng.integers(0, n, samples), rng.integers(0, v, samples)
    for stream in stream_names(manifest):  # each view stream's views, and the teacher's outputs on them
        replay = ReplayViews.from_cache(reader, source, stream=stream)
        batch = torch.stack([replay[(int(i), int(k))][0] for i, k in zip(index, view)])
        logits, features = teacher_outputs(tapped, batch, mean=mean, std=std, device=dev)
        fmt = LogitsFormat.from_json(manifest["storage"]["logits"])
        prefix = logits_prefix(manifest, first["name"], stream)
        expected = {prefix + suffix: value for suffix, value in fmt.encode(logits).items() if fmt.kind != "sampled"}
        if fmt.kind == "sampled":  # the draw is random: check log p_T at the stored class ids instead
            ids = np.stack([reader.read(prefix + "/sampled_ids", int(i), int(i) + 1)[0, k]
                            for i, k in zip(index, view)])
            log_p = torch.log_softmax(logits.float() / fmt.temperature, dim=1).gather(1, torch.from_numpy(ids).long())
            expected = {prefix + "/sampled_logp": log_p.numpy()}
        for layer, f in features.items():
            expected[feature_name(manifest, layer, stream)] = feature_target(manifest["storage"]["targets"],
                                                                             f).cpu().numpy()
        for name, value in expected.items():
            cached = np.stack([reader.read(name, int(i), int(i) + 1)[0, k] for i, k in zip(index, view)])
            report.max_error[name] = float(np.abs(cached.astype(np.float64) - np.asarray(value, np.float64)).max())
    report.samples_checked = samples
    return report


def format_report(report: VerifyReport) -> list[str]:
    lines = [f"{report.path}: complete, {report.arrays} arrays, {report.chunks} chunks read, every shard's "
             "size and crc32c checked against its record"]
    lines += [f"DAMAGED {d}" for d in report.damaged]
    if report.samples_checked:
        lines.append(f"recomputed {report.samples_checked} (sample, view) pairs with the teacher:")
        lines += [f"  {name:<28} max |error| {err:.3g}" for name, err in report.max_error.items()]
    return lines


def verify_cache(path: str | Path, *, teacher: str | None = None, weights: str | None = None, samples: int = 16,
                 seed: int = 0, device: str = "cpu", data: str | None = None) -> tuple[VerifyReport, list[str]]:
    """Check every chunk, then (given the teacher, and no damage) recompute targets;
    returns the report and its lines."""
    report = check_chunks(path)
    if teacher and not report.damaged:
        recompute(report, teacher=teacher, weights=weights, samples=samples, seed=seed, device=device, data=data)
    return report, format_report(report)


def verdict(report: VerifyReport, tolerance: float) -> str | None:
    """The one-line failure, or None if the cache passed."""
    if report.damaged:
        more = f" (and {len(report.damaged) - 1} more)" if len(report.damaged) > 1 else ""
        return f"cache '{report.path}' is damaged: {report.damaged[0]}{more}; re-dump it"
    worst = [(e, n) for n, e in report.max_error.items() if e > tolerance]
    if worst:
        err, name = max(worst)
        return (f"cache '{report.path}': '{name}' differs from the teacher's output by {err:.3g} "
                f"(> --tolerance {tolerance:g})")
    return None
