"""The cache format behind one small interface: `create_cache` to write, `open_cache` to read.

    CACHE/                 zarr v3 group; attrs["softcache"] = manifest (see manifest.py)
    labels                 (N,)            int64
    logits                 (N, V, C)       float16
    views/box              (N, V, 4)       float32   top, left, height, width in source pixels
    views/flip             (N, V)          bool
    features/<layer>       (N, V, C, H, W) float16   one per dumped layer
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from softcache.errors import SoftcacheError
from softcache.store.manifest import FORMAT_VERSION, array_layout, build_manifest
from softcache.store.zarr_store import ZarrReader, ZarrWriter, is_empty_dir, read_manifest

__all__ = ["FORMAT_VERSION", "array_layout", "build_manifest", "check_writable", "create_cache", "open_cache", "read_manifest"]


def create_cache(path: str | Path, layout: dict[str, tuple[tuple[int, ...], str]], manifest: dict[str, Any], *,
                 overwrite: bool = False) -> ZarrWriter:
    """Start writing a cache at `path`, refusing to replace a complete cache unless `overwrite`.

    An incomplete cache (a dump that died) is replaced; a folder that is not a cache is never touched.
    """
    path = Path(path)
    if check_writable(path, overwrite=overwrite):
        shutil.rmtree(path)
    return ZarrWriter(path, layout, manifest)


def check_writable(path: str | Path, *, overwrite: bool) -> bool:
    """Refuse a `path` holding a complete cache (unless `overwrite`) or anything that is not a cache.

    Returns whether an existing cache (incomplete, or complete with `overwrite`) must be removed first.
    """
    path = Path(path)
    if not path.exists():
        return False
    existing = read_manifest(path) if path.is_dir() else None
    if existing is None:
        if is_empty_dir(path):
            return False
        raise SoftcacheError(f"'{path}' exists and is not a softcache cache; choose another --out (nothing was changed)")
    if existing.get("complete") and not overwrite:
        raise SoftcacheError(f"'{path}' already holds a complete cache; pass --overwrite to replace it")
    return True


def open_cache(path: str | Path) -> ZarrReader:
    """A complete cache for reading; refuses a missing, foreign or incomplete one with a message that says which."""
    if not Path(path).exists():
        raise SoftcacheError(f"cache '{path}' does not exist; give the --out folder of a dump-teacher run")
    return ZarrReader(path)
