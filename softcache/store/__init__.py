"""The cache format behind one small interface: `prepare_cache` to write (new, resumed or reused),
`open_cache` to read, `read_manifest` to look, `find_caches` / `survey` to list. Each backend (backends.py:
zarr v3 directories, HDF5 files) holds the same hierarchy and manifest:

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
from typing import Any
from collections.abc import Iterator

from softcache.errors import SoftcacheError
from softcache.locks import cache_lock_path, holder
from softcache.store import backends, where
from softcache.store.base import CacheReader, ShardWriter, read_markers
from softcache.store.manifest import (FORMAT_VERSION, MAIN, array_layout, build_manifest, differences, feature_name,
                                      logits_prefix, stream_augment, stream_names, stream_prefix,
                                      teacher_norm)

__all__ = ["BACKENDS", "FORMAT_VERSION", "MAIN", "CacheReader", "Existing", "Found", "array_layout", "backend_of",
           "build_manifest", "check_existing", "committed_samples", "diagnose", "feature_name", "find_caches",
           "logits_prefix", "open_cache", "prepare_cache", "progress_dir", "read_manifest", "stream_augment",
           "stream_names", "stream_prefix", "survey", "swap_in", "teacher_norm", "writing"]

BACKENDS = tuple(backends.BACKENDS)  # the backends' names, in registry order (the registry: backends.BACKENDS)


def local_only(path: str | Path) -> Path:
    """`path` as a Path; a URL is refused: run folders and HDF5 caches live on local or mounted file systems."""
    if where.is_url(path):
        raise SoftcacheError(f"'{path}' is a URL; run folders and HDF5 caches live on local or mounted file systems "
                             "(zarr caches may live in object stores): give a local path")
    return Path(path)


def backend_of(path: str | Path, format: str | None = None) -> str:
    """The backend a dump to `path` writes: `format` if given, else by suffix (hdf5 for `.h5`/`.hdf5`, else
    zarr); refused for a URL when the backend cannot live in an object store."""
    if format is not None and format not in backends.BACKENDS:
        raise SoftcacheError(f"unknown cache format '{format}'; valid: {', '.join(backends.BACKENDS)}")
    name = format or backends.by_suffix(path)
    refusal = backends.BACKENDS[name].url_refusal
    if where.is_url(path) and refusal:
        raise SoftcacheError(f"'{path}': {refusal}")
    return name


def progress_dir(path: str | Path, backend: str | None = None) -> where.Location:
    """Where a dump in progress keeps its per-shard commit markers: `CACHE/progress/`, `CACHE.h5.progress/`."""
    path = where.location(path)
    return backends.BACKENDS[backend or backend_of(path)].progress_dir(path)


def committed_samples(path: str | Path, backend: str | None = None) -> int:
    """Samples in the shards a dump in progress at `path` has committed so far (0 when none, or complete)."""
    manifest = read_manifest(path) or {}
    markers = read_markers(progress_dir(path, backend), manifest.get("id"))
    return sum(m["samples"][1] - m["samples"][0] for m in markers.values())


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the cache at `path`, or None if `path` holds no readable softcache cache."""
    path = where.location(path)
    backend = backends.recognising(path)
    return backend.read_manifest(path) if backend else None


def diagnose(path: str | Path) -> str | None:
    """What is wrong with the cache at `path` when its manifest cannot be read but it is recognisably one of
    ours (an HDF5 file; a zarr folder with our arrays or markers, or with a root zarr.json cut short);
    None for a readable cache and for anything that is not ours."""
    return backends.diagnose(where.location(path))


