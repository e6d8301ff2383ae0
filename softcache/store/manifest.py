"""The cache manifest: what made a cache, its id, and whether it is complete.

Stored as `attrs["softcache"]` of the cache's root group (zarr) or root attribute (hdf5). Written with
`complete: false` when a dump starts and rewritten with `complete: true` as the dump's very last write, so a
reader never mistakes a dump in progress (or one that died) for a finished cache.

The cache id is a hash of everything that determines the stored numbers: the teachers (arch and weights
hash), the dataset fingerprint, the augmentation spec, the layers and the storage options. Two dumps with the
same id hold the same targets, so a second one is not run.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
from typing import Any
from collections.abc import Sequence

from softcache import __version__
from softcache.errors import SoftcacheError

FORMAT_VERSION = 4


def array_layout(num_samples: int, num_views: int,
                 targets: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every array of a cache: name -> (shape, dtype). `targets` gives each target array's per-view shape and dtype."""
    n, v = num_samples, num_views
    layout = {"labels": ((n,), "int64"), "views/box": ((n, v, 4), "float32"), "views/flip": ((n, v), "bool")}
    layout.update({name: ((n, v, *shape), dtype) for name, (shape, dtype) in targets.items()})
    return layout


def cache_id(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two identities differ, e.g. ['augment.views', 'teachers']."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def build_manifest(*, teachers: Sequence[dict[str, Any]], dataset: dict[str, Any], augment: dict[str, Any],
                   layers: Sequence[str], storage: dict[str, Any],
                   streams: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A manifest marked incomplete, with its id; the dump marks it complete when everything is written."""
    identity = {
        "teachers": [{"name": t["name"], "arch": t["arch"], "weights_sha256": t["weights_sha256"],
                      **({"input": t["input"]} if t.get("input") else {})} for t in teachers],
        "dataset": dataset["fingerprint"],
        "augment": {k: augment[k] for k in ("policy", "views", "seed", "image_size", "pad", "scale", "ratio", "mean",
                                            "std", "pixels", "mix", "pixel_identity") if k in augment},
        "layers": list(layers),
        "storage": storage,
    }
    if streams:  # only then, so the ids of single-stream caches stay what they were
        identity["streams"] = streams
    return {
        "format_version": FORMAT_VERSION,
        "id": cache_id(identity),
        "complete": False,
        "teacher": dict(teachers[0]),
        "teachers": [dict(t) for t in teachers],
        "dataset": dataset,
        "augment": augment,
        "layers": list(layers),
        "storage": storage,
        **({"streams": streams} if streams else {}),
        "identity": identity,
        "softcache_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


MAIN = "main"  # the name of a cache's first view stream, whose arrays have no prefix


def stream_names(manifest: dict[str, Any]) -> list[str]:
    """The cache's view streams: `main`, then the named ones (`dump-teacher --stream`)."""
    return [MAIN, *manifest.get("streams", {})]


def stream_prefix(manifest: dict[str, Any], stream: str = MAIN) -> str:
    """Where stream `stream`'s views and teacher outputs live: no prefix for `main`, `streams/<name>/` for the
    others (the labels are shared)."""
    if stream not in stream_names(manifest):
        raise SoftcacheError(f"unknown view stream '{stream}'; this cache has: {', '.join(stream_names(manifest))}")
    return "" if stream == MAIN else f"streams/{stream}/"


def stream_augment(manifest: dict[str, Any], stream: str = MAIN) -> dict[str, Any]:
    """The augmentation record of a stream (`manifest["augment"]` for main): a named stream records its policy,
    pixel work and mixing; the view size, seed and view count are the cache's."""
    stream_prefix(manifest, stream)
    return manifest["augment"] if stream == MAIN else {**manifest["augment"], "pixels": {}, "mix": {},
                                                       "pixel_identity": None, **manifest["streams"][stream]}


def describe_augment(augment: dict[str, Any]) -> str:
    """An augmentation record in words, e.g. 'cifar, rand-m9-n2, reprob 0.25, mixup 0.8, cutmix 1'."""
    pixels, mix = augment.get("pixels") or {}, augment.get("mix") or {}
    parts = [augment["policy"], pixels.get("auto_augment"),
             pixels.get("color_jitter") and f"color-jitter {pixels['color_jitter']:g}",
             pixels.get("reprob") and f"reprob {pixels['reprob']:g}", mix.get("mixup") and f"mixup {mix['mixup']:g}",
             mix.get("cutmix") and f"cutmix {mix['cutmix']:g}",
             (mix.get("mixup") or mix.get("cutmix")) and mix.get("prob", 1) != 1 and f"mix-prob {mix['prob']:g}"]
    return ", ".join(p for p in parts if p)


def logits_prefix(manifest: dict[str, Any], teacher: str, stream: str = MAIN) -> str:
    """Where teacher `teacher`'s logits arrays live: `logits` for a single teacher, `teachers/<name>/logits`
    otherwise (under the stream's prefix)."""
    name = "logits" if len(manifest["teachers"]) == 1 else f"teachers/{teacher}/logits"
    return stream_prefix(manifest, stream) + name


def feature_name(manifest: dict[str, Any], layer: str, stream: str = MAIN) -> str:
    """The array holding the first teacher's `layer`: `features/<layer>` or `attention/<layer>` (the embedding,
    a vector, is `features/embedding` under either kind), under the stream's prefix."""
    kind = "attention" if manifest["storage"]["targets"] == "attention" and layer != "embedding" else "features"
    return f"{stream_prefix(manifest, stream)}{kind}/{layer}"


def teacher_norm(manifest: dict[str, Any], index: int = 0) -> tuple[list[float], list[float]]:
    """The `(mean, std)` teacher `index` normalised its views with: its own input conventions (a timm or Hugging
    Face teacher's, recorded as `teachers[k].input`), else the dataset's (`augment.mean`, `augment.std`)."""
    found = manifest["teachers"][index].get("input")
    return (found["mean"], found["std"]) if found else (manifest["augment"]["mean"], manifest["augment"]["std"])


def encode_params(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Teacher parameters stored once per cache (`models.teacher_params`: name -> float32 tensor or array) as the
    manifest's `teacher_params`: shape, dtype and the little-endian bytes in base64. The manifest's hash in the
    integrity record covers them; the cache id does through the teacher's weights hash, its layers and
    `storage.teacher_head`, which determine them."""
    import numpy as np  # here: reading a manifest needs no numpy
    out = {}
    for name, value in params.items():
        array = np.ascontiguousarray(np.asarray(value, dtype="<f4"))
        out[name] = {"shape": list(array.shape), "dtype": "float32",
                     "data": base64.b64encode(array.tobytes()).decode("ascii")}
    return out


def stored_params(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's teacher parameters as float32 arrays, by name (empty for a cache without any)."""
    import numpy as np
    return {name: np.frombuffer(base64.b64decode(entry["data"]), dtype="<f4").reshape(entry["shape"]).copy()
            for name, entry in manifest.get("teacher_params", {}).items()}
