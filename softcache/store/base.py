"""What every backend shares: the `Backend` interface, shard planning, whole-shard buffered writes, committed
progress, checked reads.

A dump hands rows over shard by shard, in sample order within each shard. The writer buffers them and writes
each shard (the same sample range in every array) once, whole; after a shard of every array is on disk it
commits the shard: a small marker file `PROGRESS/<k>.json` (the shard's sizes and checksums), written
atomically. Shards commit in any order and from any number of processes (each writes whole shards of its
own), so a dump killed at any point leaves at most its in-flight shards uncommitted, and a rerun, with any
number of processes, computes only the shards without a marker. The dump that completes the cache gathers
the markers into the cache's shard record (integrity.py) and removes them.
"""
from __future__ import annotations

import errno
import json
import math
import threading
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar
from collections.abc import Iterator

import numpy as np

from softcache.errors import SoftcacheError
from softcache.store import where
from softcache.store.integrity import build_record, problems

CHUNK_BYTES = 1 << 20
SHARD_BYTES = 64 << 20
SHARD_FRACTION = 16          # a shard holds at most 1/16 of the samples, so every dump commits many times ...
MIN_SHARD_BYTES = 1 << 20    # ... unless that would make shards smaller than this (all arrays together)
MANIFEST_KEY = "softcache"
_COUNT_LOCK = threading.Lock()

Layout = dict[str, tuple[tuple[int, ...], str]]


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1) if x >= 1 else 1


