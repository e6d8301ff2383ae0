"""The cache manifest: what made a cache, and whether it is complete.

Stored as `attrs["softcache"]` of the cache's root group. Written with `complete: false` when a dump starts
and rewritten with `complete: true` as the dump's very last write, so a reader never mistakes a dump in
progress (or one that died) for a finished cache.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Sequence

from softcache import __version__

FORMAT_VERSION = 1


def array_layout(num_samples: int, num_views: int, num_classes: int,
                 features: dict[str, Sequence[int]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every array of a cache: name -> (shape, dtype). `features` maps layer -> per-view shape `(C, H, W)`."""
    n, v = num_samples, num_views
    layout = {
        "labels": ((n,), "int64"),
        "logits": ((n, v, num_classes), "float16"),
        "views/box": ((n, v, 4), "float32"),
        "views/flip": ((n, v), "bool"),
    }
    for layer, shape in features.items():
        layout[f"features/{layer}"] = ((n, v, *shape), "float16")
    return layout


def build_manifest(*, teacher: dict[str, Any], dataset: dict[str, Any], augment: dict[str, Any],
                   layers: Sequence[str]) -> dict[str, Any]:
    """A manifest marked incomplete; the dump marks it complete when everything is written."""
    return {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "teacher": teacher,
        "dataset": dataset,
        "augment": augment,
        "layers": list(layers),
        "softcache_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
