"""The cache holds exactly what online KD would compute: replayed views, teacher targets, losses."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T

from conftest import load_teacher
from softcache.data import load_source
from softcache.device import normalize, teacher_outputs
from softcache.dump import dump_teacher, stream_augments
from softcache.losses import FEATURE_LOSSES, ATLoss, resolve_weights
from softcache.models import Tapped, build_model
from softcache.store import open_cache
from softcache.config import OptimConfig
from softcache.train import train_online, train_student
from softcache.views import Augment, DumpViews, ReplayViews, apply_view

FP16_TOL = dict(rtol=2e-3, atol=2e-3)


def test_replayed_views_give_the_cached_teacher_outputs(small_cache, teacher_weights):
    cache = open_cache(small_cache)
    source = load_source("synthetic:20", "train")
    teacher = Tapped(load_teacher(teacher_weights), ["layer2", "layer3"]).eval()
    rng = np.random.default_rng(0)
    index, view = rng.integers(0, 20, 12), rng.integers(0, 5, 12)
    replay = ReplayViews.from_cache(cache, source)
    batch = torch.stack([replay[(int(i), int(v))][0] for i, v in zip(index, view)])
    logits, features = teacher_outputs(teacher, batch, mean=source.mean, std=source.std, device=torch.device("cpu"))
    torch.testing.assert_close(logits, torch.from_numpy(cache.read("logits")[index, view]), **FP16_TOL)
    for layer in ("layer2", "layer3"):
        cached = torch.from_numpy(cache.read(f"features/{layer}")[index, view])
        torch.testing.assert_close(features[layer], cached, **FP16_TOL)
    # The targets differ between views of one sample, so matching them is not an accident.
    logits = torch.from_numpy(cache.read("logits")).float()
    assert not torch.allclose(logits[0, 0], logits[0, 1])


def test_student_input_is_the_tensor_the_teacher_saw(small_cache):
    cache = open_cache(small_cache)
    source = load_source("synthetic:20", "train")
    dumped = DumpViews(source, Augment("cifar", image_size=32), views=5, seed=7)
    replay = ReplayViews.from_cache(cache, source)
    for i in (0, 7, 19):
        teacher_views = dumped[i][0]
        for v in range(5):
            student_view = replay[(i, v)][0]
            assert student_view.shape == (3, 32, 32) and student_view.dtype == torch.uint8
            assert torch.equal(student_view, teacher_views[v])
            torch.testing.assert_close(normalize(student_view[None], source.mean, source.std),
                                       normalize(teacher_views[v][None], source.mean, source.std), rtol=0, atol=0)


def test_cifar_box_equals_torchvision_pad_and_crop():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    padded = T.functional.pad(image, [4])
    for top, left in [(-4, -4), (0, 3), (4, -2)]:
        expected = padded[:, top + 4:top + 36, left + 4:left + 36]
        assert torch.equal(apply_view(image, (top, left, 32, 32), False, 32), expected)
        assert torch.equal(apply_view(image, (top, left, 32, 32), True, 32), expected.flip(-1))


def test_views_all_stores_every_cifar_view_once_per_sample(tmp_path, teacher_weights):
    out = tmp_path / "all"
    dump_teacher(load_teacher(teacher_weights), load_source("synthetic:10", "train"), out,
                 augment=Augment("cifar", image_size=32), views="all", workers=0, batch_size=512)
    cache = open_cache(out)
    boxes, flips = cache.read("views/box"), cache.read("views/flip")
    assert boxes.shape == (10, 162, 4) and cache.shape("logits") == (10, 162, 10)
    expected = {(t, left, f) for t in range(-4, 5) for left in range(-4, 5) for f in (False, True)}
    for i in range(10):
        seen = [(int(b[0]), int(b[1]), bool(f)) for b, f in zip(boxes[i], flips[i])]
        assert len(seen) == 162 and set(seen) == expected
        assert (boxes[i, :, 2:] == 32).all()


def _steps(cache, source, test_source, out, pairs, losses, online_teacher=None, settings=None, strong=None):
    """The loss terms of each step of a 2-epoch train-student run from `cache`, or of the train-online run that
    replays the same views with `online_teacher` in the loop."""
    recorded = []
    torch.manual_seed(0)
    student = build_model("resnet8", num_classes=10)
    weights = resolve_weights(losses, alpha=0.9, beta=1000.0, hint_weight=100.0)
    options = dict(weights=weights, pairs=list(pairs.items()), optim=OptimConfig(epochs=2, batch_size=8, workers=0),
                   seed=3, on_step=lambda step, terms: recorded.append(terms), settings=settings, strong_stream=strong)
    if online_teacher is None:
        train_student(student, cache, source, test_source, out, **options)
    else:
        train_online(student, online_teacher, source, test_source, out, augment=Augment("cifar", image_size=32),
                     views_from=open_cache(cache), **options)
    return recorded


@pytest.fixture(scope="module")
def embedding_cache(tmp_path_factory, teacher_weights):
    """synthetic:20, 5 views, layer2 and layer3 features, before their ReLU too, and the embedding (the classifier's
    input), the teacher's classifier; a strong view stream (RandAugment, erasing) beside the crops."""
    out = tmp_path_factory.mktemp("emb") / "cache"
    dump_teacher(load_teacher(teacher_weights), load_source("synthetic:20", "train"), out,
                 augment=Augment("cifar", image_size=32), views=5,
                 layers=["layer2", "layer3", "layer2.pre_relu", "layer3.pre_relu", "embedding", "input_gradient"],
                 seed=7,
                 teacher_head=True, streams=stream_augments([("strong", "aa=rand-m9-n2,reprob=0.25")],
                                                            Augment("cifar", image_size=32), 5),
                 batch_size=32, workers=0, teacher_info={"arch": "resnet8", "weights_sha256": "test"})
    return out


