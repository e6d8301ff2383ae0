"""Replaying pixel work and mixing from a cache against running the same pipeline online, and what the view
records cost on disk.

Dumps (or reuses) a cache of `--views` views per sample with `--aa`, `--reprob`, `--mixup`, `--cutmix` on the
`cifar` crops (teacher: an untrained tiny CNN; its outputs do not matter here), then times one pass over the
training set through a DataLoader with `--workers` workers and batches of 128, each way:

    online      AugmentedViews: decode + crop + pipeline + mix (the partner decoded and augmented too), fresh draws
    replay      ReplayViews from the cache's records, every view (and partner) checked against its CRC-32
    unchecked   the same replay without the checksums (what the check costs)

and prints the bytes per view of the records and of the logits, stored (compressed) and raw.

    python benchmarks/augment_replay.py --data imagefolder:data/cifar10-jpeg --out runs/bench/augment
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from softcache.data import load_source
from softcache.dump import dump_teacher
from softcache.mixing import Mix
from softcache import views as views_module
from softcache.pixels import checksum
from softcache.pixels import Pixels
from softcache.store import open_cache
from softcache.targets import LogitsFormat
from softcache.views import Augment, AugmentedViews, KeyBatches, ReplayViews, replay_slot


class TinyTeacher(torch.nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def one_pass(dataset: torch.utils.data.Dataset, keys, n: int, workers: int, batch_size: int) -> float:
    """Images per second of one pass over `n` samples (keys from `keys(epoch, order)`), the loader's start included."""
    batches = KeyBatches(n, batch_size, seed=0, shuffle=True, drop_last=True, key_fn=keys)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers)
    started, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch[0])
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="imagefolder:data/cifar10-jpeg")
    parser.add_argument("--out", default="runs/bench/augment")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--aa", default="rand-m9-n2")
    parser.add_argument("--reprob", type=float, default=0.25)
    parser.add_argument("--mixup", type=float, default=0.8)
    parser.add_argument("--cutmix", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2, help="passes per way, alternated; the best is reported")
    parser.add_argument("--rounds", type=int, default=9, help="in-process rounds of the checksum comparison")
    args = parser.parse_args()
    source = load_source(args.data, "train")
    n = len(source)
    augment = Augment("cifar", image_size=32, pixels=Pixels(auto_augment=args.aa, reprob=args.reprob),
                      mix=Mix(args.mixup, args.cutmix))
    torch.manual_seed(0)
    started = time.perf_counter()
    dump_teacher(TinyTeacher(len(source.classes)), source, args.out, augment=augment, views=args.views, seed=0,
                 workers=args.workers, teacher_info={"arch": "tiny", "weights_sha256": "bench"})
    print(f"dump (or reuse) of {n:,} x {args.views} views ({augment.describe()}): "
          f"{time.perf_counter() - started:.1f} s")
    cache = open_cache(args.out)

    slot = replay_slot(args.views, seed=0, epoch=0)
    ways = {
        "online": (AugmentedViews(source, augment, seed=0), lambda epoch, order: [(int(i), 0) for i in order]),
        "replay": (ReplayViews.from_cache(cache, source), lambda epoch, order: [(int(i), slot) for i in order]),
        "unchecked": (ReplayViews.from_cache(cache, source, verify=False),
                      lambda epoch, order: [(int(i), slot) for i in order]),
    }
    rates: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.repeat):
        for way, (dataset, keys) in ways.items():
            rates[way].append(one_pass(dataset, keys, n, args.workers, args.batch_size))
    if args.repeat:  # --repeat 0: only the in-process comparison below
        best = {way: max(r) for way, r in rates.items()}
        print(f"\none pass over {n:,} samples, {args.workers} workers, batches of {args.batch_size} "
              f"(best of {args.repeat})")
        print("| way | images/s | all passes | vs online |\n|---|---|---|---|")
        for way, r in rates.items():
            passes = ", ".join(f"{x:,.0f}" for x in r)
            print(f"| {way} | {best[way]:,.0f} | {passes} | {best[way] / best['online']:.3f} |")
        print(f"\nchecksum cost: {1 - best['replay'] / best['unchecked']:+.1%} of the unchecked replay's rate "
              "(DataLoader passes)")
    # The same in one process, without the loader's noise: seconds per replayed view, checked and unchecked,
    # over the same 2,000 views, in interleaved rounds
    keys = [(int(i), slot) for i in np.random.default_rng(0).permutation(n)[:2000]]
    seconds: dict[str, list[float]] = {"replay": [], "unchecked": []}
    for _ in range(args.rounds):
        for way in seconds:
            dataset = ways[way][0]
            started = time.perf_counter()
            for key in keys:
                dataset[key]
            seconds[way].append((time.perf_counter() - started) / len(keys))
    checked, unchecked = (float(np.median(seconds[w])) for w in ("replay", "unchecked"))
    print(f"in one process, {len(keys):,} views, median of {args.rounds} rounds: {checked * 1e6:,.0f} µs a view "
          f"checked, {unchecked * 1e6:,.0f} µs unchecked ({checked / unchecked - 1:+.1%}; rounds spread "
          f"{(max(seconds['replay']) - min(seconds['replay'])) / checked:.0%})")
    # the checks' own share of a checked replay, timed inside it: what the end-to-end difference cannot resolve
    spent = [0.0]

    def timed(view: torch.Tensor) -> int:
        began = time.perf_counter()
        out = checksum(view)
        spent[0] += time.perf_counter() - began
        return out
    views_module.checksum = timed
    started = time.perf_counter()
    for key in keys:
        ways["replay"][0][key]
    total = time.perf_counter() - started
    views_module.checksum = checksum
    print(f"time inside the checks during a checked replay of {len(keys):,} views: {spent[0] * 1e3:.1f} ms of "
          f"{total * 1e3:,.0f} ms ({spent[0] / total:.2%})")
    view = ways["replay"][0][keys[0]][0]
    started = time.perf_counter()
    for _ in range(10_000):
        checksum(view)
    print(f"one CRC-32 of a [3, 32, 32] view: {(time.perf_counter() - started) / 10_000 * 1e6:.1f} µs (a mixed view "
          "is checked three times: itself, its partner, the mix)")

    views = n * args.views
    records = [name for name in cache.names() if name.startswith("views/")]
    print(f"\nbytes per view ({views:,} views), stored (compressed) and raw:")
    print("| array | stored B/view | raw B/view |\n|---|---|---|")
    total_stored = total_raw = 0.0
    for name in [*records, *[a for a in cache.names() if a.startswith("logits")]]:
        stored = cache.bytes_on_disk(name) / views
        raw = int(np.prod(cache.shape(name)[2:], dtype=np.int64)) * cache.dtype(name).itemsize
        print(f"| {name} | {stored:.2f} | {raw} |")
        if name in records:
            total_stored, total_raw = total_stored + stored, total_raw + raw
    logits = sum(cache.bytes_on_disk(a) for a in cache.names() if a.startswith("logits")) / views
    print(f"| all view records | {total_stored:.2f} | {total_raw:.0f} |")
    print(f"records / logits-only (fp16, {len(source.classes)} classes): {total_stored / logits:.1%} stored")
    for k in (1000,):
        for fmt in ("fp16", "topk:10"):
            per_view = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                           for shape, dtype in LogitsFormat.parse(fmt).arrays(k).values())
            print(f"{k} classes, {fmt}: {per_view} B/view raw logits; records {total_stored:.1f} B/view stored "
                  f"-> 1,281,167 x {args.views} views: {1_281_167 * args.views * (per_view + total_stored) / 2**30:.1f}"
                  f" GiB (logits raw + records)")


if __name__ == "__main__":
    main()
