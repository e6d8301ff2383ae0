"""Decode rate of `decode_all` (every image of a split into one uint8 tensor) with 0 and N DataLoader workers.

    python benchmarks/decode.py --data imagefolder:data/cifar10-jpeg --workers 0 2
"""
from __future__ import annotations

import argparse
import resource
import time

from softcache.data import load_source
from softcache.resident import decode_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="imagefolder:data/cifar10-jpeg")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeat", type=int, default=2, help="timings per worker count (alternated)")
    args = parser.parse_args()
    source = load_source(args.data, args.split)
    print(f"{len(source)} images of {args.data} ({args.split}); open-file limit "
          f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.repeat):
        for workers in args.workers:
            started = time.perf_counter()
            images = decode_all(source, workers)
            rates[workers].append(len(source) / (time.perf_counter() - started))
    print(f"shape {tuple(images.shape)}")
    for workers, r in rates.items():
        print(f"workers {workers}: {max(r):,.0f} images/s (best of {len(r)}; all: {', '.join(f'{x:,.0f}' for x in r)})")


if __name__ == "__main__":
    main()