# Every term, and the settings that change terms: (losses, DistillLoss settings)
_REPLAYED = [(("kd",), {}), (("kd", "at", "fitnets"), {}), (("kd", "rkd", "pkt", "sp", "nst", "crd", "cc"), {}),
             (("ce", "vid", "gram", "fsp", "kdsvd"), {"options": {"fsp": {"init_epochs": 0}}}),
             (("ce", "reviewkd"), {"options": {"reviewkd": {"warmup": 0}}}),
             (("ce", "ab", "ft"), {"options": {"ab": {"init_epochs": 1}, "ft": {"init_epochs": 1}}}),
             (("ce", "ofd"), {}), (("simkd",), {}), (("mlkd",), {}), (("ce", "gat", "at"), {}),
             (("ce", "dkd", "dist"), {"options": {"dkd": {"warmup": 0}}, "label_smoothing": 0.1}),
             (("kd", "dkd"), {"standardize": True, "learn_temperature": True})]


@pytest.mark.parametrize("losses, settings", _REPLAYED,
                         ids=["+".join((*losses, *settings)) for losses, settings in _REPLAYED])
def test_train_online_on_the_cached_views_gives_the_cached_loss_values(small_cache, embedding_cache, teacher_weights,
                                                                        tmp_path, losses, settings):
    source, test_source = load_source("synthetic:20", "train"), load_source("synthetic:20", "test")
    pairs = {"layer2": "layer2", "layer3": "layer3"} if any(t in FEATURE_LOSSES for t in losses) else {}
    cache = small_cache
    if "rkd" in losses:  # relation terms: sp and nst on layer3, rkd and pkt on the embedding
        cache, pairs = embedding_cache, {"layer3": "layer3", "embedding": "embedding"}
        assert open_cache(cache).shape("features/embedding") == (20, 5, 64)
    if "reviewkd" in losses:  # the student's stages against the teacher's before their ReLU, then the embedding
        cache, pairs = embedding_cache, {"layer2": "layer2.pre_relu", "layer3": "layer3.pre_relu",
                                         "embedding": "embedding"}
    if "ofd" in losses:  # pre-ReLU stages; the margins from the cached BatchNorms, online from the teacher's
        cache, pairs = embedding_cache, {"layer2.pre_relu": "layer2.pre_relu", "layer3.pre_relu": "layer3.pre_relu"}
    if "gat" in losses:  # the teacher's input-gradient maps (cached, or computed by the online teacher) and maps
        cache, pairs = embedding_cache, {"layer3": "layer3"}
    if "simkd" in losses:  # the teacher's head from the cache, online from the teacher
        cache, pairs = embedding_cache, {"layer3": "layer3"}
    if "ab" in losses:  # pre-ReLU stages for ab, the last stage for ft; one initialisation epoch first
        cache, pairs = embedding_cache, {"ab:layer2.pre_relu": "layer2.pre_relu",
                                         "ab:layer3.pre_relu": "layer3.pre_relu", "ft:layer3": "layer3"}
    strong = None
    if "mlkd" in losses:  # the weak (main) and the strong stream's views of the same samples, in lockstep
        cache, strong = embedding_cache, "strong"
    cached = _steps(cache, source, test_source, tmp_path / "cached", pairs, losses, settings=settings, strong=strong)
    live = _steps(cache, source, test_source, tmp_path / "online", pairs, losses, load_teacher(teacher_weights),
                  settings=settings, strong=strong)
    init = max((o.get("init_epochs", 0) for o in (settings or {}).get("options", {}).values()), default=0)
    assert len(cached) == len(live) == 2 * (2 + init)  # (init +) 2 epochs x (20 // 8) steps
    assert set(losses) <= {term for a in cached for term in a}
    for a, b in zip(cached, live):
        assert a.keys() == b.keys()
        for term in a:
            assert a[term] == pytest.approx(b[term], rel=2e-3, abs=1e-5), term


