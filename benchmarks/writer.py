"""Cache writer throughput (host only) on real teacher outputs, per compression setting and writer threads.

Reads `--samples` samples of a cache's logits and one feature layer (attention maps are computed from the
features), then writes each as a cache array through the real writer (ShardWriter + zarr ShardingCodec, Blosc,
crc32c) with each candidate Blosc setting, with 1 writer thread and with every core, in interleaved rounds.
Reports the median MB/s (raw bytes in) and the compression ratio.

    python benchmarks/writer.py --cache runs/bench/cache_r20 --layer layer3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from softcache.bench import timed_rate, writer_measurement
from softcache.dump import usable_cores
from softcache.losses import attention_map
from softcache.store import Existing, array_layout, open_cache, prepare_cache, zarr_store

CANDIDATES = {"zstd clevel 3 (format 2)": {"cname": "zstd", "clevel": 3},
              "zstd clevel 1": {"cname": "zstd", "clevel": 1},
              "lz4 clevel 5": {"cname": "lz4", "clevel": 5}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--layer", default="layer3")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cache = open_cache(args.cache)
    features = cache.read(f"features/{args.layer}", 0, args.samples)      # [M, V, C, H, W]
    m, v = features.shape[:2]
    flat = torch.from_numpy(features.reshape(m * v, *features.shape[2:]))
    arrays = {"logits": cache.read("logits", 0, args.samples).reshape(m * v, -1),
              f"features {args.layer}": flat.numpy(),
              f"attention {args.layer}": attention_map(flat).view(m * v, *flat.shape[2:]).half().numpy()}
    cores = usable_cores()
    scratch = Path(tempfile.mkdtemp())
    rows, ratios = {}, {}
    for setting, blosc in CANDIDATES.items():
        for kind, per_view in arrays.items():
            for threads in sorted({1, cores}):
                rows[(setting, kind, threads)] = (blosc, writer_measurement(kind, per_view, v, threads, scratch,
                                                                            cache.shape("labels")[0]))
    rates: dict = {key: [] for key in rows}
    for _ in range(args.rounds):
        for key, (blosc, measurement) in rows.items():
            zarr_store.BLOSC = blosc
            rates[key].append(timed_rate(measurement, torch.device("cpu")))
    for setting, blosc in CANDIDATES.items():  # compression ratio: one write kept on disk
        zarr_store.BLOSC = blosc
        for kind, per_view in arrays.items():
            out = Path(tempfile.mkdtemp(dir=scratch))
            layout = array_layout(m, v, {"target": (per_view.shape[1:], str(per_view.dtype))})
            del layout["views/box"], layout["views/flip"]
            writer = prepare_cache(out / "c", layout, {"id": "x", "storage": {}}, existing=Existing("new"),
                                   backend="zarr")
            writer.write(0, {"labels": np.zeros(m, np.int64), "target": per_view.reshape(m, v, *per_view.shape[1:])})
            writer.finish()
            stored = sum(f.stat().st_size for f in (out / "c" / "target").rglob("*") if f.is_file())
            ratios[(setting, kind)] = per_view.nbytes / stored
    print(f"{m} samples x {v} views of {args.cache}; {cores} cores; median of {args.rounds} interleaved rounds")
    print(f"{'setting':<26} {'array':<20} {'ratio':>6} {'MB/s 1 thread':>14} {'MB/s all':>10}")
    for setting in CANDIDATES:
        for kind in arrays:
            one = statistics.median(rates[(setting, kind, 1)])
            every = statistics.median(rates[(setting, kind, cores)])
            print(f"{setting:<26} {kind:<20} {ratios[(setting, kind)]:>5.2f}x {one:>14,.0f} {every:>10,.0f}")


if __name__ == "__main__":
    main()