def writing(path: str | Path) -> str | None:
    """The pid of the dump writing the cache at `path` now, if any (object stores hold no lock: None)."""
    return None if where.is_url(path) else holder(cache_lock_path(path))


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
    resumed; one with another id, or a damaged one (`diagnose`), is refused, naming what differs or what is
    wrong, unless `overwrite`. Anything at `path` that is not a cache is never touched.
    """
    path = where.location(path)
    if not where.is_url(path):
        recover_swap(path)
        if not path.exists() or where.is_empty_dir(path):
            return Existing("new")
    elif not where.exists(path):
        return Existing("new")
    existing = read_manifest(path)
    if existing is None:
        if where.exists(progress_dir(path, backend)):  # our own dump died before its store became readable
            return Existing("restart")
        damage = diagnose(path)
        if damage is None:
            raise SoftcacheError(f"'{path}' exists and is not a softcache cache; choose another --out (nothing was "
                                 "changed)")
        if not overwrite:
            raise SoftcacheError(f"'{path}' holds a damaged cache ({damage}); pass --overwrite to replace it with a "
                                 "new dump, or choose another --out (nothing was changed)")
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
        raise SoftcacheError(f"'{path}' holds a cache in format {existing.get('format_version')} (this softcache "
                             f"writes format {FORMAT_VERSION}); pass --overwrite to re-dump it, or choose another "
                             "--out")
    differ = differences(existing.get("identity", {}), manifest["identity"])
    if differ:
        state = "a complete" if existing.get("complete") else "an incomplete"
        raise SoftcacheError(f"'{path}' holds {state} cache made with other options ({', '.join(differ)} differ); "
                             "choose another --out, or pass --overwrite to replace it")
    if existing.get("complete"):
        found = open_cache(path, check=False).problems()  # the cheap checks: what every reader refuses
        if found:
            raise SoftcacheError(f"'{path}' holds this cache, but it is damaged: {found[0]}; pass --overwrite to "
                                 "dump it again (nothing was changed)")
        return Existing("reuse")
    markers = read_markers(progress_dir(path, backend), manifest["id"])
    return Existing("resume", markers) if markers else Existing("restart")


def prepare_cache(path: str | Path, layout: dict[str, tuple[tuple[int, ...], str]], manifest: dict[str, Any], *,
                  existing: Existing, backend: str, threads: int = 1, create: bool = True) -> ShardWriter:
    """A writer for a new cache, or for the rest of an interrupted one (`existing.committed` shards found),
    that compresses and writes up to `threads` shards at once. `create=False`: open the store another process
    of the same dump prepared (torchrun ranks other than 0)."""
    path = where.location(path)
    writer_cls = backends.BACKENDS[backend].writer
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
    """A complete cache for reading; refuses a missing, foreign, damaged or incomplete one with a message that
    says which, and (`check`) one with a shard, an array or the manifest missing or changed since the dump
    committed it."""
    path = where.location(path)
    if not where.exists(path):
        raise SoftcacheError(f"cache '{path}' does not exist; give the --out of a dump-teacher run")
    backend = backends.recognising(path)
    manifest = backend.read_manifest(path) if backend else None
    if manifest is None:
        damage, pid = diagnose(path), writing(path)
        if damage is None:
            raise SoftcacheError(f"'{path}' is not a softcache cache (no softcache manifest); give the --out of a "
                                 "dump-teacher run")
        if pid is not None:  # an HDF5 file is locked while it is written
            raise SoftcacheError(f"cache '{path}' is incomplete: a dump is writing it now (pid {pid}); "
                                 "wait for it to finish")
        raise SoftcacheError(f"cache '{path}' is damaged: {damage}; re-dump it: rerun its dump-teacher command with "
                             "--overwrite")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SoftcacheError(f"cache '{path}' is in format {manifest.get('format_version')}, this softcache reads "
                             f"format {FORMAT_VERSION} (format 4 records every shard's size and checksum); re-dump it: "
                             "rerun its dump-teacher command with --overwrite")
    if not manifest.get("complete"):
        pid = writing(path)
        if pid is not None:
            raise SoftcacheError(f"cache '{path}' is incomplete: a dump is writing it now (pid {pid}); "
                                 "wait for it to finish")
        raise SoftcacheError(f"cache '{path}' is incomplete: its dump died; rerun its dump-teacher command to "
                             "resume it")
    try:
        reader = backend.reader(path, manifest)
    except (OSError, KeyError, ValueError) as err:  # an array's metadata cut short, a root attribute gone
        raise SoftcacheError(f"cache '{path}' is damaged: its arrays cannot be opened ({type(err).__name__}: {err}); "
                             "re-dump it: rerun its dump-teacher command with --overwrite") from None
    return reader.check() if check else reader


@dataclass(frozen=True)
class Found:
    """A cache `survey` came upon."""

    path: where.Location
    manifest: dict[str, Any] | None  # None: recognisably a cache of ours, its manifest unreadable
    damage: str | None = None        # with no manifest: what is wrong (`diagnose`)


def survey(root: str | Path, *, damaged: bool = True) -> Iterator[Found]:
    """Every cache under `root`, complete or not, in path order: any backend's, each known by its format (an
    HDF5 file by its signature, whatever its name); `damaged`: also those whose manifest cannot be read."""
    root = where.location(root)
    manifest = read_manifest(root)
    if manifest is not None:
        yield Found(root, manifest)
        return
    damage = diagnose(root) if damaged else None
    if damage is not None:
        yield Found(root, None, damage)
        return
    if where.is_url(root):  # prefixes only: files written in place (HDF5) do not live in object stores
        entries = where.subfolders(root)
    else:
        entries = sorted(root.iterdir()) if root.is_dir() else []
    for entry in entries:
        yield from survey(entry, damaged=damaged)


def find_caches(root: str | Path) -> Iterator[tuple[where.Location, dict[str, Any]]]:
    """Every cache under `root` whose manifest can be read, complete or not, with its manifest."""
    for found in survey(root, damaged=False):
        yield found.path, found.manifest
