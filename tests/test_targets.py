"""Compact targets (bf16, top-k, sampled logits; attention maps) and multi-teacher caches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import load_teacher
from softcache.cli import cli
from softcache.config import OptimConfig
from softcache.data import load_source
from softcache.dump import dump_teacher
from softcache.errors import SoftcacheError
from softcache.losses import KDLoss, resolve_weights
from softcache.models import build_model
from softcache.store import open_cache
from softcache.targets import TOPK_TEMPERATURES, LogitsFormat
from softcache.batches import CacheTargets
from softcache.train import train_student
from softcache.views import Augment

SOURCE = "synthetic:20"


def _dump(out, weights, **kwargs):
    kwargs.setdefault("views", 3)
    return dump_teacher(load_teacher(weights), load_source(SOURCE, "train"), out,
                        augment=Augment("cifar", image_size=32), workers=0, seed=1, **kwargs)


@pytest.mark.parametrize("fmt, expected", [
    ("bf16", {"logits": ((20, 3, 10), "uint16")}),
    ("fp32", {"logits": ((20, 3, 10), "float32")}),
    ("topk:3", {"logits/topk_values": ((20, 3, 3), "float16"), "logits/topk_indices": ((20, 3, 3), "int16"),
                "logits/tail_lse": ((20, 3, len(TOPK_TEMPERATURES)), "float32")}),
    ("sampled:4", {"logits/sampled_ids": ((20, 3, 4), "int16"), "logits/sampled_weights": ((20, 3, 4), "float32"),
                   "logits/sampled_logp": ((20, 3, 4), "float32")}),
])
def test_logit_formats_store_the_documented_arrays(tmp_path, teacher_weights, fmt, expected):
    _dump(tmp_path / "c", teacher_weights, logits=fmt)
    cache = open_cache(tmp_path / "c")
    got = {n: (cache.shape(n), str(cache.dtype(n))) for n in cache.names() if n.startswith("logits")}
    assert got == expected


def test_compact_formats_agree_with_the_full_logits(tmp_path, teacher_weights):
    _dump(tmp_path / "full", teacher_weights, logits="fp32")
    _dump(tmp_path / "bf16", teacher_weights, logits="bf16")
    _dump(tmp_path / "topk", teacher_weights, logits="topk:3")
    full = torch.from_numpy(open_cache(tmp_path / "full").read("logits"))
    bf16 = torch.from_numpy(open_cache(tmp_path / "bf16").read("logits").view(np.int16)).view(torch.bfloat16)
    assert torch.equal(bf16.float(), full.bfloat16().float())
    topk = open_cache(tmp_path / "topk")
    values, indices = full.topk(3, dim=-1)
    assert torch.equal(torch.from_numpy(topk.read("logits/topk_indices")).long(), indices)
    torch.testing.assert_close(torch.from_numpy(topk.read("logits/topk_values")).float(), values.half().float())
    tail = full.scatter(-1, indices, float("-inf"))
    expected = torch.stack([torch.logsumexp(tail / t, dim=-1) for t in TOPK_TEMPERATURES], dim=-1)
    torch.testing.assert_close(torch.from_numpy(topk.read("logits/tail_lse")), expected)


def test_topk_kd_is_exact_with_all_classes_and_matches_the_bucket_formula():
    torch.manual_seed(0)
    s, z, t = torch.randn(4, 6), torch.randn(4, 6) * 3, 4.0
    kd = KDLoss(t)
    fmt = LogitsFormat("topk", k=6)
    enc = {k: torch.from_numpy(v) for k, v in fmt.encode(z).items()}
    full_k = kd.from_topk(s, z.topk(6, dim=1).values, enc["/topk_indices"].long(), enc["/tail_lse"][:, 3])
    assert full_k.item() == pytest.approx(kd(s, z).item(), rel=1e-5)
    # K = 2: KL over [top1, top2, tail] by hand
    values, idx = z.topk(2, dim=1)
    p_t, p_s = F.softmax(z / t, dim=1), F.softmax(s / t, dim=1)
    total = 0.0
    for b in range(4):
        top = set(idx[b].tolist())
        pt = [p_t[b, j].item() for j in idx[b]] + [sum(p_t[b, j].item() for j in range(6) if j not in top)]
        ps = [p_s[b, j].item() for j in idx[b]] + [sum(p_s[b, j].item() for j in range(6) if j not in top)]
        total += sum(a * math.log(a / c) for a, c in zip(pt, ps))
    tail_lse = torch.logsumexp((z / t).scatter(1, idx, float("-inf")), dim=1)
    assert kd.from_topk(s, values, idx, tail_lse).item() == pytest.approx(total / 4 * t * t, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_sampled_kd_is_unbiased(tau):
    torch.manual_seed(1)
    s, z, t = torch.randn(3, 10), torch.randn(3, 10) * 2, 4.0
    kd, fmt = KDLoss(t), LogitsFormat("sampled", k=4, tau=tau, temperature=t)
    generator = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(4000):
        enc = {k: torch.from_numpy(v) for k, v in fmt.encode(z, generator).items()}
        draws.append(kd.from_samples(s, enc["/sampled_ids"].long(), enc["/sampled_weights"],
                                     enc["/sampled_logp"]).item())
    draws = np.asarray(draws)
    full = kd(s, z).item()
    stderr = draws.std() / math.sqrt(len(draws))
    assert draws.std() > 0 and abs(draws.mean() - full) < 4 * stderr, (draws.mean(), full, stderr)


def _losses(cache, out, pairs, losses=("kd", "at")):
    recorded = []
    torch.manual_seed(0)
    train_student(build_model("resnet8", 10), cache, load_source(SOURCE, "train"), load_source(SOURCE, "test"), out,
                  weights=resolve_weights(losses, alpha=0.9, beta=1000, hint_weight=100), pairs=pairs,
                  optim=OptimConfig(epochs=1, batch_size=8, workers=0),
                  on_step=lambda step, terms: recorded.append(terms))
    return recorded


def test_attention_targets_train_at_like_features(tmp_path, teacher_weights):
    _dump(tmp_path / "feat", teacher_weights, layers=["layer2", "layer3"])
    _dump(tmp_path / "att", teacher_weights, layers=["layer2", "layer3"], targets="attention")
    att = open_cache(tmp_path / "att")
    assert att.shape("attention/layer3") == (20, 3, 8, 8) and att.shape("attention/layer2") == (20, 3, 16, 16)
    pairs = {"layer3": "layer3", "layer2": "layer2"}
    a = _losses(tmp_path / "feat", tmp_path / "r1", pairs)
    b = _losses(tmp_path / "att", tmp_path / "r2", pairs)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["at"] == pytest.approx(y["at"], rel=2e-3) and x["kd"] == pytest.approx(y["kd"], rel=2e-3)
    with pytest.raises(SoftcacheError, match="fitnets needs feature maps, but this cache stores attention maps only"):
        _losses(tmp_path / "att", tmp_path / "r3", pairs, losses=("kd", "fitnets"))


def test_two_teacher_cache_and_the_mean_ensemble(tmp_path, teacher_weights):
    torch.manual_seed(5)
    other = tmp_path / "other.pt"
    torch.save(build_model("resnet8", 10).state_dict(), other)
    result = CliRunner().invoke(cli, ["dump-teacher", "--teacher", "resnet8", "--weights", str(teacher_weights),
                                      "--teacher", "resnet8", "--weights", str(other), "--data", SOURCE, "--views", "2",
                                      "--workers", "0", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    cache = open_cache(tmp_path / "c")
    assert [t["name"] for t in cache.manifest["teachers"]] == ["resnet8", "resnet8_2"]
    z1, z2 = (torch.from_numpy(cache.read(f"teachers/{n}/logits")).float() for n in ("resnet8", "resnet8_2"))
    assert not torch.allclose(z1, z2)
    index, view = torch.tensor([0, 5, 9, 19]), torch.tensor([1, 0, 1, 0])
    s, t = torch.randn(4, 10), 4.0
    target, _ = CacheTargets(cache, [], torch.device("cpu"), temperature=t)(None, index, view)
    p_ens = (F.softmax(z1[index, view] / t, dim=1) + F.softmax(z2[index, view] / t, dim=1)) / 2
    by_hand = (p_ens * (p_ens.log() - F.log_softmax(s / t, dim=1))).sum(1).mean() * t * t
    assert KDLoss(t).from_target(s, target).item() == pytest.approx(by_hand.item(), rel=1e-5)
    one, _ = CacheTargets(cache, [], torch.device("cpu"), temperature=t, teachers="resnet8_2")(None, index, view)
    assert KDLoss(t).from_target(s, one).item() == pytest.approx(KDLoss(t)(s, z2[index, view]).item(), rel=1e-6)
    with pytest.raises(SoftcacheError,
                       match="--teachers 'nobody' is not in the cache; valid: mean, resnet8, resnet8_2"):
        CacheTargets(cache, [], torch.device("cpu"), teachers="nobody")
    run = CliRunner().invoke(cli, ["train-student", "--cache", str(tmp_path / "c"), "--student", "resnet8",
                                   "--epochs", "1", "--workers", "0", "--batch-size", "8", "--teachers", "mean",
                                   "--out", str(tmp_path / "s")])
    assert run.exit_code == 0, run.output
