"""The cache format behind one small interface: `prepare_cache` to write (new, resumed or reused),
`open_cache` to read, `read_manifest` to look. Zarr v3 directories and HDF5 files (`.h5`, `.hdf5`, or
`format="hdf5"`) hold the same hierarchy and manifest:

    CACHE/                 attrs["softcache"] = manifest (see manifest.py)
    labels                 (N,)            int64
    views/box              (N, V, 4)       float32   top, left, height, width in source pixels
    views/flip             (N, V)          bool
    logits                 (N, V, C)       float16   (see targets.py for the other --logits formats)
    features/<layer>       (N, V, C, H, W) float16   or attention/<layer> (N, V, H, W)
    teachers/<name>/logits ...                       with several teachers, instead of logits
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from softcache.errors import SoftcacheError
from softcache.locks import cache_lock_path, holder
from softcache.store import where
from softcache.store.base import CacheReader, ShardWriter, read_markers
from softcache.store.hdf5_store import SUFFIXES, HDF5Reader, HDF5Writer, read_hdf5_manifest
from softcache.store.manifest import (FORMAT_VERSION, array_layout, build_manifest, differences, feature_name,
                                      logits_prefix)
from softcache.store.zarr_store import PROGRESS_DIR, ZarrReader, ZarrWriter, is_empty_dir, read_zarr_manifest

__all__ = ["FORMAT_VERSION", "CacheReader", "Existing", "array_layout", "backend_of", "build_manifest", "check_existing",
           "feature_name", "find_caches", "logits_prefix", "open_cache", "prepare_cache", "read_manifest", "swap_in", "committed_samples",
           "progress_dir"]

from softcache.names import BACKENDS  # noqa: E402  ("zarr", "hdf5")


def local_only(path: str | Path) -> Path:
    """`path` as a Path; a URL is refused: run folders and HDF5 caches live on local or mounted file systems."""
    if where.is_url(path):
        raise SoftcacheError(f"'{path}' is a URL; run folders and HDF5 caches live on local or mounted file systems "
                             "(zarr caches may live in object stores): give a local path")
    return Path(path)


def backend_of(path: str | Path, format: str | None = None) -> str:
    """`format` if given, else hdf5 for a `.h5`/`.hdf5` path, else zarr; a URL is zarr (HDF5 on a URL is refused)."""
    if format is not None and format not in BACKENDS:
        raise SoftcacheError(f"unknown cache format '{format}'; valid: {', '.join(BACKENDS)}")
    hdf5 = format == "hdf5" or (format is None and Path(str(path)).suffix in SUFFIXES)
    if where.is_url(path) and hdf5:
        raise SoftcacheError(f"'{path}': an HDF5 cache is one file written in place, which object stores cannot do; "
                             "give a zarr --out (no .h5 suffix) for an object store, or a local .h5 path")
    return "hdf5" if hdf5 else "zarr"


def progress_dir(path: str | Path, backend: str | None = None) -> where.Location:
    """Where a dump in progress keeps its per-shard commit markers: `CACHE/progress/`, `CACHE.h5.progress/`."""
    path = where.location(path)
    backend = backend or backend_of(path)
    return where.join(path, PROGRESS_DIR) if backend == "zarr" else where.sibling(path, ".progress")


def committed_samples(path: str | Path, backend: str | None = None) -> int:
    """Samples in the shards a dump in progress at `path` has committed so far (0 when none, or complete)."""
    manifest = read_manifest(path) or {}
    markers = read_markers(progress_dir(path, backend), manifest.get("id"))
    return sum(m["samples"][1] - m["samples"][0] for m in markers.values())


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the cache at `path`, or None if `path` holds no readable softcache cache."""
    if where.is_url(path):
        return read_zarr_manifest(where.location(path))
    path = Path(path)
    if path.is_dir():
        return read_zarr_manifest(path)
    if path.is_file():
        return read_hdf5_manifest(path)
    return None


@dataclass(frozen=True)
class Existing:
    """What `prepare_cache` found at the output path."""

    action: str                    # new | reuse | resume | restart | replace
    committed: dict = field(default_factory=dict)  # resume, replace: shard -> marker, committed already


def staging_path(path: str | Path) -> Path:
    """Where `--overwrite` builds the new cache, beside the old one, until it is complete: `CACHE.new`."""
    path = Path(path)
    return path.with_name(path.name + ".new")


def swap_in(new: Path, path: Path) -> None:
    """Put the complete cache `new` in the place of `path` (renames; the old cache is removed last). A file is
    replaced atomically; a folder is moved aside to `CACHE.old` first, and a dump that dies between the two
    renames is finished by the next dump-teacher (`recover_swap`)."""
    new, path = Path(new), Path(path)
    if new.is_file() or not path.exists():
        os.replace(new, path)
        return
    old = path.with_name(path.name + ".old")
    where.remove(old)
    os.rename(path, old)
    os.rename(new, path)
    where.remove(old)


def recover_swap(path: Path) -> None:
    """Finish a swap that a killed dump left half done: the complete new cache goes in, the old one goes."""
    old, new = path.with_name(path.name + ".old"), staging_path(path)
    if not path.exists() and new.exists() and (read_manifest(new) or {}).get("complete"):
        os.rename(new, path)
    if path.exists() and old.exists():
        where.remove(old)


