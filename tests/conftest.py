"""Shared fixtures: a real CIFAR-10 JPEG subset, small synthetic caches, tiny teachers."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from softcache.data import load_source
from softcache.dump import dump_teacher
from softcache.models import build_model
from softcache.views import Augment

CIFAR_TARBALL = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory) -> Path:
    """The first 12 training and 4 test JPEGs of every CIFAR-10 class, in ImageFolder layout."""
    if not CIFAR_TARBALL.exists():
        pytest.fail(f"real data missing: {CIFAR_TARBALL} (the shared datasets folder sits beside the checkout)")
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    keep = {"train": 12, "test": 4}
    with tarfile.open(CIFAR_TARBALL, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and int(parts[2].split(".")[0]) < keep[parts[0]]:
                tar.extract(member, root, filter="data")
    return root


@pytest.fixture(scope="session")
def cifar_full(tmp_path_factory) -> Path:
    """The whole CIFAR-10 JPEG set (50,000 training and 10,000 test images) in ImageFolder layout."""
    if not CIFAR_TARBALL.exists():
        pytest.fail(f"real data missing: {CIFAR_TARBALL} (the shared datasets folder sits beside the checkout)")
    root = tmp_path_factory.mktemp("cifar10-full")
    with tarfile.open(CIFAR_TARBALL, "r:gz") as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> Path:
    """A resnet8 teacher for 10 classes (random init, BN statistics made non-trivial), saved as a state_dict."""
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10)
    model.train()
    with torch.no_grad():  # a few forward passes give BN running statistics that are not the identity
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def load_teacher(path: Path) -> torch.nn.Module:
    model = build_model("resnet8", num_classes=10)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, teacher_weights) -> Path:
    """synthetic:20 under the cifar policy, 5 views per sample, logits + layer2 + layer3."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    dump_teacher(load_teacher(teacher_weights), load_source("synthetic:20", "train"), out,
                 augment=Augment("cifar", image_size=32), views=5, layers=["layer2", "layer3"], seed=7,
                 batch_size=32, workers=0, teacher_info={"arch": "resnet8", "weights_sha256": "test"})
    return out
