"""Streaming target reader: targets/s with 1 and with N read threads, and what an epoch reads against what it
uses, on an existing cache (the reader alone: no student, no images).

It counts the bytes of the chunks decoded (whole chunks, raw), the bytes fetched from storage (compressed,
shard indexes included) and the bytes delivered (the rows handed to training), and compares the fetched bytes
per epoch's worth of rows read (the reader runs ahead into the next epoch) with 1/V of the arrays' bytes on
disk.

    python benchmarks/streaming.py --cache runs/bench/cache8 --layers layer3 --epochs 2
"""
from __future__ import annotations

import argparse
import time

import torch

from softcache import streaming
from softcache.batches import STREAM_WINDOW, CacheTargets
from softcache.store import open_cache
from softcache.streaming import StreamingTargets, window_order
from softcache.views import replay_slot


def run(path: str, layers: list[str], epochs: int, threads: int, batch_size: int) -> dict[str, float]:
    cache = open_cache(path)
    n, views = cache.shape("views/flip")
    block = cache.chunk_samples("labels")
    cached = CacheTargets(cache, layers, torch.device("cpu"), resident=False)
    reader = StreamingTargets(cache, cached.needed, block=block, device=torch.device("cpu"), threads=threads,
                              order=lambda e: window_order(n, block=block, window=STREAM_WINDOW, seed=0, epoch=e),
                              slot=lambda e: replay_slot(views, seed=0, epoch=e), assemble=lambda rows: rows)
    on_disk = sum(row["bytes"] for row in cache.describe() if row["name"] in cached.needed)
    empty = torch.empty(0)
    started = time.perf_counter()
    for epoch in range(epochs):
        reader.set_epoch(epoch)
        for _ in range(0, n - batch_size + 1, batch_size):
            reader(empty, torch.empty(batch_size), empty)
    elapsed = time.perf_counter() - started
    reader.close()
    delivered = reader.delivered_bytes
    return {"targets_per_s": epochs * (n // batch_size) * batch_size / elapsed, "views": views,
            "decoded/delivered": cache.decoded_bytes / delivered,
            # per epoch's worth of rows read (the reader reads ahead into the next epoch)
            "fetched/(on disk / V)": cache.fetched_bytes / (reader.read_rows / n * on_disk / views),
            "fetched MB/epoch": cache.fetched_bytes / (reader.read_rows / n) / 2**20, "on disk MB": on_disk / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--layers", default="", help="comma-separated teacher layers to stream besides the logits")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, streaming.READ_THREADS])
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    layers = [x for x in args.layers.split(",") if x]
    for threads in args.threads:
        r = run(args.cache, layers, args.epochs, threads, args.batch_size)
        print(f"{args.cache} ({r['views']} views, {', '.join(['logits', *layers])}), {threads} read thread(s): "
              f"{r['targets_per_s']:,.0f} targets/s; per epoch fetched {r['fetched MB/epoch']:.1f} MB of "
              f"{r['on disk MB']:.1f} MB on disk: fetched / (on disk / V) = {r['fetched/(on disk / V)']:.3f}, "
              f"decoded / delivered = {r['decoded/delivered']:.3f}")


if __name__ == "__main__":
    main()
