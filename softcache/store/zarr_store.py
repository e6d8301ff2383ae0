"""The Zarr v3 backend: sharded, compressed, checksummed arrays under one group.

Every array is split along samples only. Inner chunks (the unit a reader decompresses) hold about 1 MiB;
shards (the unit written as one file) hold `shard_samples` samples for every array alike, so shard `k` of
any array covers the same samples. Chunks are compressed with Blosc/zstd and carry a crc32c checksum
(zarr's `Crc32cCodec`); the shard index carries its own (the ShardingCodec default).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from softcache.errors import SoftcacheError

CHUNK_BYTES = 1 << 20
SHARD_BYTES = 64 << 20
MANIFEST_KEY = "softcache"


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1) if x >= 1 else 1


def plan_shards(layout: dict[str, tuple[tuple[int, ...], str]]) -> tuple[int, dict[str, int]]:
    """Samples per shard (shared by all arrays) and samples per inner chunk (per array), powers of two."""
    per_sample = {name: int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
                  for name, (shape, dtype) in layout.items()}
    num_samples = next(iter(layout.values()))[0][0]
    shard = min(_pow2_floor(SHARD_BYTES / max(per_sample.values())), _pow2_floor(max(1, num_samples)) * 2)
    chunks = {name: min(shard, _pow2_floor(CHUNK_BYTES / b)) for name, b in per_sample.items()}
    return shard, chunks


class ZarrWriter:
    """Creates the arrays, takes consecutive sample rows, and writes each shard once, whole."""

    def __init__(self, path: str | Path, layout: dict[str, tuple[tuple[int, ...], str]], manifest: dict[str, Any]):
        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode="w")
        self.group.attrs[MANIFEST_KEY] = manifest
        self.shard_samples, chunks = plan_shards(layout)
        self.arrays: dict[str, zarr.Array] = {}
        for name, (shape, dtype) in layout.items():
            parent, _, leaf = name.rpartition("/")
            group = self.group.require_group(parent) if parent else self.group
            typesize = np.dtype(dtype).itemsize
            self.arrays[name] = group.create_array(
                leaf, shape=shape, dtype=dtype,
                chunks=(chunks[name], *shape[1:]), shards=(self.shard_samples, *shape[1:]),
                compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle" if typesize > 1 else "noshuffle",
                                        typesize=typesize), Crc32cCodec()],
                fill_value=0)
        self.num_samples = layout["labels"][0][0]
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in layout}
        self.pending_rows = 0
        self.written = 0  # samples already in complete shards on disk

    def write(self, start: int, rows: dict[str, np.ndarray]) -> None:
        """Append rows `[start, start + B)` of every array; whole shards go to disk as soon as they fill."""
        assert start == self.written + self.pending_rows, f"rows must arrive in order: got {start}, expected {self.written + self.pending_rows}"
        assert rows.keys() == self.pending.keys(), f"every array needs rows: got {sorted(rows)}"
        for name, value in rows.items():
            self.pending[name].append(np.asarray(value))
        self.pending_rows += len(rows["labels"])
        while self.pending_rows >= self.shard_samples or (self.pending_rows and self.written + self.pending_rows == self.num_samples):
            self._flush(min(self.shard_samples, self.pending_rows))

    def _flush(self, count: int) -> None:
        lo, hi = self.written, self.written + count
        for name, parts in self.pending.items():
            block = np.concatenate(parts) if len(parts) > 1 else parts[0]
            self.arrays[name][lo:hi] = block[:count]
            self.pending[name] = [block[count:]] if len(block) > count else []
        self.written, self.pending_rows = hi, self.pending_rows - count

    def finish(self, manifest: dict[str, Any]) -> None:
        """Mark the cache complete: the manifest is the last thing written."""
        assert self.written == self.num_samples and not self.pending_rows, f"{self.written} of {self.num_samples} samples written"
        self.group.attrs[MANIFEST_KEY] = {**manifest, "complete": True}


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of the cache at `path`, or None if `path` holds no softcache cache."""
    if not (Path(path) / "zarr.json").is_file():
        return None
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # not a zarr group (e.g. a bare array): not a cache either
        return None
    manifest = group.attrs.get(MANIFEST_KEY)
    return dict(manifest) if manifest is not None else None


class ZarrReader:
    """Read access to a complete cache: `manifest` and `arrays` (name -> zarr.Array)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise SoftcacheError(f"'{path}' is not a softcache cache (no zarr.json with a softcache manifest); "
                                 "give the --out folder of a dump-teacher run")
        if not manifest.get("complete"):
            raise SoftcacheError(f"cache '{path}' is incomplete: a dump is in progress or died; "
                                 "rerun its dump-teacher command to finish it")
        self.manifest = manifest
        self.group = zarr.open_group(str(self.path), mode="r")
        names = ["labels", "logits", "views/box", "views/flip"] + [f"features/{layer}" for layer in manifest["layers"]]
        self.arrays: dict[str, zarr.Array] = {name: self.group[name] for name in names}

    def bytes_on_disk(self, name: str) -> int:
        folder = self.path / name
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    def describe(self) -> list[dict[str, Any]]:
        """One row per array: shape, dtype, chunk and shard shape, bytes on disk and per sample."""
        rows = []
        for name, arr in self.arrays.items():
            stored = self.bytes_on_disk(name)
            rows.append({"name": name, "shape": arr.shape, "dtype": str(arr.dtype), "chunks": arr.chunks,
                         "shards": arr.shards, "bytes": stored, "raw_bytes": arr.nbytes,
                         "bytes_per_sample": stored / max(1, arr.shape[0])})
        return rows


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(os.scandir(path))
