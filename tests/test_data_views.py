"""Datasets by spec, fingerprints, and the view policies."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from softcache.data import load_source, render_synthetic
from softcache.errors import SoftcacheError
from softcache.views import Augment, apply_view, replay_slot


def test_synthetic_is_deterministic_balanced_and_varied():
    a, b = load_source("synthetic:50", "train"), load_source("synthetic:50", "train")
    assert np.array_equal(a.images, b.images) and a.fingerprint() == b.fingerprint()
    assert np.bincount(a.labels).tolist() == [5] * 10
    assert a.fingerprint() != load_source("synthetic:60", "train").fingerprint()
    assert len(load_source("synthetic:50", "test")) == 10
    image, label = a[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 3
    # two images of one class differ (position, scale, colour, noise)
    assert not np.array_equal(render_synthetic(0, "train")[0], render_synthetic(10, "train")[0])


def test_imagefolder_reads_the_real_cifar_subset(cifar_subset):
    train = load_source(f"imagefolder:{cifar_subset}", "train")
    test = load_source(f"imagefolder:{cifar_subset}", "test")
    assert len(train) == 120 and len(test) == 40
    assert train.classes[:3] == ["airplane", "automobile", "bird"]
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 0
    fp = train.fingerprint()
    assert fp["num_samples"] == 120 and fp["classes"] == train.classes and fp != test.fingerprint()


@pytest.mark.parametrize("spec, message", [
    ("imagefolder:/nonexistent/x", "does not exist"),
    ("mnist", "unknown dataset 'mnist'; valid: cifar10"),
    ("synthetic:abc", "synthetic takes a training-set size"),
    ("cifar10:/nonexistent/cifar", "pass --download"),
])
def test_bad_dataset_specs_say_what_would_be_right(spec, message):
    with pytest.raises(SoftcacheError, match=message):
        load_source(spec, "train")


def test_sampled_views_are_a_function_of_the_key():
    aug = Augment("cifar")
    b1, f1 = aug.sample_views(32, 32, 6, (0, 5))
    b2, f2 = aug.sample_views(32, 32, 6, (0, 5))
    b3, _ = aug.sample_views(32, 32, 6, (0, 6))
    assert np.array_equal(b1, b2) and np.array_equal(f1, f2) and not np.array_equal(b1, b3)
    assert len({(tuple(b), f) for b, f in zip(b1.tolist(), f1.tolist())}) == 6  # distinct views


def test_imagenet_views_stay_inside_the_image_and_resize():
    aug = Augment("imagenet", image_size=24)
    boxes, flips = aug.sample_views(40, 50, 20, (1, 2))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 50).all()
    assert 0 < flips.sum() < 20
    view = apply_view(torch.zeros(3, 40, 50, dtype=torch.uint8), boxes[0], bool(flips[0]), 24)
    assert view.shape == (3, 24, 24)


def test_view_count_rules():
    assert Augment("cifar").resolve_views("all") == 162
    assert Augment("none").resolve_views("all") == 1
    with pytest.raises(SoftcacheError, match="needs a finite policy"):
        Augment("imagenet").resolve_views("all")
    with pytest.raises(SoftcacheError, match="exceeds the 162 distinct views"):
        Augment("cifar").resolve_views(200)
    with pytest.raises(SoftcacheError, match="positive number or 'all'"):
        Augment("cifar").resolve_views("many")


def test_stored_views_are_a_function_of_seed_and_sample_only():
    aug = Augment("cifar")
    boxes, flips = aug.stored_views(32, 32, 8, seed=3, indices=np.arange(200))
    for i in (0, 63, 64, 199):  # alone, or in any company, a sample draws the same views
        b, f = aug.stored_views(32, 32, 8, seed=3, indices=np.asarray([i]))
        assert np.array_equal(b[0], boxes[i]) and np.array_equal(f[0], flips[i])
    assert len({(tuple(b), f) for b, f in zip(boxes[5].tolist(), flips[5].tolist())}) == 8  # distinct views
    other, _ = aug.stored_views(32, 32, 8, seed=4, indices=np.arange(200))
    assert not np.array_equal(other, boxes)


def test_views_all_are_stored_in_a_random_order_per_sample():
    aug = Augment("cifar")
    boxes, flips = aug.stored_views(32, 32, 162, seed=0, indices=np.arange(500))
    every = {(t, left, f) for t in range(-4, 5) for left in range(-4, 5) for f in (False, True)}
    for i in (0, 499):
        assert {(int(b[0]), int(b[1]), bool(f)) for b, f in zip(boxes[i], flips[i])} == every
    # slot 0 holds a uniform draw of the 162 views: over 500 samples it takes many different ones
    assert len({(int(b[0]), int(b[1]), bool(f)) for b, f in zip(boxes[:, 0], flips[:, 0])}) > 100


def test_replay_slot_cycles_through_every_view_and_depends_on_seed():
    slots = [replay_slot(5, seed=1, epoch=e) for e in range(10)]
    assert sorted(slots[:5]) == list(range(5)) and slots[:5] == slots[5:]
    assert {replay_slot(5, seed=s, epoch=0) for s in range(20)} == set(range(5))


def test_folder_images_decode_to_the_pixels_pil_gives(cifar_subset):
    from torchvision.transforms.v2 import functional as TF
    train = load_source(f"imagefolder:{cifar_subset}", "train")
    batch = train.images(range(len(train)))
    for i in range(len(train)):
        pil = TF.pil_to_tensor(train.folder.loader(train.folder.samples[i][0]))
        assert torch.equal(batch[i], pil) and torch.equal(train[i][0], pil), i


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_all_hands_images_over_in_batches(cifar_subset, monkeypatch, workers):
    from softcache import resident
    monkeypatch.setattr(resident, "DECODE_BATCH", 32)
    calls = []
    real = resident._DecodeBatches.__getitem__
    monkeypatch.setattr(resident._DecodeBatches, "__getitem__",
                        lambda self, idx: calls.append(len(idx)) or real(self, idx))
    train = load_source(f"imagefolder:{cifar_subset}", "train")
    images = resident.decode_all(train, workers)
    assert torch.equal(images, torch.stack([train[i][0] for i in range(len(train))]))
    if workers == 0:  # in workers the calls happen in other processes; there the output shows the same
        assert calls == [32, 32, 32, 24]  # 120 images in 4 transfers, not 120
    some = resident.decode_all(train, workers, indices=range(50, 120))
    assert torch.equal(some, images[50:])


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_all_reports_images_of_mixed_sizes(tmp_path, workers):
    from PIL import Image
    from softcache.resident import decode_all
    for split in ("train", "test"):
        for k, size in enumerate([(32, 32), (32, 32), (40, 24)]):
            folder = tmp_path / split / f"class{k % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (k * 60, 10, 200)).save(folder / f"{k}.png")
    source = load_source(f"imagefolder:{tmp_path}", "train")
    assert [tuple(source[i][0].shape) for i in range(3)] == [(3, 32, 32), (3, 24, 40), (3, 32, 32)]
    assert decode_all(source, workers) is None


def test_test_labels_follow_the_training_classes_by_name(tmp_path):
    from PIL import Image
    from softcache.batches import eval_batches
    from softcache.training.loop import evaluate
    layout = {"train": {"ant": 2, "bee": 2, "cat": 2}, "test": {"bee": 3, "cat": 1}}  # the test split has no ants
    for split, counts in layout.items():
        for name, count in counts.items():
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / split / name / f"{k}.png")
    train, test = load_source(f"imagefolder:{tmp_path}", "train"), load_source(f"imagefolder:{tmp_path}", "test")
    assert test.classes == train.classes == ["ant", "bee", "cat"]
    assert test.labels.tolist() == [1, 1, 1, 2]  # bee and cat keep the training split's numbers

    class Says(torch.nn.Module):  # a known model: always answers "bee"
        def forward(self, x):
            return torch.tensor([0.0, 1.0, 0.0]).expand(len(x), 3)

    batches = eval_batches(test, Augment("none", image_size=8), batch_size=2, workers=0, device=torch.device("cpu"))
    accuracy, _ = evaluate(Says(), batches, mean=test.mean, std=test.std, device=torch.device("cpu"))
    assert accuracy == 75.0  # 3 bees of 4 (numbering the test split's own folders would give 0%)
    (tmp_path / "test" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "dog" / "0.png")
    with pytest.raises(SoftcacheError, match="class folder 'dog', which the training split does not have"):
        load_source(f"imagefolder:{tmp_path}", "test")


def test_images_of_several_sizes_are_refused_without_an_image_size_and_never_shrunk(tmp_path, cifar_subset,
                                                                                     teacher_weights):
    """One 16 x 16 image first in a 32 x 32 ImageFolder once made the whole cache 16 x 16."""
    import shutil

    from click.testing import CliRunner
    from PIL import Image

    from softcache.cli import cli
    from softcache.store import open_cache
    data = tmp_path / "data"
    shutil.copytree(cifar_subset, data)
    small = data / "train" / "airplane" / "0000.jpg"
    Image.open(small).resize((16, 16)).save(small)
    args = ["dump-teacher", "--teacher", "resnet8", "--weights", str(teacher_weights), "--data", f"imagefolder:{data}",
            "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "cache")]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.output
    assert "images have 2 sizes: 32x32 (119, e.g." in refused.stderr and f"16x16 (1, e.g. {small})" in refused.stderr
    assert "--image-size" in refused.stderr and not (tmp_path / "cache").exists()

    done = CliRunner().invoke(cli, [*args, "--image-size", "32"])
    assert done.exit_code == 0, done.output
    cache = open_cache(tmp_path / "cache")
    assert cache.manifest["augment"]["image_size"] == 32
    assert cache.read("views/box", 0, 2)[:, 0, 2:].tolist() == [[16, 16], [32, 32]]  # boxes in each image's pixels
