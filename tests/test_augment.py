"""Pixel work and mixing (softcache.pixels, softcache.mixing): the student replays exactly the pixels the teacher
saw, a changed pipeline is caught by the checksum and named, bad input is one line."""
from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch

from conftest import load_teacher
from helpers import invoke
from softcache import dump as dump_module
from softcache import train as train_module
from softcache.config import OptimConfig
from softcache.data import load_source
from softcache.dump import dump_teacher
from softcache.errors import SoftcacheError
from softcache.losses import resolve_weights
from softcache.losses.response import CELoss
from softcache.mixing import Mix, mix_pixels
from softcache.models import build_model
from softcache.pixels import Pixels, built, parse_auto
from softcache.store import open_cache
from softcache.train import train_online, train_student
from softcache.training.steps import DistillStep
from softcache.views import Augment, AugmentedViews, ReplayViews

VARIANTS = {
    "user pipeline": Augment("user_pipelines:full", image_size=32),
    "user pipeline + mixup/cutmix": Augment("user_pipelines:full", image_size=32, mix=Mix(0.8, 1.0)),
    "cifar + rand-m9-n2, jitter, erasing + mixup/cutmix":
        Augment("cifar", image_size=32, pixels=Pixels(auto_augment="rand-m9-n2", color_jitter=0.4, reprob=0.5),
                mix=Mix(0.8, 1.0, prob=0.8)),
}


