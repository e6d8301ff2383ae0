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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from softcache.errors import SoftcacheError
from softcache.locks import cache_lock_path, holder
from softcache.store.base import CacheReader, ShardWriter, read_progress
from softcache.store.hdf5_store import SUFFIXES, HDF5Reader, HDF5Writer, read_hdf5_manifest
from softcache.store.manifest import (FORMAT_VERSION, array_layout, build_manifest, differences, feature_name,
                                      logits_prefix)
from softcache.store.zarr_store import PROGRESS_FILE, ZarrReader, ZarrWriter, is_empty_dir, read_zarr_manifest

__all__ = ["FORMAT_VERSION", "CacheReader", "Existing", "array_layout", "backend_of", "build_manifest", "check_existing",
           "feature_name", "find_caches", "logits_prefix", "open_cache", "prepare_cache", "read_manifest", "swap_in"]

BACKENDS = ("zarr", "hdf5")


def backend_of(path: str | Path, format: str | None = None) -> str:
    """`format` if given, else hdf5 for a `.h5`/`.hdf5` path, else zarr."""
    if format is not None:
        if format not in BACKENDS:
            raise SoftcacheError(f"unknown cache format '{format}'; valid: {', '.join(BACKENDS)}")
        return format
    return "hdf5" if Path(path).suffix in SUFFIXES else "zarr"


def _progress_path(path: Path, backend: str) -> Path:
    return path / PROGRESS_FILE if backend == "zarr" else path.with_name(path.name + ".progress.json")


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the cache at `path`, or None if `path` holds no readable softcache cache."""
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
    committed: int = 0             # resume, replace: samples already committed (replace: in the staging cache)


def staging_path(path: str | Path) -> Path:
    """Where `--overwrite` builds the new cache, beside the old one, until it is complete: `CACHE.new`."""
    path = Path(path)
    return path.with_name(path.name + ".new")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def swap_in(new: Path, path: Path) -> None:
    """Put the complete cache `new` in the place of `path` (renames; the old cache is removed last). A file is
    replaced atomically; a folder is moved aside to `CACHE.old` first, and a dump that dies between the two
    renames is finished by the next dump-teacher (`recover_swap`)."""
    new, path = Path(new), Path(path)
    if new.is_file() or not path.exists():
        os.replace(new, path)
        return
    old = path.with_name(path.name + ".old")
    _remove(old)
    os.rename(path, old)
    os.rename(new, path)
    _remove(old)


def recover_swap(path: Path) -> None:
    """Finish a swap that a killed dump left half done: the complete new cache goes in, the old one goes."""
    old, new = path.with_name(path.name + ".old"), staging_path(path)
    if not path.exists() and new.exists() and (read_manifest(new) or {}).get("complete"):
        os.rename(new, path)
    if path.exists() and old.exists():
        _remove(old)


def check_existing(path: str | Path, manifest: dict[str, Any], *, overwrite: bool, backend: str) -> Existing:
    """Decide what a dump does at `path`; refuse what would lose data or mix configurations.

    A complete cache with the same id is reused; an incomplete one with the same id and committed shards is
    resumed; one with another id is refused, naming what differs, unless `overwrite`. Anything at `path`
    that is not a cache is never touched.
    """
    path = Path(path)
    recover_swap(path)
    if not path.exists() or is_empty_dir(path):
        return Existing("new")
    existing = read_manifest(path)
    progress = read_progress(_progress_path(path, backend))
    if existing is None:
        if progress is not None:  # our own dump died before its file became readable
            return Existing("restart")
        raise SoftcacheError(f"'{path}' exists and is not a softcache cache; choose another --out (nothing was changed)")
    if overwrite:  # the new cache is built beside the old one; an interrupted --overwrite dump resumes there
        staged = read_progress(_progress_path(staging_path(path), backend))
        if (staged and staged.get("id") == manifest["id"] and staged.get("committed_samples", 0) > 0
                and (read_manifest(staging_path(path)) or {}).get("id") == manifest["id"]):
            return Existing("replace", int(staged["committed_samples"]))
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
    if progress and progress.get("id") == manifest["id"] and progress.get("committed_samples", 0) > 0:
        return Existing("resume", int(progress["committed_samples"]))
    return Existing("restart")


def prepare_cache(path: str | Path, layout: dict[str, tuple[tuple[int, ...], str]], manifest: dict[str, Any], *,
                  existing: Existing, backend: str, threads: int = 1) -> ShardWriter:
    """A writer for a new cache, or for the rest of an interrupted one (`existing.action == 'resume'`), that
    compresses and writes up to `threads` shards at once."""
    path = Path(path)
    writer_cls = ZarrWriter if backend == "zarr" else HDF5Writer
    if existing.action == "replace":  # built beside, swapped in by the dump when complete (`swap_in`)
        path = staging_path(path)
    if existing.committed:
        try:
            return writer_cls(path, layout, manifest, resume_from=existing.committed, threads=threads)
        except (OSError, KeyError, ValueError):  # the interrupted dump left the store unreadable: start over
            pass
    _remove(path)
    _progress_path(path, backend).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return writer_cls(path, layout, manifest, threads=threads)


def open_cache(path: str | Path, *, check: bool = True) -> CacheReader:
    """A complete cache for reading; refuses a missing, foreign or incomplete one with a message that says which,
    and (`check`) one with a shard, an array or the manifest missing or changed since the dump committed it."""
    path = Path(path)
    if not path.exists():
        raise SoftcacheError(f"cache '{path}' does not exist; give the --out of a dump-teacher run")
    manifest = read_manifest(path)
    if manifest is None:
        raise SoftcacheError(f"'{path}' is not a softcache cache (no softcache manifest); give the --out of a dump-teacher run")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SoftcacheError(f"cache '{path}' is in format {manifest.get('format_version')}, this softcache reads format "
                             f"{FORMAT_VERSION} (format 4 records every shard's size and checksum); re-dump it: rerun "
                             "its dump-teacher command with --overwrite")
    if not manifest.get("complete"):
        pid = holder(cache_lock_path(path))
        if pid is not None:
            raise SoftcacheError(f"cache '{path}' is incomplete: a dump is writing it now (pid {pid}); "
                                 "wait for it to finish")
        raise SoftcacheError(f"cache '{path}' is incomplete: its dump died; rerun its dump-teacher command to "
                             "resume it")
    reader = ZarrReader(path, manifest) if path.is_dir() else HDF5Reader(path, manifest)
    return reader.check() if check else reader


def find_caches(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every cache under `root` (zarr folders and HDF5 files), complete or not, with its manifest."""
    root = Path(root)
    if read_manifest(root) is not None:
        yield root, read_manifest(root)
        return
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.is_dir():
            yield from find_caches(entry)
        elif entry.suffix in SUFFIXES and (manifest := read_manifest(entry)) is not None:
            yield entry, manifest
