"""Model zoos: timm and Hugging Face models by name, their weights files, input conventions, ViT tokens as
features, DeiT's distillation head. Everything offline: weights are made here and saved locally."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from softcache.cli import cli
from softcache.data import load_source
from softcache.errors import SoftcacheError
from softcache.losses import DistillLoss
from softcache.losses.features import TokenFitNetsLoss
from softcache.losses.response import DeiTLoss, SoftDeiTLoss
from softcache.models import (DIST_LOGITS, Tapped, build_model, class_token, conventions, input_norm, load_weights,
                              prefix_tokens, spec_conventions)
from softcache.store import open_cache
from softcache.views import ReplayViews

FP16_TOL = dict(rtol=2e-3, atol=2e-3)  # what float16 storage keeps of a float32 output
TINY_VIT = "timm:vit_tiny_patch16_224,depth=1,img_size=32,patch_size=8,embed_dim=32,num_heads=2"
TINY_DEIT = "timm:deit_tiny_distilled_patch16_224,depth=1,img_size=32,patch_size=8,embed_dim=32,num_heads=2"


def run(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args) -> object:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, pattern: str) -> None:
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert pattern in lines[0], lines[0]


def normalised(views: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 views -> the model's input, written out here rather than through softcache.device."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (views.float() / 255 - mean) / std


def replayed(cache, data: str, pairs: list[tuple[int, int]]) -> torch.Tensor:
    replay = ReplayViews.from_cache(cache, load_source(data, "train"))
    return torch.stack([replay[pair][0] for pair in pairs])


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    """A tiny Hugging Face ViT for 10 classes and its image processor, written with save_pretrained."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(image_mean=[0.45, 0.4, 0.35], image_std=[0.3, 0.25, 0.2],
                      size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- names, options, conventions


def test_timm_names_take_keyword_options_and_bring_their_conventions():
    model = build_model(TINY_VIT, 7)
    assert len(model.blocks) == 1 and model.embed_dim == 32
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    found = conventions(model)
    assert found == spec_conventions(TINY_VIT)  # read without building the model, as a dump does
    assert found.mean == (0.5, 0.5, 0.5) and found.input_size == 32 and found.crop_pct == 0.9
    resnet = build_model("timm:resnet10t", 10)
    assert conventions(resnet).mean == (0.485, 0.456, 0.406) and conventions(resnet).input_size == 176
    source = load_source("synthetic:10", "train")
    assert input_norm(resnet, source) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # CIFAR ResNets and torchvision models keep the dataset's normalisation
    assert conventions(build_model("resnet8", 10)) is None and spec_conventions("resnet18") is None
    assert input_norm(build_model("resnet8", 10), source) == (tuple(source.mean), tuple(source.std))


def test_conventions_set_the_imagenet_view_size_and_evaluation_crop(cifar_subset):
    from softcache.dump import resolve_image_size
    from softcache.views import Augment
    source = load_source(f"imagefolder:{cifar_subset}", "train")
    assert resolve_image_size("imagenet", None, source, "timm:resnet10t") == 176  # its pretrained_cfg input size
    assert resolve_image_size("imagenet", None, source, "resnet18") == 224       # torchvision: the policy's
    assert resolve_image_size("cifar", None, source, "timm:resnet10t") == 32     # cifar keeps the images' size
    assert resolve_image_size("imagenet", 96, source, "timm:resnet10t") == 96    # as given
    augment = Augment("imagenet", image_size=224)
    vit = augment.for_model(build_model("timm:vit_tiny_patch16_224,depth=1", 10))
    assert vit.crop_pct == 0.9 and vit.eval_box(100, 100) == (5, 5, 90, 90)
    assert augment.for_model(build_model("resnet8", 10)).eval_box(100, 100) == (6, 6, 88, 88)  # 0.875, as before
    assert augment.to_json() == vit.to_json() == {}  # an evaluation setting: not part of a cache's id