def check_existing(path: str | Path, manifest: dict[str, Any], *, overwrite: bool, backend: str) -> Existing:
    """Decide what a dump does at `path`; refuse what would lose data or mix configurations.

    A complete cache with the same id is reused; an incomplete one with the same id and committed shards is
    resumed; one with another id is refused, naming what differs, unless `overwrite`. Anything at `path`
    that is not a cache is never touched.
    """
    path = where.location(path)
    if not where.is_url(path):
        recover_swap(path)
        if not path.exists() or is_empty_dir(path):
            return Existing("new")
    elif not where.exists(path):
        return Existing("new")
    existing = read_manifest(path)
    if existing is None:
        if where.exists(progress_dir(path, backend)):  # our own dump died before its store became readable
            return Existing("restart")
        raise SoftcacheError(f"'{path}' exists and is not a softcache cache; choose another --out (nothing was changed)")
    if overwrite and where.is_url(path):
        raise SoftcacheError(f"--overwrite builds the new cache beside the old one and renames it in, which object "
                             f"stores cannot do; delete '{path}' first (nothing was changed)")
    if overwrite:  # the new cache is built beside the old one; an interrupted --overwrite dump resumes there
        staged = staging_path(path)
        if (read_manifest(staged) or {}).get("id") == manifest["id"]:
            markers = read_markers(progress_dir(staged, backend), manifest["id"])
            if markers:
                return Existing("replace", markers)
        return Existing("replace")
    if existing.get("format_version") != FORMAT_VERSION:
        raise SoftcacheError(f"'{path}' holds a cache in format {existing.get('format_version')} (this softcache writes "
                             f"format {FORMAT_VERSION}); pass --overwrite to re-dump it, or choose another --out")
    differ = differences(existing.get("identity", {}), manifest["identity"])
    if differ:
        state = "complete" if existing.get("complete") else "incomplete"
        raise SoftcacheError(f"'{path}' holds a {state} cache made with other options ({', '.join(differ)} differ); "
                             "choose another --out, or pass --overwrite to replace it")
    if existing.get("complete"):
        return Existing("reuse")
    markers = read_markers(progress_dir(path, backend), manifest["id"])
    return Existing("resume", markers) if markers else Existing("restart")


def prepare_cache(path: str | Path, layout: dict[str, tuple[tuple[int, ...], str]], manifest: dict[str, Any], *,
                  existing: Existing, backend: str, threads: int = 1, create: bool = True) -> ShardWriter:
    """A writer for a new cache, or for the rest of an interrupted one (`existing.committed` shards found),
    that compresses and writes up to `threads` shards at once. `create=False`: open the store another process
    of the same dump prepared (torchrun ranks other than 0)."""
    path = where.location(path)
    writer_cls = ZarrWriter if backend == "zarr" else HDF5Writer
    if existing.action == "replace":  # built beside, swapped in by the dump when complete (`swap_in`)
        path = staging_path(path)
    if existing.committed or not create:
        try:
            return writer_cls(path, layout, manifest, committed=existing.committed, threads=threads, create=False)
        except (OSError, KeyError, ValueError):  # the interrupted dump left the store unreadable: start over
            if not create:
                raise
    where.remove(path)
    where.remove(progress_dir(path, backend))
    if not where.is_url(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    return writer_cls(path, layout, manifest, threads=threads)


def open_cache(path: str | Path, *, check: bool = True) -> CacheReader:
    """A complete cache for reading; refuses a missing, foreign or incomplete one with a message that says which,
    and (`check`) one with a shard, an array or the manifest missing or changed since the dump committed it."""
    path = where.location(path)
    if not where.exists(path):
        raise SoftcacheError(f"cache '{path}' does not exist; give the --out of a dump-teacher run")
    manifest = read_manifest(path)
    if manifest is None:
        raise SoftcacheError(f"'{path}' is not a softcache cache (no softcache manifest); give the --out of a dump-teacher run")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SoftcacheError(f"cache '{path}' is in format {manifest.get('format_version')}, this softcache reads format "
                             f"{FORMAT_VERSION} (format 4 records every shard's size and checksum); re-dump it: rerun "
                             "its dump-teacher command with --overwrite")
    if not manifest.get("complete"):
        pid = None if where.is_url(path) else holder(cache_lock_path(path))
        if pid is not None:
            raise SoftcacheError(f"cache '{path}' is incomplete: a dump is writing it now (pid {pid}); "
                                 "wait for it to finish")
        raise SoftcacheError(f"cache '{path}' is incomplete: its dump died; rerun its dump-teacher command to "
                             "resume it")
    reader = ZarrReader(path, manifest) if where.is_url(path) or path.is_dir() else HDF5Reader(path, manifest)
    return reader.check() if check else reader


def find_caches(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every cache under `root` (zarr folders and HDF5 files), complete or not, with its manifest."""
    root = where.location(root)
    if read_manifest(root) is not None:
        yield root, read_manifest(root)
        return
    if where.is_url(root):  # zarr caches only: HDF5 files do not live in object stores
        for entry in where.subfolders(root):
            yield from find_caches(entry)
        return
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.is_dir():
            yield from find_caches(entry)
        elif entry.suffix in SUFFIXES and (manifest := read_manifest(entry)) is not None:
            yield entry, manifest
