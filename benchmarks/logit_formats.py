"""Bytes per sample and KD-loss bias of the compact logit formats, measured on real caches.

    python benchmarks/logit_formats.py --teacher resnet20 --weights T.pt --student resnet8 \
        --student-weights S.pt --data imagefolder:data/cifar10-sub --out runs/bench/formats

Dumps the same views once per format (fp16, bf16, topk:1/3/5, sampled:5), then computes, over every cached
(sample, view) pair, the KD loss of a fixed student against each format's targets and compares it with the
loss against the fp32 logits. Prints a markdown table and writes it as JSON next to the caches.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from softcache.data import load_source
from softcache.device import teacher_outputs
from softcache.dump import dump_teacher
from softcache.losses import KDLoss
from softcache.models import Tapped, build_model, load_weights
from softcache.store import open_cache
from softcache.batches import CacheTargets
from softcache.views import Augment, ReplayViews

FORMATS = ["fp32", "fp16", "bf16", "topk:1", "topk:3", "topk:5", "sampled:5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--student-weights", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    source = load_source(args.data, "train")
    classes = len(source.classes)
    teacher = load_weights(build_model(args.teacher, classes), args.weights).eval()
    student = Tapped(load_weights(build_model(args.student, classes), args.student_weights).eval(), [])
    out = Path(args.out)
    rows = []
    for fmt in FORMATS:
        cache_path = out / fmt.replace(":", "")
        dump_teacher(teacher, source, cache_path, augment=Augment("cifar", image_size=32), views=args.views,
                     logits=fmt, workers=1, batch_size=512)
        cache = open_cache(cache_path)
        logit_bytes = sum(r["bytes"] for r in cache.describe() if r["name"].startswith("logits"))
        rows.append({"format": fmt, "logits_bytes_per_sample": logit_bytes / len(source),
                     "cache_bytes_per_sample": sum(r["bytes"] for r in cache.describe()) / len(source)})

    # The student's logits on every stored view, computed once (the views are the same in every cache).
    ref = open_cache(out / "fp32")
    n, v = ref.shape("views/flip")
    replay = ReplayViews(source, ref.read("views/box"), ref.read("views/flip"), 32)
    index = np.repeat(np.arange(n), v)
    view = np.tile(np.arange(v), n)
    student_logits = []
    for lo in range(0, len(index), 1024):
        batch = torch.stack([replay[(int(i), int(k))][0] for i, k in zip(index[lo:lo + 1024], view[lo:lo + 1024])])
        student_logits.append(teacher_outputs(student, batch, mean=source.mean, std=source.std,
                                              device=torch.device("cpu"))[0].float())
    s = torch.cat(student_logits)
    idx_t, view_t = torch.from_numpy(index), torch.from_numpy(view)
    for temperature in (1.0, 4.0):
        kd = KDLoss(temperature)
        full = None
        for row in rows:
            targets = CacheTargets(open_cache(out / row["format"].replace(":", "")), [], torch.device("cpu"),
                                   temperature=temperature if not row["format"].startswith("sampled") else 4.0)
            if row["format"].startswith("sampled") and temperature != 4.0:
                continue
            per_pair = []
            for lo in range(0, len(index), 4096):
                target, _ = targets(None, idx_t[lo:lo + 4096], view_t[lo:lo + 4096])
                per_pair.append(kd.from_target(s[lo:lo + 4096], target).item() * len(idx_t[lo:lo + 4096]))
            loss = sum(per_pair) / len(index)
            full = loss if row["format"] == "fp32" else full
            row[f"kd_T{temperature:g}"] = loss
            row[f"bias_T{temperature:g}_%"] = 100.0 * (loss - full) / full
    (out / "formats.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{n} samples x {v} views, {classes} classes; KD loss of {args.student} against {args.teacher}")
    print("| format | logits B/sample | cache B/sample | KD T=1 | bias T=1 | KD T=4 | bias T=4 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t1 = f"{r['kd_T1']:.4f} | {r['bias_T1_%']:+.2f}%" if "kd_T1" in r else "– | –"
        print(f"| {r['format']} | {r['logits_bytes_per_sample']:.1f} | {r['cache_bytes_per_sample']:.1f} | {t1} | "
              f"{r['kd_T4']:.4f} | {r['bias_T4_%']:+.2f}% |")


if __name__ == "__main__":
    main()