@pytest.mark.parametrize("name, message", [
    ("timm:resnet10x", "unknown timm model 'resnet10x'; closest: resnet10t"),
    ("timm:vit_tiny_patch16", "closest: vit_tiny_patch16_384, vit_tiny_patch16_224"),
    ("timm:resnet18,drop_path_rate", "option 'drop_path_rate' is not KEY=VALUE"),
    ("timm:resnet18,bogus=1", "timm:resnet18 does not take bogus"),
    ("timm:", "names no timm model"),
])
def test_bad_zoo_names_are_one_line(name, message):
    with pytest.raises(SoftcacheError, match=message):
        build_model(name, 10)


def test_a_missing_zoo_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(SoftcacheError, match=r"timm models need the timm package: pip install timm"):
        build_model("timm:resnet18", 10)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SoftcacheError, match=r"pip install 'softcache\[hf\]'"):
        build_model("hf:google/vit-base-patch16-224", 10)


def timm_callable(num_classes: int):
    import timm
    return timm.create_model("resnet10t", num_classes=num_classes)


def test_a_users_callable_keeps_the_datasets_normalisation_even_when_it_returns_a_timm_model():
    model = build_model(f"{__name__}:timm_callable", 10)
    assert conventions(model) is None and spec_conventions(f"{__name__}:timm_callable") is None


def test_a_published_head_of_other_classes_is_refused_before_any_download(tmp_path, cifar_subset):
    """timm:resnet18,pretrained=true as it is would get a random 10-way head: refused, from timm's own record of
    the published weights, with nothing downloaded or written."""
    data = f"imagefolder:{cifar_subset}"
    result = run("dump-teacher", "--teacher", "timm:resnet18,pretrained=true", "--data", data,
                 "--out", tmp_path / "cache", "--device", "cpu")
    one_line_error(result, "whose classifier has 1000 classes, but the data has 10")
    assert "fine-tune it first (train-teacher --model timm:resnet18,pretrained=true)" in result.stderr
    assert not (tmp_path / "cache").exists()
    result = run("train-online", "--teacher", "timm:resnet18", "--student", "resnet8", "--data", data,
                 "--out", tmp_path / "online", "--device", "cpu")
    one_line_error(result, "train-online needs --weights for teacher 'timm:resnet18'")
    result = run("dump-teacher", "--teacher", "timm:resnet18", "--data", data, "--out", tmp_path / "cache")
    one_line_error(result, "1 --teacher but 0 --weights")
    assert not (tmp_path / "online").exists() and not (tmp_path / "cache").exists()


def test_an_image_size_the_model_cannot_take_is_refused_before_anything_is_written(tmp_path, cifar_subset):
    weights = tmp_path / "vit.pt"
    torch.save(build_model("timm:vit_tiny_patch16_224,depth=1", 10).state_dict(), weights)
    result = run("dump-teacher", "--teacher", "timm:vit_tiny_patch16_224,depth=1", "--weights", weights,
                 "--data", f"imagefolder:{cifar_subset}", "--out", tmp_path / "cache", "--device", "cpu")
    one_line_error(result, "cannot take 32x32 views")
    assert "give --image-size 224" in result.stderr and not (tmp_path / "cache").exists()


def test_a_layer_that_is_not_a_module_lists_the_nearest():
    with pytest.raises(SoftcacheError, match=r"unknown layer 'blocks\.5'; valid: embedding, patch_embed, .*"
                                             r"nearest: blocks\.0"):
        Tapped(build_model(TINY_VIT, 10), ["blocks.5"])


# ---------------------------------------------------------------- weights files


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "state_dict_ema", "ddp", "timm-train",
                                    "safetensors"])
