"""A timm teacher's dump against a torchvision teacher of the same cost: is the zoo's model as cheap to dump?

For each teacher (default: timm's resnet18 and torchvision's resnet18, the same architecture, 1.8 GFLOPs at
224 px), in interleaved rounds: (a) the teacher's forward alone on one fixed batch of normalised views, and (b)
`dump_teacher` of the training split x `--views` views (logits + `--layer`), both in images per second; then
each teacher's dump / inference ratio, and the two ratios' quotient (timm / torchvision).

    python benchmarks/zoo_dump.py --data imagefolder:data/cifar10-5k --rounds 5   # 500 images per class
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from softcache.data import load_source
from softcache.device import model_inputs
from softcache.dump import dump_teacher
from softcache.models import Tapped, build_model, input_norm
from softcache.views import Augment, DumpViews


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", nargs="+", default=["timm:resnet18", "resnet18"])
    p.add_argument("--data", default="imagefolder:data/cifar10-jpeg")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--layer", default="layer3")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    source = load_source(args.data, "train")
    augment = Augment("cifar", image_size=32)
    batch = torch.stack([DumpViews(source, augment, 1, 0)[i][0][0] for i in range(args.batch_size)])
    torch.manual_seed(0)
    teachers = {name: build_model(name, len(source.classes)).eval() for name in args.teachers}
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            for name, model in teachers.items():
                tapped = Tapped(model, [args.layer]).eval()
                x = model_inputs(batch, *input_norm(model, source), torch.device("cpu"))
                with torch.no_grad():
                    tapped(x)  # warm-up
                    began = time.perf_counter()
                    for _ in range(args.steps):
                        tapped(x)
                times.setdefault((name, "inference"), []).append(args.steps * len(x) / (time.perf_counter() - began))
                began = time.perf_counter()
                dump_teacher(model, source, Path(scratch) / f"{name.replace(':', '_')}_{r}", augment=augment,
                             views=args.views, layers=[args.layer], batch_size=args.batch_size,
                             workers=args.workers, teacher_info={"arch": name, "weights_sha256": "bench"})
                times.setdefault((name, "dump"), []).append(len(source) * args.views / (time.perf_counter() - began))
    print(f"{'teacher':<16} {'inference img/s':>16} {'dump img/s':>12} {'dump/inference':>15}  "
          f"(median of {args.rounds})")
    ratios = {}
    for name in teachers:
        infer, dump = (statistics.median(times[(name, k)]) for k in ("inference", "dump"))
        per_round = [d / i for d, i in zip(times[(name, "dump")], times[(name, "inference")])]
        ratios[name] = statistics.median(per_round)
        print(f"{name:<16} {infer:>16,.0f} {dump:>12,.0f} {ratios[name]:>14.3f}x  "
              f"(rounds {min(per_round):.3f}-{max(per_round):.3f})")
    first, second = list(ratios)[:2]
    print(f"{first} / {second} dump-inference ratio: {ratios[first] / ratios[second]:.3f}")


if __name__ == "__main__":
    main()
