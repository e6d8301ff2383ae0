"""The cost of one training step of each loss term (issue 20's table), against plain CE, on this machine.

A CIFAR ResNet-20 student (ResNet-8x4 with --wide) at batch 64, 32 px, one step = forward, every term, backward,
SGD; the teacher's targets are tensors of the cached shapes (a ResNet-56's, or ResNet-32x4's with --wide: logits,
the stages after and before their ReLU, the embedding, the input-gradient map, a strong view for mlkd), so the
figure is the student side only, which is all a cached run pays. Medians of --steps steps after two warm-up
steps, terms interleaved over --rounds rounds.

    python benchmarks/methods_step.py [--wide] [--steps 10] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from softcache.losses import DistillLoss, resolve_weights, route_pairs
from softcache.losses.logit import MLKDLoss  # noqa: F401  (imported for its registry entry)
from softcache.models import INPUT_GRADIENT, Tapped, build_model, input_gradient_map

STAGES = [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
PRE = [(f"{s}.pre_relu", f"{t}.pre_relu") for s, t in STAGES]
RUNS = {  # name: (losses, pairs)
    "ce": (["ce"], []), "kd": (["kd"], []), "dkd": (["ce", "dkd"], []), "dist": (["ce", "dist"], []),
    "mlkd": (["mlkd"], []), "kd --kd-standardize": (["kd"], []), "kd --learn-temperature": (["kd"], []),
    "at": (["ce", "at"], STAGES), "fitnets": (["ce", "fitnets"], [("layer2", "layer2")]),
    "vid": (["ce", "vid"], STAGES), "cc": (["ce", "cc"], [("embedding", "embedding")]),
    "crd": (["ce", "crd"], [("embedding", "embedding")]), "gram": (["ce", "gram"], [("layer3", "layer3")]),
    "fsp": (["ce", "fsp"], STAGES), "kdsvd": (["ce", "kdsvd"], STAGES),
    "reviewkd": (["ce", "reviewkd"], [(s, f"{t}.pre_relu") for s, t in STAGES] + [("embedding", "embedding")]),
    "ab": (["ce", "ab"], PRE), "ft": (["ce", "ft"], [("layer3", "layer3")]), "ofd": (["ce", "ofd"], PRE),
    "gat": (["ce", "gat"], []),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wide", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    student_name, teacher_name, classes, b = ("resnet8x4", "resnet32x4", 100, 64) if args.wide else \
        ("resnet20", "resnet56", 100, 64)
    torch.manual_seed(0)
    x, labels = torch.randn(b, 3, 32, 32), torch.randint(0, classes, (b,))
    teacher = Tapped(build_model(teacher_name, classes).eval(), [t for _, t in STAGES + PRE] + ["embedding",
                                                                                                 INPUT_GRADIENT])
    with torch.no_grad():
        t_logits, t_feat = teacher(x)
    t_strong = t_logits + torch.randn_like(t_logits)
    times: dict[str, list[float]] = {name: [] for name in RUNS}
    setups = {}
    for name, (losses, pairs) in RUNS.items():
        student = build_model(student_name, classes)
        tapped = Tapped(student, sorted({s for s, _ in pairs}))
        with torch.no_grad():
            _, probe = tapped(x[:2])
        kinds = {(s, t): "vector" if t == "embedding" else "map" for s, t in pairs}
        channels = {(s, t): (probe[s].shape[1], t_feat[t].shape[1]) for s, t in pairs}
        weights = resolve_weights(losses, alpha=0.9, beta=1000.0, hint_weight=100.0)
        criterion = DistillLoss(weights, routes=route_pairs(list(weights), pairs, kinds), channels=channels,
                                labels=(torch.arange(50000) % classes).tolist(), kinds=kinds,
                                standardize="standardize" in name, learn_temperature="temperature" in name,
                                options={t: {"init_epochs": 0} for t in ("ab", "ft", "fsp")},
                                teacher_params={f"bn/{t}/{k}": torch.rand(t_feat[t].shape[1])
                                                for _, t in PRE for k in ("weight", "bias")})
        opt = torch.optim.SGD(list(tapped.parameters()) + list(criterion.parameters()), lr=0.01, momentum=0.9)
        setups[name] = (tapped, criterion, opt)

    def step(name: str) -> float:
        tapped, criterion, opt = setups[name]
        started = time.perf_counter()
        inputs = x.clone().requires_grad_(criterion.input_gradient)
        logits, feats = tapped(inputs)
        if criterion.input_gradient:
            score = logits.gather(1, t_logits.argmax(1)[:, None]).sum()
            (grad,) = torch.autograd.grad(score, inputs, create_graph=True)
            feats = {**feats, INPUT_GRADIENT: input_gradient_map(grad)}
        strong = (tapped(x.flip(-1))[0], t_strong) if "mlkd" in name else None
        out = criterion(logits, labels, feats, t_logits.float(), {k: v.float() for k, v in t_feat.items()},
                        index=torch.arange(b), strong=strong)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        return (time.perf_counter() - started) * 1000

    for name in RUNS:
        step(name), step(name)
    for _ in range(args.rounds):
        for name in RUNS:
            times[name] += [step(name) for _ in range(args.steps)]
    base = statistics.median(times["ce"])
    print(f"{student_name} student ({teacher_name}-shaped targets), batch {b}, {args.threads} threads, "
          f"median of {args.steps * args.rounds} steps")
    print("| term | ms / step | x CE |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