@pytest.mark.parametrize("shard_mb", [64.0, 0.05])  # one shard, and many (windows of chunks)
def test_resident_loader_and_stream_paths_give_identical_batches(tmp_path, teacher_weights, shard_mb, monkeypatch):
    from softcache import batches as batches_module
    from softcache.batches import student_data
    monkeypatch.setattr(batches_module, "STREAM_WINDOW", 4)
    out = tmp_path / "cache"
    dump_teacher(load_teacher(teacher_weights), load_source("synthetic:40", "train"), out,
                 augment=Augment("cifar", image_size=32), views=3, layers=["layer3"], workers=0, shard_mb=shard_mb)
    cache = open_cache(out)
    source = load_source("synthetic:40", "train")
    common = dict(teacher_layers=["layer3"], temperature=4.0, teachers="mean", image_size=32, batch_size=6, seed=11,
                  workers=0, device=torch.device("cpu"))
    paths = {p: student_data(cache, source, data_path=p, **common) for p in ("resident", "loader", "stream")}
    assert [paths[p][2] for p in paths] == ["resident images, resident targets", "loader images, resident targets",
                                            "resident images, stream targets"]
    assert (type(paths["resident"][0]).__name__ == "ResidentReplay"
            and type(paths["stream"][1]).__name__ == "StreamingTargets")
    for epoch in (0, 1):
        batches = {}
        for name, (loader, targets, _) in paths.items():
            loader.set_epoch(epoch)
            batches[name] = [(b, targets(*b[:1], b[2], b[3])) for b in loader]
        assert len(batches["resident"]) == 6
        for (a, ta), (b, tb), (c, tc) in zip(batches["resident"], batches["loader"], batches["stream"]):
            for x, y, z in zip(a, b, c):
                assert (torch.equal(torch.as_tensor(x), torch.as_tensor(y))
                        and torch.equal(torch.as_tensor(x), torch.as_tensor(z)))
            assert torch.equal(ta[0]["logits"], tb[0]["logits"]) and torch.equal(ta[0]["logits"], tc[0]["logits"])
            assert torch.equal(ta[1]["layer3"], tb[1]["layer3"]) and torch.equal(ta[1]["layer3"], tc[1]["layer3"])


def test_student_training_is_the_same_on_every_path(small_cache, tmp_path):
    from softcache.config import OptimConfig
    source, test_source = load_source("synthetic:20", "train"), load_source("synthetic:20", "test")
    runs = {}
    for path in ("loader", "resident", "stream"):
        recorded = []
        torch.manual_seed(0)
        train_student(build_model("resnet8", 10), small_cache, source, test_source, tmp_path / path,
                      weights=resolve_weights(["kd", "at"], alpha=0.9, beta=1000, hint_weight=100),
                      pairs={"layer3": "layer3"}, optim=OptimConfig(epochs=2, batch_size=8, workers=0), seed=2,
                      data_path=path, on_step=lambda step, terms, rec=recorded: rec.append(terms))
        runs[path] = recorded
    assert len(runs["loader"]) == 4 and runs["loader"] == runs["resident"] == runs["stream"]


@pytest.mark.parametrize("views", [3, "all"])
def test_dump_paths_write_identical_caches(tmp_path, teacher_weights, views):
    source = load_source("synthetic:12", "train")
    caches = {}
    for path in ("resident", "loader"):
        dump_teacher(load_teacher(teacher_weights), source, tmp_path / path, augment=Augment("cifar", image_size=32),
                     views=views, layers=["layer3"], workers=0, batch_size=64, data_path=path)
        cache = open_cache(tmp_path / path)
        caches[path] = {name: cache.read(name).tobytes() for name in cache.names()}
    assert caches["resident"] == caches["loader"] and len(caches["resident"]) == 5


