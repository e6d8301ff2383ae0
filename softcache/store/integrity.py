"""Every shard accounted for: the record a dump writes as it commits, and the checks readers and `verify` run.

At each commit the writer notes, per array, the stored size and the crc32c (google-crc32c, the library zarr's
own `Crc32cCodec` uses) of the shard's bytes as written: the shard file for zarr, the shard's stored chunks,
in chunk order, for HDF5. The finished cache holds them beside its manifest, as the root attribute
`softcache_shards`:

    {"manifest_sha256": <sha256 of the manifest as written>, "shard_samples": S,
     "arrays": {"logits": {"shape": [N, V, C], "dtype": "float16", "shards": [[size, crc32c], ...]}, ...}}

Every reader checks, cheaply (a stat per shard file; one storage size per HDF5 array), that each recorded
array is there with its shape and dtype, that each shard has its recorded size and that the manifest is the
one recorded; `verify` also recomputes every checksum. A missing or changed part is named with its array
and sample range.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import google_crc32c
import numpy as np

SHARDS_KEY = "softcache_shards"


def crc32c(data: Any) -> int:
    """crc32c of bytes or of any buffer (a numpy array, a memoryview), without a copy of a contiguous one."""
    return int(google_crc32c.value(data if isinstance(data, bytes) else np.ascontiguousarray(data)))


def manifest_sha256(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def build_record(manifest: dict[str, Any], layout: dict[str, tuple[tuple[int, ...], str]], shard_samples: int,
                 shards: dict[str, list[list[int]]]) -> dict[str, Any]:
    return {"manifest_sha256": manifest_sha256(manifest), "shard_samples": shard_samples,
            "arrays": {name: {"shape": list(shape), "dtype": dtype, "shards": shards[name]}
                       for name, (shape, dtype) in layout.items()}}


def shard_span(record: dict[str, Any], name: str, k: int) -> str:
    n, s = record["arrays"][name]["shape"][0], record["shard_samples"]
    return f"array '{name}' samples {k * s}-{min(k * s + s, n)}"


def problems(reader: Any, record: dict[str, Any] | None, *, checksums: bool) -> list[str]:
    """What is missing or changed in the cache `reader` opened, one phrase each (empty: all accounted for).

    `reader` provides `manifest`, `array_meta(name) -> (shape, dtype) | None`, `shard_sizes(name, count)`
    (stored size per shard, None where missing) and `shard_bytes(name, k)` (the shard's stored bytes)."""
    if record is None:
        return ["its shard record (root attribute 'softcache_shards') is missing"]
    found = []
    if manifest_sha256(reader.manifest) != record["manifest_sha256"]:
        found.append("its manifest was changed after the dump (its hash differs from the one recorded at commit)")
    for name, entry in record["arrays"].items():
        meta = reader.array_meta(name)
        if meta is None:
            found.append(f"array '{name}' is missing (its metadata or data is gone)")
            continue
        shape, dtype = meta
        if list(shape) != entry["shape"] or str(dtype) != entry["dtype"]:
            found.append(f"array '{name}' is {list(shape)} {dtype}, recorded as {entry['shape']} {entry['dtype']}")
            continue
        sizes = reader.shard_sizes(name, len(entry["shards"]))
        if sizes is None:  # a backend that knows only the array's total (HDF5)
            total = reader.stored_size(name)
            if total != sum(size for size, _ in entry["shards"]):
                found.append(f"array '{name}' holds {total} stored bytes, recorded as "
                             f"{sum(size for size, _ in entry['shards'])}")
                continue
            sizes = [size for size, _ in entry["shards"]]
        for k, ((size, crc), stored) in enumerate(zip(entry["shards"], sizes)):
            if stored is None:
                found.append(f"{shard_span(record, name, k)}: its shard is missing")
            elif stored != size:
                found.append(f"{shard_span(record, name, k)}: its shard is {stored} bytes, recorded as {size}")
            elif checksums and crc32c(reader.shard_bytes(name, k)) != crc:
                found.append(f"{shard_span(record, name, k)}: its shard fails the crc32c recorded at commit")
    return found
