"""Where a cache lives: a local path, or a URL of an object store (`s3://`, `gs://`, any fsspec protocol).

Local caches keep what only a local file system gives (fsync, atomic renames, flock). For a URL the same
operations go through fsspec, the engine zarr's own remote store (`FsspecStore`) uses: one object PUT is
atomic, so a marker or a shard is either there whole or not at all. Credentials and endpoints come from the
environment (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3) or from
`--storage-option KEY=VALUE` (`set_storage_options`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO
from collections.abc import Callable

from softcache.errors import SoftcacheError

Location = str | Path
_OPTIONS: dict[str, Any] = {}


def is_url(location: Location) -> bool:
    return "://" in str(location)


def set_storage_options(options: dict[str, Any]) -> None:
    """Options for every object-store file system this process opens (`--storage-option`)."""
    _OPTIONS.clear()
    _OPTIONS.update(options)


def location(value: Location) -> Location:
    """A cache location as softcache keeps it: a URL string (without a trailing '/') or a Path."""
    return str(value).rstrip("/") if is_url(value) else Path(value)


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of `url` and the path within it; a protocol without its package is one line."""
    import fsspec
    try:
        return fsspec.core.url_to_fs(url, **_OPTIONS)
    except ImportError as err:
        raise SoftcacheError(f"'{url}' needs a package for its protocol ({err}); for s3:// install softcache with "
                             "pip install -e \".[s3]\"") from None


def join(base: Location, *names: str) -> Location:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return Path(base).joinpath(*names)


def sibling(base: Location, suffix: str) -> Location:
    """`base` with `suffix` added to its last name (`CACHE` -> `CACHE.new`)."""
    return str(base).rstrip("/") + suffix if is_url(base) else Path(base).with_name(Path(base).name + suffix)


def exists(target: Location) -> bool:
    if not is_url(target):
        return Path(target).exists()
    fs, path = filesystem(str(target))
    fs.invalidate_cache()
    return fs.exists(path)


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(os.scandir(path))


def remove(target: Location) -> None:
    """Delete a file or a folder (all objects under a prefix), if there."""
    if not is_url(target):
        target = Path(target)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        return
    fs, path = filesystem(str(target))
    fs.invalidate_cache()
    if fs.exists(path):
        fs.rm(path, recursive=True)


def replace_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a local file whole: `write(f)` into a temporary file, fsync, rename over `path`; a kill leaves the
    old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, a failed write: no half-written file is left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(target: Location, value: Any) -> None:
    """Write JSON whole: a local file by `replace_atomically`, an object in one PUT."""
    data = json.dumps(value).encode()
    if is_url(target):
        fs, path = filesystem(str(target))
        fs.pipe(path, data)
        return
    replace_atomically(Path(target), lambda f: f.write(data))


def json_files(folder: Location) -> list[bytes]:
    """The contents of the `*.json` files directly in `folder` (none when it is not there)."""
    if not is_url(folder):
        folder = Path(folder)
        out = []
        for entry in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                out.append(entry.read_bytes())
            except OSError:
                continue
        return out
    fs, path = filesystem(str(folder))
    fs.invalidate_cache()
    names = sorted(fs.glob(path.rstrip("/") + "/*.json"))
    return list(fs.cat(names).values()) if names else []


def size(target: Location) -> int | None:
    """Bytes stored at `target`, or None when it is missing."""
    if not is_url(target):
        try:
            return Path(target).stat().st_size
        except FileNotFoundError:
            return None
    fs, path = filesystem(str(target))
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return None


def file_sizes(folder: Location) -> dict[str, int]:
    """Bytes of every file under `folder`, by path relative to it ('c/0/0'); for an object store one recursive
    listing, not a request per file."""
    if not is_url(folder):
        root = Path(folder)
        return {f.relative_to(root).as_posix(): f.stat().st_size for f in root.rglob("*") if f.is_file()}
    fs, path = filesystem(str(folder))
    fs.invalidate_cache()
    prefix = path.rstrip("/") + "/"
    return {name[len(prefix):]: int(info["size"]) for name, info in fs.find(prefix, detail=True).items()
            if name.startswith(prefix)}


def read_bytes(target: Location) -> bytes:
    if not is_url(target):
        return Path(target).read_bytes()
    fs, path = filesystem(str(target))
    return fs.cat_file(path)


def total_size(target: Location) -> int:
    """Bytes of every file under a folder (or of one file)."""
    if not is_url(target):
        target = Path(target)
        if target.is_file():
            return target.stat().st_size
        return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    fs, path = filesystem(str(target))
    return int(fs.du(path)) if fs.exists(path) else 0


def subfolders(target: Location) -> list[Location]:
    """The folders directly in `target` (object stores: the common prefixes)."""
    if not is_url(target):
        return [e for e in sorted(Path(target).iterdir()) if e.is_dir()] if Path(target).is_dir() else []
    fs, path = filesystem(str(target))
    protocol = str(target).split("://", 1)[0]
    return [f"{protocol}://{entry['name']}" for entry in fs.ls(path, detail=True) if entry["type"] == "directory"]


def zarr_store(target: Location, *, read_only: bool) -> Any:
    """zarr's store for a cache: `LocalStore` for a folder, `FsspecStore` for a URL."""
    from zarr.storage import FsspecStore, LocalStore
    if not is_url(target):
        return LocalStore(str(target), read_only=read_only)
    filesystem(str(target))  # a missing protocol package is one clear line
    return FsspecStore.from_url(str(target), read_only=read_only, storage_options=dict(_OPTIONS) or None)