def test_weights_load_from_every_checkpoint_layout(tmp_path, layout):
    torch.manual_seed(1)
    saved = build_model("timm:resnet10t", 10).state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth.tar")
    if layout == "safetensors":
        from safetensors.torch import save_file
        save_file(saved, str(path))
    else:
        import argparse
        timm_train = {"epoch": 3, "arch": "resnet10t", "state_dict": saved, "optimizer": {},  # as timm's train.py
                      "args": argparse.Namespace(model="resnet10t", lr=0.1), "version": 2, "metric": 71.2}
        wrapped = {"plain": saved, "ddp": {f"module.{k}": v for k, v in saved.items()}, "timm-train": timm_train}.get(
            layout, {layout: saved, "epoch": 3, "arch": "resnet10t"})
        torch.save(wrapped, path)
    torch.manual_seed(2)
    model = load_weights(build_model("timm:resnet10t", 10), path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file
    save_file(build_model("timm:resnet18", 10).state_dict(), str(path))
    with pytest.raises(SoftcacheError, match=r"does not fit ResNet: .*shape mismatch"):
        load_weights(build_model("timm:resnet10t", 10), path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SoftcacheError, match="is not a readable safetensors file"):
        load_weights(build_model("timm:resnet10t", 10), tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- timm CNN -> timm CNN, through the CLI


@pytest.mark.slow
def test_timm_resnet18_to_resnet10t_with_kd_and_fitnets(tmp_path, cifar_subset):
    """A timm teacher from a timm checkpoint (state_dict_ema layout); the cache holds its own forward on the
    replayed views, normalised its way; a timm student trains from it with KD + FitNets on layer3."""
    data = f"imagefolder:{cifar_subset}"
    torch.manual_seed(0)
    teacher = build_model("timm:resnet18", 10).eval()
    torch.save({"state_dict_ema": teacher.state_dict(), "epoch": 1}, tmp_path / "teacher.pth.tar")
    ok("dump-teacher", "--teacher", "timm:resnet18", "--weights", tmp_path / "teacher.pth.tar", "--data", data,
       "--views", "2", "--layers", "layer3,embedding", "--out", tmp_path / "cache", "--device", "cpu")
    cache = open_cache(tmp_path / "cache")
    recorded = cache.manifest["teachers"][0]["input"]
    assert recorded["mean"] == [0.485, 0.456, 0.406] and recorded["source"] == "timm pretrained_cfg"
    pairs = [(0, 0), (5, 1), (33, 0), (119, 1)]
    x = normalised(replayed(cache, data, pairs), teacher.pretrained_cfg["mean"], teacher.pretrained_cfg["std"])
    with torch.no_grad():
        logits = teacher(x)
        layer3 = teacher.forward_intermediates(x, indices=[3], intermediates_only=True)[0]  # timm's own taps
        embedding = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
    index, view = np.array(pairs).T
    for name, expected in (("logits", logits), ("features/layer3", layer3), ("features/embedding", embedding)):
        torch.testing.assert_close(torch.from_numpy(cache.read(name)[index, view]).float(), expected, **FP16_TOL)
    ok("train-student", "--cache", tmp_path / "cache", "--student", "timm:resnet10t", "--loss", "kd,fitnets",
       "--pair", "layer3=layer3", "--epochs", "1", "--batch-size", "40", "--out", tmp_path / "student",
       "--device", "cpu")
    metrics = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_kd", "train_fitnets", "train_ce"} <= set(metrics) and math.isfinite(metrics["train_fitnets"])
    student = load_weights(build_model("timm:resnet10t", 10), tmp_path / "student" / "model.pt")
    assert student.layer3[0].conv1.in_channels == 128  # timm's resnet10t, rebuilt from its name and model.pt


# ---------------------------------------------------------------- ViT tokens


@pytest.mark.slow
def test_vit_teacher_at_224_px_tokens_cached_as_such_and_a_vit_student_with_token_fitnets(tmp_path, cifar_subset):
    """timm's vit_tiny_patch16_224 (2 blocks) at 224 px: block tokens [197, 192] cached as they are and equal to
    timm's own intermediates; a smaller timm ViT (patch 32: 1 + 7x7 tokens) learns them with token FitNets, and
    relation terms take the class token. AT on tokens is refused with the reason, nothing written."""
    data, name = f"imagefolder:{cifar_subset}", "timm:vit_tiny_patch16_224,depth=2"
    torch.manual_seed(0)
    teacher = build_model(name, 10).eval()
    torch.save(teacher.state_dict(), tmp_path / "vit.pt")
    ok("dump-teacher", "--teacher", name, "--weights", tmp_path / "vit.pt", "--data", data, "--image-size", "224",
       "--layers", "blocks.1,embedding", "--out", tmp_path / "cache", "--device", "cpu")
    cache = open_cache(tmp_path / "cache")
    assert cache.shape("features/blocks.1") == (120, 1, 197, 192) and cache.shape("features/embedding") == (120, 1, 192)
    pairs = [(0, 0), (64, 0), (119, 0)]
    x = normalised(replayed(cache, data, pairs), (0.5,) * 3, (0.5,) * 3)  # timm's ViT convention, not CIFAR's
    with torch.no_grad():
        patches, prefix = teacher.forward_intermediates(x, indices=[1], return_prefix_tokens=True, output_fmt="NLC",
                                                        intermediates_only=True)[0]
        embedding = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
        logits = teacher(x)
    index, view = np.array(pairs).T
    for array, expected in (("features/blocks.1", torch.cat([prefix, patches], 1)), ("logits", logits),
                            ("features/embedding", embedding)):
        torch.testing.assert_close(torch.from_numpy(cache.read(array)[index, view]).float(), expected, **FP16_TOL)
    student = "timm:vit_tiny_patch16_224,depth=1,patch_size=32,embed_dim=96,num_heads=2"
    ok("train-student", "--cache", tmp_path / "cache", "--student", student, "--loss", "kd,fitnets,rkd",
       "--pair", "blocks.0=blocks.1", "--pair", "rkd:blocks.0=blocks.1", "--epochs", "2", "--batch-size", "40",
       "--out", tmp_path / "student", "--device", "cpu")
    metrics = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["train_fitnets"]) and math.isfinite(m["train_rkd"]) for m in metrics)
    assert metrics[-1]["train_fitnets"] < metrics[0]["train_fitnets"]  # the regressor and student learn the hint
    result = run("train-student", "--cache", tmp_path / "cache", "--student", student, "--loss", "kd,at",
                 "--pair", "at:blocks.0=blocks.1", "--batch-size", "40", "--out", tmp_path / "refused",
                 "--device", "cpu")
    one_line_error(result, "pairs token features, which at cannot use: AT is the spatial energy")
    assert not (tmp_path / "refused").exists()
    result = run("train-student", "--cache", tmp_path / "cache", "--student", "timm:resnet10t", "--loss", "kd,fitnets",
                 "--pair", "layer3=blocks.1", "--batch-size", "40", "--out", tmp_path / "refused",
                 "--device", "cpu")
    one_line_error(result, "pairs a student feature map [256, 14, 14] with a teacher token feature [197, 192]")
    result = run("dump-teacher", "--teacher", name, "--weights", tmp_path / "vit.pt", "--data", data,
                 "--image-size", "224", "--layers", "blocks.1", "--targets", "attention", "--out", tmp_path / "att",
                 "--device", "cpu")
    one_line_error(result, "layer 'blocks.1' gives tokens [197, 192]: dump it with --targets features")
    assert not (tmp_path / "att").exists()