def _pow2_ceil(x: float) -> int:
    n = math.ceil(x)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def plan_shards(layout: Layout, shard_bytes: int | None = None,
                planned_samples: int | None = None) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Samples per shard and per inner chunk, both shared by all arrays, and each array's inner chunk shape.

    A shard (the unit written whole, committed and resumed from) is capped by `shard_bytes` of the largest
    array and by 1/SHARD_FRACTION of the samples, but not below MIN_SHARD_BYTES of all arrays together.
    Inner chunks (the unit a reader decompresses) hold one view slot each, `(samples, 1, ...)` for per-view
    arrays, about CHUNK_BYTES of the largest array, and the same samples in every array: a reader that replays
    one slot per epoch decodes exactly that slot of the samples it visits. Sample counts are powers of two.
    `planned_samples` replaces the layout's sample count in the 1/SHARD_FRACTION cap (benchmarks write part
    of a dataset with the shards the whole would get).
    """
    shard_bytes = shard_bytes or SHARD_BYTES
    row_bytes = {name: int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
                 for name, (shape, dtype) in layout.items()}
    view_bytes = {name: row_bytes[name] // max(1, shape[1]) if len(shape) > 1 else row_bytes[name]
                  for name, (shape, _) in layout.items()}
    num_samples = planned_samples or next(iter(layout.values()))[0][0]
    by_count = max(_pow2_floor(max(1, num_samples // SHARD_FRACTION)),
                   _pow2_ceil(MIN_SHARD_BYTES / sum(row_bytes.values())))
    shard = min(_pow2_floor(shard_bytes / max(row_bytes.values())), by_count, _pow2_ceil(max(1, num_samples)))
    chunk = min(shard, _pow2_floor(CHUNK_BYTES / max(1, max(view_bytes.values()))))
    chunks = {name: (chunk, 1, *shape[2:]) if len(shape) > 1 else (chunk,) for name, (shape, _) in layout.items()}
    return shard, chunks


def write_marker(folder: where.Location, k: int, value: dict[str, Any]) -> None:
    where.write_json(where.join(folder, f"{k}.json"), value)


def read_markers(folder: where.Location, cache_id: str | None = None) -> dict[int, dict[str, Any]]:
    """Committed shards by index -> their marker `{"id", "shard", "samples": [lo, hi], "sums": {array: [size,
    crc32c]}}`, from the files in `folder` (those of cache `cache_id`, if given; unreadable or foreign markers,
    and the temporary file of one being written, count as uncommitted)."""
    found = {}
    for data in where.json_files(folder):
        try:
            value = json.loads(data)
            if cache_id is None or value["id"] == cache_id:
                found[int(value["shard"])] = value
        except (ValueError, KeyError, TypeError):
            continue
    return found


def dump_cost(per_shard: list[dict[str, Any]]) -> dict[str, Any]:
    """The dump's cost from its shards' markers: seconds summed over every shard (and so over every process
    that computed one; a resumed dump counts each shard once), and the devices that computed them."""
    total: dict[str, Any] = {"wall_s": 0.0, "teacher_s": 0.0, "views": 0}
    devices = []
    for cost in per_shard:
        for key in total:
            total[key] += cost.get(key, 0)
        if cost.get("device") and cost["device"] not in devices:
            devices.append(cost["device"])
    return {"wall_s": round(total["wall_s"], 3), "teacher_s": round(total["teacher_s"], 3), "views": total["views"],
            "devices": devices}


class ShardWriter:
    """Buffers the rows of one shard at a time and writes whole shards; subclasses store the blocks.

    Full shards are compressed and written by a pool of `threads` background threads, several shards at once,
    while the caller computes the next rows; each is committed (its marker written) once all its arrays are
    durable. At most `threads + 1` shards wait, which bounds memory. An error in a writer thread (a full disk)
    is raised by the next `write`, `wait` or `finish`, and no shard from then on is committed. `committed`
    holds the shards an earlier (or another) process committed: `{k: sums}`.
    """

    def __init__(self, path: Path, layout: Layout, manifest: dict[str, Any], shard_samples: int,
                 committed: dict[int, dict] | None = None, threads: int = 1):
        self.path, self.layout, self.manifest = where.location(path), layout, manifest
        self.shard_samples = shard_samples
        self.num_samples = layout["labels"][0][0]
        self.num_shards = -(-self.num_samples // shard_samples)
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in layout}
        self.pending_rows = 0
        self._lo = 0                        # first sample of the shard being buffered
        self.committed = dict(committed or {})  # shard -> sums, found on disk when this writer started
        self.stored_shards = 0              # shards this writer committed
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="softcache-writer")
        self._in_flight: deque[Future] = deque()
        self._failed = False                # once a shard fails, no later shard is committed
        self._cost: dict[str, Any] = {}     # what the shard being buffered cost to compute (see `write`)

    # --- backend hooks
    def _write_block(self, name: str, lo: int, hi: int, block: np.ndarray) -> None:
        raise NotImplementedError

    def _sync(self, lo: int) -> None:
        """Make the shard starting at sample `lo` durable before it is committed."""

    def _checksums(self, lo: int, hi: int) -> dict[str, list[int]]:
        """Per array, `[stored size, crc32c]` of the shard `[lo, hi)` just written."""
        raise NotImplementedError

    def _set_manifest(self, manifest: dict[str, Any], record: dict[str, Any]) -> None:
        """Write the final manifest and the shard record (integrity.py) together, as the very last write."""
        raise NotImplementedError

    @property
    def progress_dir(self) -> where.Location:
        raise NotImplementedError

    def missing(self) -> list[int]:
        """The shards no process has committed, in order."""
        return [k for k in range(self.num_shards) if k not in self.committed]

    # --- shared logic
    def write(self, start: int, rows: dict[str, np.ndarray], cost: dict[str, Any] | None = None) -> None:
        """Append rows `[start, start + B)` of every array; a shard goes to disk as soon as its rows are in.
        Rows arrive in order within a shard, and a new shard is started at its first sample (rows that run
        past a shard's end continue into the next one). `cost` (seconds, e.g. `{"wall_s", "teacher_s"}`) is
        added up per shard, kept in its marker and summed over all shards in the finished cache's record."""
        for key, value in (cost or {}).items():
            self._cost[key] = self._cost.get(key, 0) + value if isinstance(value, (int, float)) else value
        assert rows.keys() == self.pending.keys(), \
            f"every array needs rows: got {sorted(rows)}, expected {sorted(self.pending)}"
        count, offset = len(rows["labels"]), 0
        while offset < count:
            at = start + offset
            if not self.pending_rows:
                assert at % self.shard_samples == 0, f"a shard starts at a multiple of {self.shard_samples}, not {at}"
                self._lo = at
            assert at == self._lo + self.pending_rows, \
                f"rows must arrive in order: got {at}, expected {self._lo + self.pending_rows}"
            end = min(self._lo + self.shard_samples, self.num_samples)
            take = min(count - offset, end - at)
            for name, value in rows.items():
                self.pending[name].append(np.asarray(value)[offset:offset + take])
            self.pending_rows += take
            offset += take
            if self._lo + self.pending_rows == end:
                self._flush()

    def _flush(self) -> None:
        lo, hi = self._lo, self._lo + self.pending_rows
        blocks = {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in self.pending.items()}
        self.pending = {name: [] for name in self.layout}
        self.pending_rows = 0
        cost, self._cost = self._cost, {}
        while len(self._in_flight) > self.threads:
            self._in_flight.popleft().result()
        self._in_flight.append(self._pool.submit(self._store, lo, hi, blocks, cost))

    def wait(self) -> None:
        """Block until every handed-over shard is on disk and committed (raising the writer's error, if any)."""
        while self._in_flight:
            self._in_flight.popleft().result()

    def close(self) -> None:
        """Wait for this writer's shards and stop its threads (the cache is completed by `finish`, once)."""
        assert not self.pending_rows, f"{self.pending_rows} rows of an unfinished shard were handed over"
        self.wait()
        self._pool.shutdown()

    def _store(self, lo: int, hi: int, blocks: dict[str, np.ndarray], cost: dict[str, Any] | None = None) -> None:
        """Write one shard of every array and make it durable (in any thread), then commit it."""
        if self._failed:
            return
        try:
            for name, block in blocks.items():
                self._write_block(name, lo, hi, block)
            self._sync(lo)
            k = lo // self.shard_samples
            write_marker(self.progress_dir, k, {"id": self.manifest.get("id"), "shard": k, "samples": [lo, hi],
                                                "sums": self._checksums(lo, hi), "cost": cost or {}})
            with _COUNT_LOCK:
                self.stored_shards += 1
        except OSError as err:
            self._failed = True
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                done = sum(m["samples"][1] - m["samples"][0]
                           for m in read_markers(self.progress_dir, self.manifest.get("id")).values())
                raise SoftcacheError(f"out of disk space writing cache '{self.path}' (samples {lo}-{hi}): the cache "
                                     f"stays incomplete with {done} samples committed; free space and rerun the same "
                                     "command to resume") from None
            raise
        except BaseException:
            self._failed = True
            raise

    def finish(self) -> dict[str, Any]:
        """Mark the cache complete once every shard is committed (by any process): the shard record and the
        manifest are the last thing written. Returns the final manifest."""
        self.close()
        committed = read_markers(self.progress_dir, self.manifest.get("id"))
        missing = [k for k in range(self.num_shards) if k not in committed]
        assert not missing, f"shards {missing[:5]} of {self.num_shards} are not committed"
        shards = {name: [committed[k]["sums"][name] for k in range(self.num_shards)] for name in self.layout}
        final = {**self.manifest, "complete": True}
        record = build_record(final, self.layout, self.shard_samples, shards)
        record["cost"] = dump_cost([committed[k].get("cost", {}) for k in range(self.num_shards)])
        self._set_manifest(final, record)
        where.remove(self.progress_dir)
        return final


class CacheReader:
    """Read access to a complete cache; subclasses open the arrays.

    Reads are checked: a chunk whose checksum fails raises a SoftcacheError naming the array and the sample
    range, never a stack of codec errors and never wrong numbers.
    """

    path: Path
    manifest: dict[str, Any]
    record: dict[str, Any] | None = None  # the shard record written at commit (integrity.py)
    decoded_bytes: int = 0  # bytes of the chunks decoded so far (whole chunks: what a read really costs)

    # --- what the integrity checks need
    @property
    def cost(self) -> dict[str, Any] | None:
        """What the dump cost, from the shard record: `wall_s` and `teacher_s` (the teachers' forward passes)
        summed over the shards, `views` computed, `devices`; None for a cache written before it was recorded."""
        return (self.record or {}).get("cost")

    def array_meta(self, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
        """Shape and dtype of array `name`, or None when it is missing."""
        return (self.shape(name), self.dtype(name)) if name in self.names() else None

    def shard_sizes(self, name: str, count: int) -> list[int | None] | None:
        """Stored bytes of each of the array's `count` shards (None: missing); None if only `stored_size` is known."""
        return None

    def stored_size(self, name: str) -> int:
        return self.bytes_on_disk(name)

    def shard_bytes(self, name: str, k: int) -> Any:
        """The stored (compressed) bytes of shard `k` of array `name`, as the writer checksummed them."""
        raise NotImplementedError

    def problems(self, checksums: bool = False) -> list[str]:
        """Every missing or changed part, named (array, sample range); `checksums` also recomputes every crc32c."""
        return problems(self, self.record, checksums=checksums)

    def check(self) -> CacheReader:
        """Refuse a cache with any part missing or changed (the cheap checks), naming the first."""
        found = self.problems()
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise SoftcacheError(f"cache '{self.path}' is damaged: {found[0]}{more}; run 'softcache verify "
                                 f"{self.path}' and re-dump it")
        return self

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> np.dtype:
        raise NotImplementedError

    def chunk_samples(self, name: str) -> int:
        raise NotImplementedError

    def view_chunks(self, name: str) -> int:
        """How many view slots one inner chunk of a per-view array `[N, V, ...]` holds (1 from format 3 on)."""
        raise NotImplementedError

    def shard_samples(self) -> int:
        raise NotImplementedError

    def bytes_on_disk(self, name: str) -> int:
        raise NotImplementedError

    def _raw(self, name: str, selection: Any) -> np.ndarray:
        raise NotImplementedError

    def damage(self, name: str, lo: int, hi: int, err: Exception) -> SoftcacheError:
        return SoftcacheError(f"cache '{self.path}' is damaged: array '{name}' samples {lo}-{hi} fail their checksum "
                              f"({type(err).__name__}); run 'softcache verify {self.path}' and re-dump")

    def read(self, name: str, lo: int = 0, hi: int | None = None, slot: int | None = None) -> np.ndarray:
        """Rows `[lo, hi)` of array `name` (`[hi - lo, ...]`), or only their view slot `slot` of a per-view array
        (`[hi - lo, ...]` without the view axis, reading that slot's chunks only); read chunk by chunk so damage
        is located."""
        n = self.shape(name)[0]
        hi = n if hi is None else hi
        step = self.chunk_samples(name)
        row_bytes = int(np.prod(self.shape(name)[1:], dtype=np.int64)) * self.dtype(name).itemsize
        if slot is not None:
            row_bytes = row_bytes // self.shape(name)[1] * self.view_chunks(name)
        parts = []
        for a in range(lo - lo % step, hi, step):
            b = min(a + step, n)
            try:
                parts.append(self._raw(name, slice(a, b) if slot is None else (slice(a, b), slot)))
            except (ValueError, OSError, RuntimeError) as err:
                raise self.damage(name, a, b, err) from None
            with _COUNT_LOCK:  # reads run on several threads
                self.decoded_bytes += (b - a) * row_bytes
        if not parts:
            return self._raw(name, slice(lo, hi) if slot is None else (slice(lo, hi), slot))
        block = np.concatenate(parts) if len(parts) > 1 else parts[0]
        start = lo - (lo - lo % step)
        return block[start:start + (hi - lo)]

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows at sorted unique sample indices `index [M]`."""
        try:
            return self._raw(name, index)
        except (ValueError, OSError, RuntimeError):
            step = self.chunk_samples(name)
            for a in sorted({int(i) - int(i) % step for i in index}):  # locate the damaged chunk
                self.read(name, a, min(a + step, self.shape(name)[0]))
            raise

    def chunk_ranges(self, name: str) -> Iterator[tuple[int, int]]:
        n, step = self.shape(name)[0], self.chunk_samples(name)
        for a in range(0, n, step):
            yield a, min(a + step, n)

    def describe(self) -> list[dict[str, Any]]:
        """One row per array: shape, dtype, chunk and shard length, bytes on disk and per sample, ratio."""
        rows = []
        for name in self.names():
            shape, dtype = self.shape(name), self.dtype(name)
            stored = self.bytes_on_disk(name)
            raw = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            rows.append({"name": name, "shape": shape, "dtype": str(dtype), "chunks": self.chunk_samples(name),
                         "shards": self.shard_samples(), "bytes": stored, "raw_bytes": raw,
                         "bytes_per_sample": stored / max(1, shape[0])})
        return rows


class Backend(ABC):
    """One cache format as the store sees it: its name, its writer and reader, how a path in the format is
    recognised and its manifest read, where a dump keeps its progress markers, and what the format cannot do.
    A new format is one module (a ShardWriter, a CacheReader and a Backend) and one entry in
    `backends.BACKENDS`. Backends hold no state: the registry holds the classes, and every method is a
    classmethod taking the cache's location (a Path, or a URL string for a backend that allows them)."""

    name: ClassVar[str]                           # as --format and the manifest's storage.backend spell it
    writer: ClassVar[type[ShardWriter]]
    reader: ClassVar[type[CacheReader]]
    suffixes: ClassVar[tuple[str, ...]] = ()      # an --out ending so gets this backend without --format
    url_refusal: ClassVar[str | None] = None      # why it cannot live in an object store, what to do (None: it can)
    torchrun_refusal: ClassVar[str | None] = None  # why torchrun ranks cannot write one together (None: they can)

    @classmethod
    @abstractmethod
    def recognises(cls, path: where.Location) -> bool:
        """Whether `path` is in this format, readable or not: the backend that reads it."""

    @classmethod
    @abstractmethod
    def read_manifest(cls, path: where.Location) -> dict[str, Any] | None:
        """The manifest at a `path` this backend recognises; None when it holds no manifest that can be read."""

    @classmethod
    @abstractmethod
    def diagnose(cls, path: where.Location) -> str | None:
        """For a `path` without a readable manifest: what is wrong with it, as a phrase ("its root zarr.json is
        missing"), when it is recognisably a cache of this format; None for anything else (not ours)."""

    @classmethod
    @abstractmethod
    def progress_dir(cls, path: where.Location) -> where.Location:
        """Where a dump in progress at `path` keeps its per-shard commit markers (see ShardWriter)."""
