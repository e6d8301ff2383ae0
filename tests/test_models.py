"""Models by name, checkpoints and feature taps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from softcache.errors import SoftcacheError
from softcache.models import Tapped, build_model, load_weights


@pytest.mark.parametrize("name, params", [("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet110", 1.7e6)])
def test_cifar_resnets_have_the_papers_sizes(name, params):
    # He et al. 2016, Table 6: 0.27M, 0.85M, 1.7M parameters (option-B shortcuts add a little)
    model = build_model(name, num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.05
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wide_and_torchvision_models_build_with_the_class_count():
    assert build_model("resnet8x4", 100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert build_model("mobilenet_v3_small", 7)(torch.randn(2, 3, 64, 64)).shape == (2, 7)


class TinyNet(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def make_tiny(num_classes: int) -> TinyNet:
    return TinyNet(num_classes)


def test_custom_module_callable():
    model = build_model(f"{__name__}:make_tiny", 3)
    assert isinstance(model, TinyNet) and model.head.out_features == 3
    with pytest.raises(SoftcacheError, match=r"package\.module:callable"):
        build_model(f"{__name__}:nothing_here", 3)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(SoftcacheError, match="unknown model 'resnet21'; valid: resnet8, resnet14, resnet20"):
        build_model("resnet21", 10)


def test_checkpoint_mismatch_lists_keys(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model("resnet20", 10).state_dict(), path)
    with pytest.raises(SoftcacheError, match=r"missing keys: layer1\.1\..*unexpected keys|unexpected keys"):
        load_weights(build_model("resnet8", 10), path)
    with pytest.raises(SoftcacheError, match=r"shape mismatch .*fc\.weight \(10, 64\) vs \(100, 64\)"):
        load_weights(build_model("resnet20", 100), path)
    # a DDP-wrapped checkpoint loads
    torch.save({"state_dict": {f"module.{k}": v for k, v in torch.load(path).items()}}, path)
    load_weights(build_model("resnet20", 10), path)


def test_taps_return_named_features_and_refuse_unknown_layers():
    tapped = Tapped(build_model("resnet20", 10), ["layer2", "layer3"])
    logits, features = tapped(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert features["layer2"].shape == (2, 32, 16, 16) and features["layer3"].shape == (2, 64, 8, 8)
    with pytest.raises(SoftcacheError, match="unknown layer 'layer5'; valid: embedding, conv1, layer1, layer2, layer3, "
                                             "pool, fc"):
        Tapped(build_model("resnet20", 10), ["layer5"])


@pytest.mark.parametrize("name, size, dim", [("resnet56", 32, 64), ("resnet18", 64, 512), ("tinynet:tiny", 32, 32)])
def test_the_embedding_tap_is_the_classifier_input(name, size, dim, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # tests/tinynet.py, loaded as a user's module:callable
    model = build_model(name, 10).eval()
    logits, features = Tapped(model, ["embedding"])(torch.randn(3, 3, size, size))
    embedding = features["embedding"]
    assert embedding.shape == (3, dim)
    fc = model.fc  # the final classifier of all three: logits are its output on the embedding
    assert torch.allclose(fc(embedding), logits, atol=1e-6)


def test_a_model_without_a_linear_classifier_has_no_embedding(tmp_path, teacher_weights, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    with pytest.raises(SoftcacheError, match=r"ConvHead has no final nn\.Linear classifier, so it has no 'embedding'"):
        Tapped(build_model("tinynet:convhead", 10), ["embedding"])
    from click.testing import CliRunner
    from softcache.cli import cli
    result = CliRunner().invoke(cli, ["train-teacher", "--model", "tinynet:convhead", "--data", "synthetic:20", "--out",
                                      str(tmp_path / "t"), "--epochs", "1", "--batch-size", "8", "--workers", "0"])
    assert result.exit_code == 0, result.output
    dump = CliRunner().invoke(cli, ["dump-teacher", "--teacher", "tinynet:convhead", "--weights",
                                    str(tmp_path / "t" / "model.pt"), "--data", "synthetic:20", "--layers",
                                    "embedding", "--out", str(tmp_path / "c"), "--workers", "0"])
    assert dump.exit_code != 0 and dump.stderr.strip().splitlines() == [
        "Error: ConvHead has no final nn.Linear classifier, so it has no 'embedding' (the classifier's input); "
        "tap a named layer instead"]


def _repdistiller_names(key: str) -> str:
    """softcache's CIFAR ResNet key -> the name RepDistiller's models/resnet.py gives the same tensor."""
    key = key.replace(".shortcut.", ".downsample.")
    if key.startswith("conv1.0."):
        return "conv1." + key.removeprefix("conv1.0.")
    if key.startswith("conv1.1."):
        return "bn1." + key.removeprefix("conv1.1.")
    return key


def test_a_repdistiller_checkpoint_loads_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    native = build_model("resnet8", 10)
    native.train()
    with torch.no_grad():  # BN statistics that are not the identity
        native(torch.randn(8, 3, 32, 32))
    native.eval()
    theirs = {_repdistiller_names(k): v for k, v in native.state_dict().items()}
    assert "bn1.running_mean" in theirs and "layer2.0.downsample.0.weight" in theirs and "conv1.weight" in theirs
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": theirs}, path)  # as RepDistiller saves its teachers
    loaded = load_weights(build_model("resnet8", 10), path).eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded(x), native(x))
    torch.save({"model": {**theirs, "extra.weight": torch.zeros(1)}}, path)  # fits neither naming: refused
    with pytest.raises(SoftcacheError, match=r"does not fit CifarResNet: missing keys: conv1\.0\.weight"):
        load_weights(build_model("resnet8", 10), path)


@pytest.mark.parametrize("name, dim", [("resnet8", 64), ("resnet18", 512), ("tinynet:tiny", 32)])
def test_dump_caches_the_embedding_of_each_model_kind(tmp_path, name, dim, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from click.testing import CliRunner
    from softcache.cli import cli
    from softcache.store import open_cache
    torch.save(build_model(name, 10).state_dict(), tmp_path / "w.pt")
    result = CliRunner().invoke(cli, ["dump-teacher", "--teacher", name, "--weights", str(tmp_path / "w.pt"), "--data",
                                      "synthetic:20", "--views", "2", "--layers", "embedding", "--targets", "attention",
                                      "--out", str(tmp_path / "c"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert open_cache(tmp_path / "c").shape("features/embedding") == (20, 2, dim)  # a vector under either --targets