def test_prefix_tokens_and_the_class_token():
    assert [prefix_tokens(n) for n in (197, 198, 201, 64, 65)] == [1, 2, 5, 0, 1]
    tokens = torch.randn(2, 17, 4)
    assert torch.equal(class_token(tokens), tokens[:, 0])
    assert torch.equal(class_token(tokens[:, 1:]), tokens[:, 1:].mean(1))  # no class token: the mean of the grid


def test_token_fitnets_against_a_float64_hand_computation():
    """Student 1 + 4x4 tokens, teacher 1 + 2x2: regressed student grid resized to 2x2 (bilinear, a factor of 2:
    the mean of each 2x2 block), class tokens compared, MSE over all."""
    torch.manual_seed(0)
    loss = TokenFitNetsLoss(5, 3).double()
    student, teacher = torch.randn(2, 17, 5, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    linear, norm = loss.regressor
    r = student @ linear.weight.T + linear.bias
    r = (r - r.mean(-1, keepdim=True)) / torch.sqrt(r.var(-1, unbiased=False, keepdim=True) + norm.eps)
    grid = r[:, 1:].reshape(2, 4, 4, 3)
    pooled = (grid[:, 0::2, 0::2] + grid[:, 1::2, 0::2] + grid[:, 0::2, 1::2] + grid[:, 1::2, 1::2]) / 4
    expected = ((torch.cat([r[:, :1], pooled.reshape(2, 4, 3)], 1) - teacher) ** 2).mean()
    torch.testing.assert_close(loss(student, teacher).double(), expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- Hugging Face


@pytest.mark.slow
def test_a_hugging_face_vit_teacher_from_a_local_folder(tmp_path, cifar_subset, hf_vit):
    """hf:FOLDER,pretrained=true: its saved weights, no --weights; logits and a block's tokens equal the Hugging
    Face model's own forward (output_hidden_states) on the replayed views, normalised with its processor's
    mean and std; a CIFAR ResNet student trains from it, normalising the same pixels the dataset's way."""
    from transformers import AutoModelForImageClassification
    data, name = f"imagefolder:{cifar_subset}", f"hf:{hf_vit},pretrained=true"
    ok("dump-teacher", "--teacher", name, "--data", data, "--views", "2", "--layers", "vit.layers.1,embedding",
       "--out", tmp_path / "cache", "--device", "cpu")
    cache = open_cache(tmp_path / "cache")
    teacher = cache.manifest["teachers"][0]
    assert teacher["weights"] == "pretrained" and teacher["input"]["mean"] == [0.45, 0.4, 0.35]
    assert teacher["input"]["source"] == "hf image processor"
    reference = AutoModelForImageClassification.from_pretrained(hf_vit).eval()
    pairs = [(0, 1), (50, 0), (119, 1)]
    x = normalised(replayed(cache, data, pairs), [0.45, 0.4, 0.35], [0.3, 0.25, 0.2])
    with torch.no_grad():
        out = reference(pixel_values=x, output_hidden_states=True)
    index, view = np.array(pairs).T
    torch.testing.assert_close(torch.from_numpy(cache.read("logits")[index, view]).float(), out.logits, **FP16_TOL)
    torch.testing.assert_close(torch.from_numpy(cache.read("features/vit.layers.1")[index, view]).float(),
                               out.hidden_states[2], **FP16_TOL)  # [0] is the embeddings, [k + 1] after layer k
    verified = ok("verify", tmp_path / "cache", "--teacher", name, "--device", "cpu")  # hashes the saved weights
    assert verified.stdout.strip().splitlines()[-1] == "ok" and "recomputed" in verified.stdout
    ok("train-student", "--cache", tmp_path / "cache", "--student", "resnet8", "--loss", "kd", "--epochs", "1",
       "--batch-size", "40", "--out", tmp_path / "student", "--device", "cpu")
    source = load_source(data, "train")
    assert input_norm(build_model("resnet8", 10), source) == (tuple(source.mean), tuple(source.std))
    random = build_model(f"hf:{hf_vit}", 10)  # without pretrained=true: the config, freshly initialised
    assert not torch.equal(random.classifier.weight, reference.classifier.weight)


# ---------------------------------------------------------------- DeiT


def test_deit_losses_against_float64_hand_computations():
    torch.manual_seed(0)
    dist, teacher = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    top = teacher.argmax(1)
    log_p = dist - dist.logsumexp(1, keepdim=True)
    hard = -log_p[torch.arange(5), top].mean()
    torch.testing.assert_close(DeiTLoss()(dist, teacher).double(), hard, rtol=1e-6, atol=0)
    # the hard target is the same from top-K caches (sorted) and from log-probabilities
    values, indices = teacher.topk(2, dim=1)
    target = {"topk_values": values, "topk_indices": indices, "tail_lse": torch.zeros(5)}
    torch.testing.assert_close(DeiTLoss()(dist, target).double(), hard, rtol=1e-6, atol=0)
    t = 4.0
    p_t = F.softmax(teacher / t, 1)
    soft = (p_t * (p_t.log() - F.log_softmax(dist / t, 1))).sum(1).mean() * t * t
    torch.testing.assert_close(SoftDeiTLoss(t)(dist, teacher).double(), soft, rtol=1e-5, atol=0)
    # in DistillLoss the term reads the distillation head, ce the class head
    cls_logits, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    out = DistillLoss({"ce": 0.5, "deit": 0.5})(cls_logits, labels, {DIST_LOGITS: dist.float()}, teacher.float(), {})
    torch.testing.assert_close(out["deit"].double(), 0.5 * hard, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["ce"], 0.5 * F.cross_entropy(cls_logits, labels))


def test_a_deit_student_trains_its_distillation_head_and_evaluates_on_both(tmp_path, small_cache):
    """`--loss deit` switches timm's distilled ViT to return both heads while training (Tapped splits them);
    in eval mode it answers the mean of the two heads, which is what the run's test accuracy measures."""
    ok("train-student", "--cache", small_cache, "--student", TINY_DEIT, "--loss", "deit", "--alpha", "0.5",
       "--epochs", "1", "--batch-size", "20", "--out", tmp_path / "deit", "--device", "cpu")
    metrics = json.loads((tmp_path / "deit" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_ce", "train_deit"} <= set(metrics)
    model = load_weights(build_model(TINY_DEIT, 10), tmp_path / "deit" / "model.pt").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        both = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(model(x), both)
    model.set_distilled_training(True)
    model.train()
    logits, features = Tapped(model, [])(x)
    assert logits.shape == features[DIST_LOGITS].shape == (3, 10)
    result = run("train-student", "--cache", small_cache, "--student", TINY_VIT, "--loss", "deit",
                 "--batch-size", "20", "--out", tmp_path / "refused", "--device", "cpu")
    one_line_error(result, "deit trains a student's distillation head, and VisionTransformer has none")
    assert not (tmp_path / "refused").exists()


def test_caches_of_models_without_conventions_keep_their_ids():
    """The manifest of a CIFAR ResNet / torchvision dump holds nothing new: its id is the one softcache gave it
    before model zoos (847c0800b75f86ca, computed at commit e0233b9)."""
    from softcache.dump import describe_dump
    from softcache.targets import LogitsFormat
    from softcache.views import Augment
    manifest = describe_dump(teachers=[{"name": "resnet8", "arch": "resnet8", "weights_sha256": "0" * 64}],
                             source=load_source("synthetic:20", "train"), augment=Augment("cifar", image_size=32),
                             views=5, layers=["layer2"], seed=7, logits=LogitsFormat.parse("fp16", 4.0),
                             targets="features", backend="zarr")
    assert manifest["id"] == "847c0800b75f86ca" and "input" not in manifest["teachers"][0]


def test_bench_takes_timm_names_and_refuses_a_size_the_teacher_cannot_take(tmp_path):
    result = ok("bench", "--teacher", "timm:resnet10t", "--student", "timm:resnet10t", "--data", "synthetic:32",
                "--batch-size", "8", "--steps", "1", "--rounds", "1", "--workers", "0", "--out", tmp_path / "b",
                "--device", "cpu")
    rows = {row["name"] for row in json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]}
    assert {"teacher inference only", "dump: logits + layer3", "student KD+FitNets (cache)"} <= rows
    assert "timm:resnet10t -> timm:resnet10t" in result.output
    result = run("bench", "--teacher", "timm:vit_tiny_patch16_224,depth=1", "--student", "resnet8", "--data",
                 "synthetic:32", "--layer", "blocks.0", "--out", tmp_path / "v", "--device", "cpu")
    one_line_error(result, "cannot take 32x32 views")
    assert "give --image-size 224" in result.stderr