def _dump(out, source, augment, monkeypatch=None, seen=None, views=2, **kw):
    """Dump with the resnet8 teacher; with `seen`, record every (sample, view) -> the uint8 pixels it was given."""
    if seen is not None:
        original = dump_module._view_batches

        def recording(dataset, batches, *args, **kwargs):
            for (a, b), item in zip(batches, original(dataset, batches, *args, **kwargs)):
                for i in range(a, b):
                    for v in range(dataset.k):
                        seen[(i, v)] = item[0][(i - a) * dataset.k + v].clone()
                yield item
        monkeypatch.setattr(dump_module, "_view_batches", recording)
    return dump_teacher(kw.pop("teacher"), source, out, augment=augment, views=views, seed=5, batch_size=16,
                        teacher_info={"arch": "resnet8", "weights_sha256": "test"}, **kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_student_sees_the_pixels_the_teacher_saw_for_every_sample_and_epoch(variant, cifar_subset, tmp_path,
                                                                               teacher_weights, monkeypatch):
    augment = VARIANTS[variant]
    source = load_source(f"imagefolder:{cifar_subset}", "train")
    test_source = load_source(f"imagefolder:{cifar_subset}", "test")
    teacher_saw: dict[tuple[int, int], torch.Tensor] = {}
    _dump(tmp_path / "cache", source, augment, monkeypatch, teacher_saw, teacher=load_teacher(teacher_weights),
          workers=2)
    assert len(teacher_saw) == len(source) * 2
    cache = open_cache(tmp_path / "cache")
    assert cache.dtype("views/seed") == np.int64 and cache.dtype("views/crc") == np.uint32
    assert cache.manifest["augment"]["pixel_identity"]["torchvision"]

    student_saw = []

    class Recording(DistillStep):
        def __call__(self, batch):
            student_saw.append((batch[0].clone(), batch[2].tolist(), batch[3].tolist(), batch[4:]))
            return super().__call__(batch)
    monkeypatch.setattr(train_module, "DistillStep", Recording)
    torch.manual_seed(0)
    epochs, batch = 3, 20
    train_student(build_model("resnet8", num_classes=10), cache, source, test_source, tmp_path / "student",
                  weights={"kd": 0.9, "ce": 0.1}, optim=OptimConfig(epochs=epochs, batch_size=batch, workers=2))
    steps = len(source) // batch
    assert len(student_saw) == epochs * steps
    lams = []
    for epoch in range(epochs):
        visited = set()
        for views, index, view, mixed in student_saw[epoch * steps:(epoch + 1) * steps]:
            for pixels, i, v in zip(views, index, view):
                assert torch.equal(pixels, teacher_saw[(i, v)]), (variant, epoch, i, v)
                visited.add(i)
            lams += mixed[1].tolist() if mixed else []
        assert len(visited) == steps * batch  # every sample of the epoch's full batches, once
    # the views are not plain crops, and (with mixing) some are mixed: the equality above is not vacuous
    plain = Augment("none", image_size=32)
    image = source[0][0]
    assert not torch.equal(teacher_saw[(0, 0)], plain.view(image, plain.eval_box(32, 32), False))
    if augment.mix.active:
        assert min(lams) < 1.0 and len(lams) == epochs * steps * batch
        mixes = cache.read("views/mix")
        assert (mixes[..., 0] >= 0).any() and (mixes[..., 4] > 0).any()  # mixed views, some CutMix boxes
    else:
        assert not lams and "views/mix" not in cache.names()


def test_train_online_on_mixed_cached_views_gives_the_cached_loss_values(cifar_subset, tmp_path, teacher_weights):
    source = load_source(f"imagefolder:{cifar_subset}", "train")
    test_source = load_source(f"imagefolder:{cifar_subset}", "test")
    augment = VARIANTS["user pipeline + mixup/cutmix"]
    _dump(tmp_path / "cache", source, augment, teacher=load_teacher(teacher_weights), workers=0)
    runs = {}
    for name in ("cached", "online"):
        recorded = []
        torch.manual_seed(0)
        options = dict(weights=resolve_weights(("kd", "ce"), alpha=0.9, beta=0, hint_weight=0),
                       optim=OptimConfig(epochs=2, batch_size=24, workers=0), seed=3,
                       on_step=lambda step, terms, rec=recorded: rec.append(terms))
        student = build_model("resnet8", num_classes=10)
        if name == "cached":
            train_student(student, tmp_path / "cache", source, test_source, tmp_path / name, **options)
        else:
            train_online(student, load_teacher(teacher_weights), source, test_source, tmp_path / name,
                         augment=augment, views_from=open_cache(tmp_path / "cache"), **options)
        runs[name] = recorded
    assert len(runs["cached"]) == len(runs["online"]) == 2 * (len(source) // 24)
    for a, b in zip(runs["cached"], runs["online"]):
        assert a.keys() == b.keys() == {"kd", "ce", "loss"}
        for term in a:  # the cache's float16 logits against the online teacher's float32 ones
            assert a[term] == pytest.approx(b[term], rel=2e-3, abs=1e-5), term


USER_MODULE = """
from torchvision.transforms import v2


def pipeline(image_size):
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandAugment(magnitude={magnitude})])
"""


def test_a_changed_pipeline_is_caught_by_the_checksum_and_named(tmp_path, cifar_subset, teacher_weights,
                                                               monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_augment.py").write_text(USER_MODULE.format(magnitude=9))
    importlib.invalidate_caches()
    data = f"imagefolder:{cifar_subset}"
    result = invoke("dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data", data,
                    "--augment", "my_augment:pipeline", "--views", "2", "--workers", "0", "--out", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    # the user edits the pipeline; a new process imports the new code (here: the module and softcache's cache
    # of built pipelines are dropped)
    (tmp_path / "my_augment.py").write_text(USER_MODULE.format(magnitude=20))
    sys.modules.pop("my_augment")
    built.cache_clear()
    result = invoke("train-student", "--cache", tmp_path / "cache", "--student", "resnet8", "--epochs", "1",
                    "--batch-size", "20", "--workers", "0", "--device", "cpu", "--out", tmp_path / "student")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "the replayed pixels differ from those the teacher saw" in lines[0]
    assert "the source of my_augment changed" in lines[0] and "magnitude=20" in lines[0], lines[0]
    assert lines[0].startswith("Error: sample ") and " view " in lines[0]
    assert not (tmp_path / "student" / "model.pt").exists()
    sys.modules.pop("my_augment", None)
    built.cache_clear()


def test_a_pipeline_on_pythons_generator_is_refused_at_dump_and_caught_on_replay(tmp_path, cifar_subset,
                                                                                teacher_weights):
    data = f"imagefolder:{cifar_subset}"
    result = invoke("dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data", data,
                    "--augment", "user_pipelines:python_random", "--views", "4", "--workers", "0",
                    "--out", tmp_path / "cache")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "the augmentation pipeline is not deterministic: sample " in result.stderr
    assert "not from Python's random" in result.stderr
    assert not (tmp_path / "cache").exists()  # refused before the store was created
    # had it slipped through, the replay's checksum names it
    source = load_source(data, "train")
    augment = Augment("user_pipelines:python_random", image_size=32)
    records = {"views/box": np.zeros((len(source), 1, 4), np.float32), "views/flip": np.zeros((len(source), 1), bool),
               "views/seed": np.zeros((len(source), 1), np.int64)}
    crc = [dump_module.DumpViews(source, augment, 1, 0)[i][2]["views/crc"] for i in range(20)]
    records["views/crc"] = np.concatenate([np.asarray(crc), np.zeros((len(source) - 20, 1), np.uint32)])
    from softcache.pixels import identity
    replay = ReplayViews(source, records, augment, recorded=identity(augment.pixels, 32))
    with pytest.raises(SoftcacheError, match="identity is unchanged, so it draws from a generator softcache does "
                                             "not seed"):
        for i in range(20):
            replay[(i, 0)]


@pytest.mark.parametrize(("args", "message"), [
    (["--augment", "no_such_module:pipe"], "cannot load --augment 'no_such_module:pipe' .*No module named"),
    (["--augment", "user_pipelines:float_output"],
     r"returned a torch.float32 tensor of shape \[3, 32, 32\]; it must return a uint8 tensor \[3, 32, 32\]"),
    (["--augment", "user_pipelines:wrong_size"], r"returned a torch.uint8 tensor of shape \[3, 36, 36\]"),
    (["--augment", "user_pipelines:no_image_size"], r"cannot be called as user_pipelines:no_image_size\(image_size=32"),
    (["--mixup", "0"], r"--mixup is the Beta\(α, α\) parameter: it must be > 0, got 0"),
    (["--cutmix", "-1"], r"--cutmix is the Beta\(α, α\) parameter: it must be > 0, got -1"),
    (["--mixup", "1", "--mix-prob", "1.5"], r"Invalid value for '--mix-prob': 1.5 is not in the range 0<=x<=1"),
    (["--reprob", "-0.1"], r"Invalid value for '--reprob'"),
    (["--aa", "rand-m9-mstd0.5"], r"--aa 'rand-m9-mstd0.5': 'mstd0.5' is not m<magnitude> or n<ops>"),
    (["--aa", "bogus"], r"unknown --aa 'bogus'; valid: rand-mM-nN, trivialaugment"),
    (["--aa", "rand-m9", "--data-path", "resident"], r"--data-path resident needs crop-only views"),
    (["--aa", "rand-m11"], r"--aa 'rand-m11': the magnitude must be 0-10 \(timm's scale\)"),
    (["--augment", "user_pipelines:v1_to_tensor"],
     r"--augment 'user_pipelines:v1_to_tensor' failed on a uint8 tensor \[3, 32, 32\] \(TypeError: .*v2 transforms"),
    (["--stream", "strong:aa=rand-m9-n2", "--data-path", "resident"],
     r"--data-path resident makes the main stream's views on the device; with --stream"),
    (["--views", "all", "--stream", "crops:augment=imagenet"],
     r"--views all gives the main stream 162 views a sample, but not stream 'crops'"),
    (["--stream", "main:aa=rand-m9-n2"], r"stream name 'main' must be a new lowercase word"),
    (["--stream", "strong:aa=rand-m9-n2,bogus=1"], r"stream setting 'bogus=1' is not KEY=VALUE with KEY one of"),
])
def test_bad_augmentation_input_is_one_line_and_writes_nothing(args, message, tmp_path, cifar_subset,
                                                               teacher_weights):
    result = invoke("dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data",
                    f"imagefolder:{cifar_subset}", "--views", "2", "--workers", "0", *args, "--out", tmp_path / "c")
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    import re
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "c").exists()


def test_replay_at_another_size_and_view_options_beside_views_from_are_refused(tmp_path, cifar_subset,
                                                                                teacher_weights):
    source = load_source(f"imagefolder:{cifar_subset}", "train")
    _dump(tmp_path / "cache", source, VARIANTS["user pipeline"], teacher=load_teacher(teacher_weights), workers=0)
    result = invoke("train-student", "--cache", tmp_path / "cache", "--student", "resnet8", "--image-size", "24",
                    "--epochs", "1", "--batch-size", "20", "--device", "cpu", "--out", tmp_path / "s")
    assert result.exit_code == 1 and "they replay only at the 32x32 the teacher saw; drop --image-size 24" \
        in result.stderr, result.output
    result = invoke("train-online", "--teacher", "resnet8", "--weights", teacher_weights, "--student", "resnet8",
                    "--views-from", tmp_path / "cache", "--mixup", "0.8", "--epochs", "1", "--batch-size", "20",
                    "--device", "cpu", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "--views-from replays the cache's own views" in result.stderr
    assert "drop --mixup" in result.stderr and not (tmp_path / "s").exists() and not (tmp_path / "o").exists()


def test_the_pipeline_is_part_of_the_cache_id(cifar_subset, teacher_weights, tmp_path):
    from softcache.dump import describe_dump
    from softcache.targets import LogitsFormat
    source = load_source(f"imagefolder:{cifar_subset}", "train")

    def cache_id(augment):
        return describe_dump(teachers=[{"name": "t", "arch": "resnet8", "weights_sha256": "x"}], source=source,
                             augment=augment, views=2, layers=[], seed=0, logits=LogitsFormat.parse("fp16"),
                             targets="features", backend="zarr")["id"]
    ids = {cache_id(Augment("cifar", image_size=32)),
           cache_id(Augment("cifar", image_size=32, pixels=Pixels(auto_augment="rand-m9-n2"))),
           cache_id(Augment("cifar", image_size=32, pixels=Pixels(auto_augment="rand-m10-n2"))),
           cache_id(Augment("cifar", image_size=32, pixels=Pixels(auto_augment="rand-m9-n2"), mix=Mix(0.8))),
           cache_id(Augment("user_pipelines:full", image_size=32))}
    assert len(ids) == 5
    # the same pipeline in another process has the same id (a lambda's address is not part of it)
    assert cache_id(Augment("user_pipelines:python_random", image_size=32)) == \
        cache_id(Augment("user_pipelines:python_random", image_size=32))


def test_cutmix_box_and_lambda_and_mixup_pixels():
    mix = Mix(cutmix=1.0)
    for key in range(200):
        record, lam = mix.draw(np.random.default_rng(key), samples=50, views=4, size=32)
        partner, partner_view, top, left, height, width = record
        assert 0 <= partner < 50 and 0 <= partner_view < 4
        assert top >= 0 and top + height <= 32 and left >= 0 and left + width <= 32
        assert lam == pytest.approx(1 - height * width / 1024, abs=1e-7)  # corrected to the box's real area
        a, b = torch.zeros(3, 32, 32, dtype=torch.uint8), torch.full((3, 32, 32), 255, dtype=torch.uint8)
        assert int(mix_pixels(a, b, record, lam).sum()) == 3 * 255 * height * width
    a = torch.tensor([[[10, 11, 200]]], dtype=torch.uint8)
    b = torch.tensor([[[20, 12, 0]]], dtype=torch.uint8)
    mixed = mix_pixels(a, b, (3, 0, 0, 0, 0, 0), 0.25)
    expected = np.round(np.float64(np.float32(0.25)) * np.array([10, 11, 200]) + 0.75 * np.array([20, 12, 0]))
    assert mixed.flatten().tolist() == expected.astype(int).tolist()  # 17.5 -> 18, 11.75 -> 12, 50


def test_mix_probability_and_switch():
    draws = [Mix(0.8, 1.0, prob=0.5, switch_prob=0.5).draw(np.random.default_rng(k), samples=10, views=1, size=32)
             for k in range(2000)]
    unmixed = sum(r[0] == -1 for r, _ in draws)
    cut = sum(r[0] >= 0 and r[4] > 0 for r, _ in draws)
    assert 850 < unmixed < 1150 and 350 < cut < 650  # binomial(2000, 0.5) and (2000, 0.25): > 6 sigma inside
    assert all(lam == 1.0 for r, lam in draws if r[0] == -1)


def test_mixed_cross_entropy_is_the_cross_entropy_of_the_mixed_labels():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    labels, partner = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 1, 3, 0, 2, 4])
    lam = torch.tensor([1.0, 0.5, 0.3, 0.9, 0.0, 0.75], dtype=torch.float64)
    got = CELoss()(logits, labels, (partner, lam))
    target = lam[:, None] * torch.eye(5, dtype=torch.float64)[labels] \
        + (1 - lam[:, None]) * torch.eye(5, dtype=torch.float64)[partner]
    expected = -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
    assert float(got) == pytest.approx(float(expected), rel=1e-12)


def test_fresh_mixed_views_carry_partner_labels_and_are_a_function_of_the_key(cifar_subset):
    source = load_source(f"imagefolder:{cifar_subset}", "train")
    augment = Augment("cifar", image_size=32, pixels=Pixels(auto_augment="trivialaugment"), mix=Mix(mixup=0.8))
    views = AugmentedViews(source, augment, seed=1)
    first, again = views[(7, 2)], AugmentedViews(source, augment, seed=1)[(7, 2)]
    assert len(first) == 6 and torch.equal(first[0], again[0]) and first[4:] == again[4:]
    assert not torch.equal(first[0], views[(7, 3)][0])  # another epoch, another view
    record, lam = augment.view_record((1, 2, 7), samples=len(source), views=1)[1:]
    assert first[5] == lam and first[4] == (source.labels[record[0]] if record[0] >= 0 else source.labels[7])
    eval_view = views[(7, -1)]
    assert len(eval_view) == 4  # the evaluation view: no pixel work, no mixing


def test_named_policies_in_timms_spelling():
    assert repr(parse_auto("rand-m9-n2")) == repr(parse_auto("rand-n2-m9"))
    assert "magnitude=7" in repr(parse_auto("rand-m7")) and "num_ops=3" in repr(parse_auto("rand-n3"))
    assert "CIFAR10" in repr(parse_auto("autoaugment-cifar10")) and "IMAGENET" in repr(parse_auto("original"))
    assert "TrivialAugmentWide" in repr(parse_auto("ta_wide"))
    assert "num_magnitude_bins=11" in repr(parse_auto("rand-m9-n2"))  # m9 is 90% of each op's range, as in timm
    from softcache import names, pixels
    assert names.AUTO_SPELLINGS == pixels.AUTO_SPELLINGS


def test_readme_rebuild_recipe_without_softcache(cifar_subset, tmp_path, teacher_weights):
    """The README's cache-format section: plain zarr and torchvision rebuild a stored view from its records."""
    import zarr
    from torchvision.transforms.v2 import functional as TF
    from torchvision.io import ImageReadMode, decode_image
    source = load_source(f"imagefolder:{cifar_subset}", "train")
    augment = VARIANTS["cifar + rand-m9-n2, jitter, erasing + mixup/cutmix"]
    _dump(tmp_path / "cache", source, augment, teacher=load_teacher(teacher_weights), workers=0)
    root = zarr.open_group(str(tmp_path / "cache"), mode="r")
    box, flip, seed = root["views/box"][:], root["views/flip"][:], root["views/seed"][:]
    mix, lam, crc = root["views/mix"][:], root["views/lam"][:], root["views/crc"][:]
    files = [path for path, _ in source.folder.samples]  # ImageFolder order: what the cache's sample i is

    def unmixed(i, v):
        image = decode_image(str(files[i]), mode=ImageReadMode.RGB)
        top, left, h, w = (round(float(x)) for x in box[i, v])
        view = TF.crop(image, top, left, h, w)
        return TF.horizontal_flip(view) if flip[i, v] else view

    import zlib
    from torchvision.transforms import v2
    ops = v2.Compose([v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11),
                      v2.ColorJitter(0.4, 0.4, 0.4),
                      v2.RandomErasing(p=0.5, value=0)])
    for i, v in [(0, 0), (3, 1), (50, 0)]:
        crop = unmixed(i, v)
        torch.manual_seed(int(seed[i, v]))
        view = ops(crop)
        assert zlib.crc32(view.numpy().tobytes()) == int(crc[i, v])
        j, vj = int(mix[i, v, 0]), int(mix[i, v, 1])
        if j >= 0:
            torch.manual_seed(int(seed[j, vj]))
            other = ops(unmixed(j, vj))
            t, left, h, w = (int(x) for x in mix[i, v, 2:])
            if h and w:
                view = view.clone()
                view[:, t:t + h, left:left + w] = other[:, t:t + h, left:left + w]
            else:
                view = (view.double() * float(lam[i, v]) + other.double() * (1 - float(lam[i, v]))).round()
                view = view.to(torch.uint8)
        assert zlib.crc32(view.numpy().tobytes()) == int(root["views/mixed_crc"][i, v])
        assert torch.equal(view, ReplayViews.from_cache(open_cache(tmp_path / "cache"), source)[(i, v)][0])


def test_two_view_streams_of_one_cache_feed_the_student_and_the_targets(tmp_path, cifar_subset, teacher_weights,
                                                                        monkeypatch):
    """`weak` (the main stream: crop + flip) and `strong` (+ RandAugment + erasing + CutMix) views of the same
    samples, each with its teacher outputs; the student replays strong views against the weak views' targets."""
    data = f"imagefolder:{cifar_subset}"
    result = invoke("dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data", data,
                    "--views", "2", "--workers", "0", "--stream", "strong:aa=rand-m9-n2,reprob=0.5,cutmix=1.0",
                    "--out", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    cache = open_cache(tmp_path / "cache")
    assert cache.manifest["streams"]["strong"]["pixels"]["auto_augment"] == "rand-m9-n2"
    assert {"streams/strong/views/box", "streams/strong/views/crc", "streams/strong/views/mix",
            "streams/strong/logits", "logits", "views/box"} <= set(cache.names())
    assert "views/crc" not in cache.names()  # the main stream is plain crops
    result = invoke("verify", tmp_path / "cache", "--teacher", "resnet8", "--weights", teacher_weights)
    assert result.exit_code == 0 and result.stdout.rstrip().endswith("ok"), result.output
    assert "streams/strong/logits" in result.stdout and "max |error| 0" in result.stdout, result.stdout
    result = invoke("inspect", tmp_path / "cache")
    assert "stream strong: cifar, rand-m9-n2, reprob 0.5, cutmix 1" in result.stdout, result.stdout
    # the streams share each slot's crop; their pixels and teacher outputs differ
    assert np.array_equal(cache.read("views/box"), cache.read("streams/strong/views/box"))
    assert not np.allclose(cache.read("logits"), cache.read("streams/strong/logits"))

    seen = []

    class Recording(DistillStep):
        def __call__(self, batch):
            target, _ = self.targets(batch[0], batch[2], batch[3])
            seen.append((batch[0].clone(), batch[2].tolist(), batch[3].tolist(), target["logits"].clone()))
            return super().__call__(batch)
    monkeypatch.setattr(train_module, "DistillStep", Recording)
    result = invoke("train-student", "--cache", tmp_path / "cache", "--student", "resnet8", "--stream", "strong",
                    "--target-stream", "main", "--epochs", "2", "--batch-size", "40", "--workers", "0",
                    "--device", "cpu", "--out", tmp_path / "student")
    assert result.exit_code == 0, result.output
    source = load_source(data, "train")
    strong = ReplayViews.from_cache(cache, source, stream="strong")
    weak_logits = torch.from_numpy(cache.read("logits").astype(np.float32))
    assert len(seen) == 2 * 3
    for views, index, view, target in seen:
        for pixels, i, v, t in zip(views, index, view, target):
            assert torch.equal(pixels, strong[(i, v)][0])  # the strong stream's (mixed) pixels
            assert torch.equal(t.float(), weak_logits[i, v])  # the weak stream's teacher outputs
    result = invoke("train-student", "--cache", tmp_path / "cache", "--student", "resnet8", "--stream", "medium",
                    "--epochs", "1", "--batch-size", "40", "--device", "cpu", "--out", tmp_path / "other")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "unknown view stream 'medium'; this cache has: main, strong" in result.stderr
    assert not (tmp_path / "other").exists()


def test_train_teacher_and_train_online_draw_fresh_pixel_work_and_mixes(tmp_path, cifar_subset, teacher_weights):
    data = f"imagefolder:{cifar_subset}"
    common = ["--epochs", "1", "--batch-size", "40", "--workers", "2", "--device", "cpu"]
    result = invoke("train-teacher", "--model", "resnet8", "--data", data, "--augment", "user_pipelines:full",
                    "--aa", "trivialaugment", "--cutmix", "1.0", *common, "--out", tmp_path / "teacher")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert (config["augment"], config["auto_augment"], config["cutmix"]) == ("user_pipelines:full", "trivialaugment",
                                                                            1.0)
    result = invoke("train-online", "--teacher", "resnet8", "--weights", teacher_weights, "--student", "resnet8",
                    "--data", data, "--aa", "rand-m9-n2", "--reprob", "0.25", "--mixup", "0.8", "--loss", "kd",
                    *common, "--out", tmp_path / "online")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "online" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_kd", "train_ce"} <= set(metrics) and metrics["images"] == 120
    result = invoke("train-teacher", "--model", "resnet8", "--data", data, "--augment", "user_pipelines:wrong_size",
                    *common, "--out", tmp_path / "bad")
    assert result.exit_code == 1 and "returned a torch.uint8 tensor of shape [3, 36, 36]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_a_changed_mix_is_caught_by_the_mixed_views_checksum(cifar_subset, tmp_path, teacher_weights, monkeypatch):
    """The unmixed views replay unchanged, but mixing code that rounds another way would give the student other
    pixels than the teacher's: the CRC-32 of the mixed view catches it."""
    from softcache import views as views_module
    source = load_source(f"imagefolder:{cifar_subset}", "train")
    augment = Augment("cifar", image_size=32, pixels=Pixels(auto_augment="rand-m9-n2"), mix=Mix(mixup=0.8))
    _dump(tmp_path / "cache", source, augment, teacher=load_teacher(teacher_weights), workers=0)
    replay = ReplayViews.from_cache(open_cache(tmp_path / "cache"), source)
    mixed = [i for i in range(len(source)) if replay.records["views/mix"][i, 0, 0] >= 0]
    assert mixed and torch.is_tensor(replay[(mixed[0], 0)][0])  # replays as dumped

    def floor_mix(view, partner, record, lam):
        return (view.double() * lam + partner.double() * (1 - lam)).floor().to(torch.uint8)
    monkeypatch.setattr(views_module, "mix_pixels", floor_mix)
    with pytest.raises(SoftcacheError, match=f"sample {mixed[0]} view 0: the replayed mixed pixels differ .*the "
                                             "view and its partner replay as dumped, so the mixing itself changed"):
        replay[(mixed[0], 0)]


def test_python_streams_must_store_the_main_streams_view_count(tmp_path, teacher_weights):
    source = load_source("synthetic:20", "train")
    with pytest.raises(SoftcacheError, match="stream 'crops' has 1 views a sample, the main stream 162"):
        dump_teacher(load_teacher(teacher_weights), source, tmp_path / "c", augment=Augment("cifar", image_size=32),
                     views="all", workers=0, streams={"crops": Augment("none", image_size=32)})


def test_a_user_module_that_fails_to_import_is_one_line(tmp_path, cifar_subset, teacher_weights, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_augment.py").write_text("from torchvision.transforms import v2\nundefined_name\n")
    importlib.invalidate_caches()
    result = invoke("dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data",
                    f"imagefolder:{cifar_subset}", "--augment", "broken_augment:pipe", "--out", tmp_path / "c")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "cannot load --augment 'broken_augment:pipe' (NameError: name 'undefined_name' is not defined)" \
        in result.stderr
    sys.modules.pop("broken_augment", None)