def test_plain_training_batches_are_the_same_resident_or_loaded():
    from softcache.batches import augmented_batches
    source = load_source("synthetic:30", "train")
    common = dict(batch_size=7, seed=4, workers=0, device=torch.device("cpu"))
    resident = augmented_batches(source, Augment("cifar", image_size=32), data_path="resident", **common)
    loader = augmented_batches(source, Augment("cifar", image_size=32), data_path="loader", **common)
    assert type(resident).__name__ == "ResidentReplay"
    seen = []
    for epoch in (0, 1):
        resident.set_epoch(epoch)
        loader.set_epoch(epoch)
        pairs = list(zip(resident, loader))
        assert len(pairs) == 4
        for a, b in pairs:
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        seen.append(torch.cat([a[0] for a, _ in pairs]))
    assert not torch.equal(seen[0], seen[1])  # fresh views (and order) every epoch


def test_evaluation_is_the_same_resident_or_loaded():
    from softcache.batches import eval_batches
    from softcache.training.loop import evaluate
    source = load_source("synthetic:50", "test")
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    results = {}
    for path in ("auto", "loader"):
        batches = eval_batches(source, Augment("cifar", image_size=32), batch_size=4, workers=0,
                               device=torch.device("cpu"), data_path=path)
        results[type(batches).__name__] = evaluate(model, batches, mean=source.mean, std=source.std,
                                                   device=torch.device("cpu"))
    assert set(results) == {"ResidentReplay", "DataLoader"}
    assert results["ResidentReplay"] == results["DataLoader"]


def test_streaming_reads_only_the_view_slot_an_epoch_uses(tmp_path, teacher_weights, monkeypatch):
    from softcache import batches as batches_module
    from softcache.batches import student_data
    monkeypatch.setattr(batches_module, "STREAM_WINDOW", 4)  # windows of 4 chunks: 8 windows
    out = tmp_path / "cache"
    # 1000 samples in shards and chunks of 32 (1/16 of the samples, rounded down to a power of two): the short
    # last chunk (8 samples) falls inside the visiting order, and every later window is shifted by it
    dump_teacher(load_teacher(teacher_weights), load_source("synthetic:1000", "train"), out,
                 augment=Augment("cifar", image_size=32), views=8, layers=["layer3"], workers=0)
    cache = open_cache(out)
    assert cache.shard_samples() == 32 and cache.chunk_samples("features/layer3") == 32
    loader, targets, path = student_data(cache, load_source("synthetic:1000", "train"), teacher_layers=["layer3"],
                                         temperature=4.0, teachers="mean", image_size=32, batch_size=40, seed=1,
                                         workers=0, device=torch.device("cpu"), data_path="stream")
    assert path == "resident images, stream targets"
    on_disk = sum(row["bytes"] for row in cache.describe() if row["name"] in ("logits", "features/layer3"))
    cache.decoded_bytes, fetched = 0, cache.fetched_bytes
    for epoch in range(8):
        delivered = targets.delivered_bytes
        loader.set_epoch(epoch)
        for batch in loader:
            targets(*batch[:1], batch[2], batch[3])
        # one view of every sample, logits + layer3, float16
        assert targets.delivered_bytes - delivered == 1000 * (10 + 64 * 8 * 8) * 2
    # what the reader decoded (whole chunks), per epoch, against what it delivered; the reader runs ahead into
    # the next epoch, so the count is taken over all 8 epochs (64 windows; at most 3 read ahead)
    assert targets.delivered_bytes <= cache.decoded_bytes <= 1.1 * targets.delivered_bytes
    targets.close()
    # over 8 epochs every view slot was replayed once: the bytes fetched from disk are the arrays' bytes once
    # (plus shard indexes; box and flip slots for the resident image path; the next epoch's read-ahead)
    assert cache.fetched_bytes - fetched <= 1.1 * on_disk * 9 / 8


def test_windows_mix_a_dataset_stored_class_by_class():
    # an ImageFolder is stored class by class: 10 classes of 5,000; chunks of 128 samples, windows of 64 chunks
    from softcache.batches import STREAM_WINDOW
    from softcache.streaming import window_order
    labels = np.repeat(np.arange(10), 5000)
    order, bounds = window_order(50000, block=128, window=STREAM_WINDOW, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(50000)) and bounds[0] == 0 and bounds[-1] == 50000
    classes_per_batch = [len(set(labels[order[a:a + 128]].tolist())) for a in range(0, 49920, 128)]
    assert min(classes_per_batch) >= 8, min(classes_per_batch)


