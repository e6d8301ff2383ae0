"""The Zarr v3 backend: a directory (or an object-store prefix) holding a group with sharded, compressed,
checksummed arrays; the one backend several processes (torchrun ranks) write together.

Arrays are split along samples only. Inner chunks (the unit a reader decompresses) hold about 1 MiB and are
compressed with Blosc/zstd and checksummed with crc32c (zarr's `Crc32cCodec`); shards (one file each, zarr's
`ShardingCodec`, whose index carries its own crc32c) hold the same samples in every array.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.abc.store import SuffixByteRequest
from zarr.storage import WrapperStore

from softcache.store import where, zarr_loop  # noqa: F401  (zarr_loop: quiet exits after a failed read)
from softcache.store.base import _COUNT_LOCK, MANIFEST_KEY, Backend, CacheReader, Layout, ShardWriter, plan_shards
from softcache.store.integrity import SHARDS_KEY, crc32c

# Every chunk is written, zeros included: no chunk-by-chunk comparison with the fill value (a fifth of the
# writer's time), and a missing shard file is never a shard of zeros (a shard of class-0 labels is all zeros).
WRITE_CONFIG = {"write_empty_chunks": True}
PROGRESS_DIR = "progress"   # CACHE/progress/<k>.json: the shards a dump in progress has committed
ROOT = "zarr.json"          # the root group's metadata: its attributes hold the manifest
# what only a cache of ours holds, besides its root zarr.json: the arrays every cache has, and a dump's markers
OURS = ("labels/zarr.json", "views/zarr.json", PROGRESS_DIR)


# Chosen by measurement (BENCHMARKS.md, "Writer"): zstd at Blosc clevel 1 compresses teacher logits, feature
# and attention maps to the same size as clevel 3 (the previous setting), at 2-3x the speed.
BLOSC = {"cname": "zstd", "clevel": 1}


def _compressors(dtype: str) -> list:
    typesize = np.dtype(dtype).itemsize
    return [BloscCodec(**BLOSC, shuffle="shuffle" if typesize > 1 else "noshuffle", typesize=typesize),
            Crc32cCodec()]


def shard_key(name: str, k: int, ndim: int) -> str:
    """The store key (and relative file path) of shard `k` of an array of `ndim` dimensions."""
    return f"{name}/c/{k}" + "/0" * (ndim - 1)


class RecordingStore(WrapperStore):
    """The store a writer writes through: it notes the size and crc32c of every value as zarr hands it over,
    so the shard record holds the bytes as written (one `set` per whole shard: the writer writes whole shards)."""

    def __init__(self, store: Any):
        super().__init__(store)
        self.sums: dict[str, list[int]] = {}
        self._sums_lock = threading.Lock()

    async def set(self, key: str, value: Any) -> None:
        await self._store.set(key, value)
        data = value.as_numpy_array()
        with self._sums_lock:
            self.sums[key] = [int(data.nbytes), crc32c(data)]

    def take(self, key: str) -> list[int]:
        with self._sums_lock:
            assert key in self.sums, f"shard '{key}' was not written through this store"
            return self.sums.pop(key)


class ZarrWriter(ShardWriter):
    """Creates (or, to resume, reopens) the group and its arrays and writes whole shards."""

    def __init__(self, path: str | Path, layout: Layout, manifest: dict[str, Any],
                 committed: dict[int, dict] | None = None, threads: int = 1, create: bool = True):
        shard, chunks = plan_shards(layout, manifest["storage"].get("shard_bytes"),
                                    manifest["storage"].get("planned_samples"))
        super().__init__(path, layout, manifest, shard, committed, threads=threads)
        self.store = RecordingStore(where.zarr_store(self.path, read_only=False))
        if not create:  # resuming, or another process of this dump created the store
            self.group = zarr.open_group(store=self.store, mode="r+")
            # the array config is not stored in the metadata: a reopened array must be told again
            self.arrays = {name: self.group[name].with_config(WRITE_CONFIG) for name in layout}
            return
        self.group = zarr.open_group(store=self.store, mode="w")
        self.group.attrs[MANIFEST_KEY] = manifest
        self.arrays: dict[str, zarr.Array] = {}
        for name, (shape, dtype) in layout.items():
            parent, _, leaf = name.rpartition("/")
            group = self.group.require_group(parent) if parent else self.group
            self.arrays[name] = group.create_array(
                leaf, shape=shape, dtype=dtype, chunks=chunks[name], shards=(shard, *shape[1:]),
                compressors=_compressors(dtype), fill_value=0, config=WRITE_CONFIG)

    @property
    def progress_dir(self) -> where.Location:
        return ZarrBackend.progress_dir(self.path)

    def _write_block(self, name: str, lo: int, hi: int, block: np.ndarray) -> None:
        self.arrays[name][lo:hi] = block

    def _sync(self, lo: int) -> None:
        """fsync the shard files just written (one per array), so no marker counts a shard the disk does not
        hold. (An object store has stored an object when its PUT returns.)"""
        if where.is_url(self.path):
            return
        k = lo // self.shard_samples
        for name, (shape, _) in self.layout.items():
            path = self.path / shard_key(name, k, len(shape))
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def _checksums(self, lo: int, hi: int) -> dict[str, list[int]]:
        k = lo // self.shard_samples
        return {name: self.store.take(shard_key(name, k, len(shape))) for name, (shape, _) in self.layout.items()}

    def _set_manifest(self, manifest: dict[str, Any], record: dict[str, Any]) -> None:
        self.group.attrs.update({MANIFEST_KEY: manifest, SHARDS_KEY: record})


class CountingStore(WrapperStore):
    """The read-only store a reader opens a complete cache with: it counts the bytes it hands to zarr (what the
    reader really fetched from storage) and keeps every shard index it reads.

    zarr reads a shard's index (16 bytes per inner chunk, at the shard's end) before every partial read of the
    shard; a streaming reader reads one view slot of each shard per epoch, and with all 162 CIFAR views the
    index of a logits shard is as large as the slot it locates. A complete cache never changes, so the
    indexes are read once.
    """

    def __init__(self, store: Any):
        super().__init__(store)
        self.fetched_bytes = 0
        self._indexes: dict[tuple[str, int], Any] = {}

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        index = (key, byte_range.suffix) if isinstance(byte_range, SuffixByteRequest) else None
        if index in self._indexes:
            return self._indexes[index]
        buffer = await self._store.get(key, prototype, byte_range)
        self._count([buffer])
        if index is not None and buffer is not None:
            self._indexes[index] = buffer
        return buffer

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list:
        buffers = await self._store.get_partial_values(prototype, key_ranges)
        self._count(buffers)
        return buffers

    def _count(self, buffers: list) -> None:
        with _COUNT_LOCK:
            self.fetched_bytes += sum(len(b) for b in buffers if b is not None)


class ZarrReader(CacheReader):
    def __init__(self, path: where.Location, manifest: dict[str, Any]):
        self.path, self.manifest = where.location(path), manifest
        self.store = CountingStore(where.zarr_store(self.path, read_only=True))
        self.group = zarr.open_group(store=self.store, mode="r")
        self.record = self.group.attrs.get(SHARDS_KEY)
        self.arrays: dict[str, zarr.Array] = {name: node for name, node in self.group.members(max_depth=None)
                                              if isinstance(node, zarr.Array)}

    def names(self) -> list[str]:
        return sorted(self.arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.arrays[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.arrays[name].dtype)

    def chunk_samples(self, name: str) -> int:
        return self.arrays[name].chunks[0]

    def view_chunks(self, name: str) -> int:
        return self.arrays[name].chunks[1]

    def shard_samples(self) -> int:
        return self.arrays["labels"].shards[0]

    @property
    def fetched_bytes(self) -> int:
        """Bytes read from storage so far (compressed chunks, shard indexes, metadata)."""
        return self.store.fetched_bytes

    def bytes_on_disk(self, name: str) -> int:
        return where.total_size(where.join(self.path, *name.split("/")))

    def shard_sizes(self, name: str, count: int) -> list[int | None]:
        ndim = len(self.shape(name))
        keys = [shard_key(name, k, ndim) for k in range(count)]
        if where.is_url(self.path):  # one listing per array, not a request per shard
            found = where.file_sizes(where.join(self.path, *name.split("/")))
            return [found.get(key[len(name) + 1:]) for key in keys]
        return [where.size(where.join(self.path, *key.split("/"))) for key in keys]

    def shard_bytes(self, name: str, k: int) -> bytes:
        return where.read_bytes(where.join(self.path, *shard_key(name, k, len(self.shape(name))).split("/")))

    def _raw(self, name: str, selection: Any) -> np.ndarray:
        arr = self.arrays[name]
        if isinstance(selection, (slice, tuple)):
            return arr[selection]
        return arr.get_orthogonal_selection((np.asarray(selection),))


class ZarrBackend(Backend):
    name = "zarr"
    writer = ZarrWriter
    reader = ZarrReader

    @classmethod
    def recognises(cls, path: where.Location) -> bool:
        if where.is_url(path):
            return where.size(where.join(path, ROOT)) is not None
        return (Path(path) / ROOT).is_file()

    @classmethod
    def read_manifest(cls, path: where.Location) -> dict[str, Any] | None:
        try:
            manifest = zarr.open_group(store=where.zarr_store(path, read_only=True), mode="r").attrs.get(MANIFEST_KEY)
        except Exception:  # a bare array or a damaged group: not a readable cache (`diagnose` says which)
            return None
        return dict(manifest) if manifest is not None else None

    @classmethod
    def diagnose(cls, path: where.Location) -> str | None:
        if not where.is_url(path) and not Path(path).is_dir():
            return None
        ours = next((part for part in OURS if where.exists(where.join(path, *part.split("/")))), None)
        if not cls.recognises(path):
            return f"its root {ROOT} is missing (it holds {ours})" if ours else None
        try:
            meta = json.loads(where.read_bytes(where.join(path, ROOT)))
        except ValueError as err:  # cut short or overwritten: nobody's zarr group
            return f"its root {ROOT} is not valid JSON ({err})"
        has_manifest = isinstance(meta, dict) and MANIFEST_KEY in (meta.get("attributes") or {})
        try:
            zarr.open_group(store=where.zarr_store(path, read_only=True), mode="r")
        except Exception as err:  # valid JSON that zarr refuses: ours if it holds our manifest or our arrays
            return f"its root {ROOT} is not a zarr group's metadata ({err})" if has_manifest or ours else None
        return f"its manifest (attribute '{MANIFEST_KEY}' of the root {ROOT}) is missing" if ours else None

    @classmethod
    def progress_dir(cls, path: where.Location) -> where.Location:
        return where.join(path, PROGRESS_DIR)
