"""The README's Python example: a user's own dataset object and model, no spec strings."""
from __future__ import annotations

import json

import torch
import torchvision

from softcache.config import OptimConfig
from softcache.data import from_dataset
from softcache.dump import dump_teacher
from softcache.losses import resolve_weights
from softcache.store import open_cache
from softcache.train import train_student
from softcache.views import Augment


def test_own_dataset_and_models_from_python(tmp_path):
    # FakeData renders random PIL images locally (no download), of a size unlike CIFAR's.
    make = lambda seed: torchvision.datasets.FakeData(size=12, image_size=(3, 40, 48), num_classes=3,
                                                      random_offset=seed)
    classes = ["a", "b", "c"]
    train, test = from_dataset(make(0), classes, name="fake"), from_dataset(make(100), classes, name="fake-test")
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=3).eval()
    dump_teacher(teacher, train, tmp_path / "cache", augment=Augment("imagenet", image_size=32), views=2,
                 layers=["layer4"], workers=0)
    cache = open_cache(tmp_path / "cache")
    assert cache.shape("features/layer4") == (12, 2, 512, 1, 1)
    boxes = cache.read("views/box")
    assert (boxes[..., 0] + boxes[..., 2] <= 40).all() and (boxes[..., 1] + boxes[..., 3] <= 48).all()

    losses = {}
    for path in ("auto", "stream"):  # resized views: a DataLoader replays them; targets in memory, or streamed
        torch.manual_seed(1)
        student = torchvision.models.resnet18(num_classes=3)
        losses[path] = []
        summary = train_student(student, tmp_path / "cache", train, test, tmp_path / path,
                                weights=resolve_weights(["kd", "at"], alpha=0.9, beta=1000, hint_weight=100),
                                pairs={"layer4": "layer4"}, image_size=48, data_path=path,
                                optim=OptimConfig(epochs=2, batch_size=4, workers=0),
                                on_step=lambda step, terms, rec=losses[path]: rec.append(terms))
        metrics = json.loads((tmp_path / path / "metrics.jsonl").read_text().splitlines()[-1])
        assert {"train_kd", "train_at", "train_ce"} <= set(metrics) and summary["epochs"] == 2
    assert len(losses["auto"]) == 6 and losses["auto"] == losses["stream"]