def test_at_from_an_attention_only_cache_equals_at_from_features(tmp_path, teacher_weights):
    """Student maps at 1/2 (layer2, 16x16) and 1/4 (layer3, 8x8) of the teacher's layer1 (32x32)."""
    source, test_source = load_source("synthetic:20", "train"), load_source("synthetic:20", "test")
    caches = {}
    for targets in ("features", "attention"):
        caches[targets] = tmp_path / targets
        dump_teacher(load_teacher(teacher_weights), source, caches[targets], augment=Augment("cifar", image_size=32),
                     views=3, layers=["layer1"], seed=7, workers=0, targets=targets,
                     teacher_info={"arch": "resnet8", "weights_sha256": "test"})
    attention = open_cache(caches["attention"])
    assert {"attention/layer1", "attention/layer1@2", "attention/layer1@4"} <= set(attention.names())
    assert attention.shape("attention/layer1@4") == (20, 3, 8, 8)
    features = open_cache(caches["features"]).read("features/layer1", 0, 8, slot=1)   # [8, 16, 32, 32]
    for k, layer in ((2, "layer2"), (4, "layer3")):
        student = torch.randn(8, 8, 32 // k, 32 // k)
        online = ATLoss()(student, torch.from_numpy(features).float())
        exact = ATLoss()(student, torch.from_numpy(attention.read(f"attention/layer1@{k}", 0, 8, slot=1)).float())
        pooled = ATLoss()(student, torch.from_numpy(attention.read("attention/layer1", 0, 8, slot=1)).float())
        assert exact.item() == pytest.approx(online.item(), rel=1e-3)
        assert abs(pooled.item() - online.item()) > 10 * abs(exact.item() - online.item())  # pooling the map is not AT
        # and through training: the first step of each (same initial student) agrees
        full = _steps(caches["features"], source, test_source, tmp_path / f"f{k}", {layer: "layer1"}, ("kd", "at"))
        maps = _steps(caches["attention"], source, test_source, tmp_path / f"a{k}", {layer: "layer1"}, ("kd", "at"))
        assert maps[0]["at"] == pytest.approx(full[0]["at"], rel=1e-3)
    from softcache.config import OptimConfig
    from softcache.errors import SoftcacheError
    with pytest.raises(SoftcacheError, match=r"the student map is 2x2, the cached attention map 32x32; an "
                                             r"attention-only cache holds exact maps for students 2x or 4x smaller"):
        train_student(build_model("resnet8", 10), caches["attention"], source, test_source, tmp_path / "r",
                      weights={"at": 1000.0}, pairs={"layer3": "layer1"}, image_size=8,
                      optim=OptimConfig(epochs=1, batch_size=8, workers=0))


def test_the_combined_recipe_is_one_command(embedding_cache, tmp_path):
    from click.testing import CliRunner
    from softcache.cli import cli
    run = tmp_path / "combined"
    result = CliRunner().invoke(cli, [
        "train-student", "--cache", str(embedding_cache), "--student", "resnet8", "--loss", "kd,fitnets,at,rkd",
        "--alpha", "0.7", "--weight", "fitnets=0.5", "--weight", "at=0.3", "--weight", "rkd=0.2",
        "--pair-reduce", "mean", "--pair", "fitnets:layer3=layer3", "--pair", "at:layer2=layer3",
        "--pair", "at:layer3=layer3", "--pair", "embedding=embedding", "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--out", str(run)])
    assert result.exit_code == 0, result.output
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_ce", "train_kd", "train_fitnets", "train_at", "train_rkd"} <= set(line)
    terms = sum(line[f"train_{t}"] for t in ("ce", "kd", "fitnets", "at", "rkd"))
    assert line["train_loss"] == pytest.approx(terms, rel=1e-5)
    wrong = CliRunner().invoke(cli, ["train-student", "--cache", str(embedding_cache), "--student", "resnet8",
                                     "--loss", "kd,rkd", "--pair", "rkd:layer3=layer3", "--batch-size", "8",
                                     "--out", str(tmp_path / "x")])
    assert wrong.exit_code != 0 and "--pair rkd:layer3=layer3 pairs feature maps, which rkd cannot use" in wrong.stderr
