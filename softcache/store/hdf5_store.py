"""The HDF5 backend: one local file with the same hierarchy and manifest as the Zarr backend, written by one
process, and known by its HDF5 signature whatever its name.

Datasets are chunked along samples (about 1 MiB a chunk), gzip-compressed with byte shuffling, and carry a
Fletcher-32 checksum per chunk. The manifest is the root attribute `softcache` (JSON text). Readers open the
file lazily in the process that reads (h5py handles do not survive fork or pickling), so a reader can be
handed to DataLoader workers.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import google_crc32c
import h5py
import numpy as np

from softcache.store import where
from softcache.store.base import MANIFEST_KEY, Backend, CacheReader, Layout, ShardWriter, plan_shards
from softcache.store.integrity import SHARDS_KEY

SHARD_SAMPLES_KEY = "softcache_shard_samples"


def stored_chunks(dataset: h5py.Dataset, lo: int, hi: int) -> Iterator[bytes]:
    """The stored (filtered) bytes of every chunk holding samples `[lo, hi)`, in chunk order."""
    chunks, shape = dataset.chunks, dataset.shape
    grid = [range(lo, hi, chunks[0])] + [range(0, s, c) for s, c in zip(shape[1:], chunks[1:])]
    for offset in itertools.product(*grid):
        yield dataset.id.read_direct_chunk(offset)[1]


class HDF5Writer(ShardWriter):
    def __init__(self, path: str | Path, layout: Layout, manifest: dict[str, Any],
                 committed: dict[int, dict] | None = None, threads: int = 1, create: bool = True):
        # h5py serialises every call behind one lock: more threads would only wait; one process writes a file
        shard, chunks = plan_shards(layout, manifest["storage"].get("shard_bytes"),
                                    manifest["storage"].get("planned_samples"))
        super().__init__(Path(path), layout, manifest, shard, committed)
        if not create:
            self.file = h5py.File(self.path, "r+")
            return
        self.file = h5py.File(self.path, "w")
        self.file.attrs[MANIFEST_KEY] = json.dumps(manifest)
        self.file.attrs[SHARD_SAMPLES_KEY] = shard
        for name, (shape, dtype) in layout.items():
            self.file.create_dataset(name, shape=shape, dtype=dtype,
                                     chunks=(min(chunks[name][0], shape[0]) or 1, *chunks[name][1:]),
                                     compression="gzip", compression_opts=4, shuffle=np.dtype(dtype).itemsize > 1,
                                     fletcher32=True, fillvalue=0)
        self.file.flush()

    @property
    def progress_dir(self) -> Path:
        return HDF5Backend.progress_dir(self.path)

    def _write_block(self, name: str, lo: int, hi: int, block: np.ndarray) -> None:
        self.file[name][lo:hi] = block

    def _sync(self, lo: int) -> None:
        self.file.flush()
        os.fsync(self.file.id.get_vfd_handle())

    def _checksums(self, lo: int, hi: int) -> dict[str, list[int]]:
        sums = {}
        for name in self.layout:
            size, crc = 0, 0
            for data in stored_chunks(self.file[name], lo, hi):
                size, crc = size + len(data), google_crc32c.extend(crc, data)
            sums[name] = [size, int(crc)]
        return sums

    def _set_manifest(self, manifest: dict[str, Any], record: dict[str, Any]) -> None:
        self.file.attrs[SHARDS_KEY] = json.dumps(record)
        self.file.attrs[MANIFEST_KEY] = json.dumps(manifest)
        self.file.close()


class HDF5Reader(CacheReader):
    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path, self.manifest = Path(path), manifest
        self._file: h5py.File | None = None
        self._pid = -1
        self._meta: dict[str, tuple[tuple[int, ...], np.dtype, tuple[int, ...]]] = {}

        def collect(name: str, node: h5py.HLObject) -> None:  # returning a value would stop visititems
            if isinstance(node, h5py.Dataset):
                self._meta[name] = (node.shape, node.dtype, node.chunks)

        with h5py.File(self.path, "r") as f:
            f.visititems(collect)
            self._shard = int(f.attrs[SHARD_SAMPLES_KEY])
            record = f.attrs.get(SHARDS_KEY)
        self.record = json.loads(record) if record is not None else None

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": -1}

    def names(self) -> list[str]:
        return sorted(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta[name][0])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._meta[name][1])

    def chunk_samples(self, name: str) -> int:
        return int(self._meta[name][2][0])

    def view_chunks(self, name: str) -> int:
        return int(self._meta[name][2][1])

    def shard_samples(self) -> int:
        return self._shard

    def bytes_on_disk(self, name: str) -> int:
        return int(self.file[name].id.get_storage_size())

    def shard_bytes(self, name: str, k: int) -> bytes:
        lo = k * self._shard
        return b"".join(stored_chunks(self.file[name], lo, min(lo + self._shard, self.shape(name)[0])))

    def _raw(self, name: str, selection: Any) -> np.ndarray:
        return self.file[name][selection]


class HDF5Backend(Backend):
    name = "hdf5"
    writer = HDF5Writer
    reader = HDF5Reader
    suffixes = (".h5", ".hdf5")
    url_refusal = ("an HDF5 cache is one file written in place, which object stores cannot do; give a zarr --out "
                   "(no .h5 suffix) for an object store, or a local .h5 path")
    torchrun_refusal = ("an HDF5 cache is written by one process; use a zarr --out (a folder) under torchrun, or run "
                        "dump-teacher without torchrun")

    @classmethod
    def recognises(cls, path: where.Location) -> bool:
        # the signature, not the suffix: a cache renamed without `.h5` is still one (and a truncated one too)
        return not where.is_url(path) and Path(path).is_file() and h5py.is_hdf5(str(path))

    @classmethod
    def read_manifest(cls, path: where.Location) -> dict[str, Any] | None:
        try:
            with h5py.File(path, "r") as f:
                text = f.attrs.get(MANIFEST_KEY)
            return json.loads(text) if text is not None else None
        except (OSError, ValueError):  # truncated, locked by a writer, or its manifest cut short (`diagnose`)
            return None

    @classmethod
    def diagnose(cls, path: where.Location) -> str | None:
        if not cls.recognises(path):
            return None
        try:
            with h5py.File(path, "r") as f:
                text, ours = f.attrs.get(MANIFEST_KEY), "labels" in f or SHARD_SAMPLES_KEY in f.attrs
        except OSError as err:
            return f"the file has the HDF5 signature but cannot be opened ({err})"
        if text is None:  # another program's HDF5 file, unless it holds our arrays
            return f"its manifest (root attribute '{MANIFEST_KEY}') is missing" if ours else None
        try:
            json.loads(text)
        except ValueError as err:
            return f"its manifest (root attribute '{MANIFEST_KEY}') is not valid JSON ({err})"
        return None

    @classmethod
    def progress_dir(cls, path: where.Location) -> where.Location:
        return where.sibling(path, ".progress")  # CACHE.h5.progress/, beside the file
