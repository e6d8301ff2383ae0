"""The flow at the size users run it: all 50,000 CIFAR-10 training images, in an ordinary shell.

Each command runs as a user would run it, through the installed console script with default options, under
the open-file limit of an ordinary shell (1024); bugs of scale (one shared-memory handle per image, one shard
for the whole dataset) fail here and nowhere else. The model is a tiny CNN loaded as `module:callable`.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from softcache.store import committed_samples, open_cache
from softcache.store.manifest import stored_params

SCRIPT = shutil.which("softcache")
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def ordinary_shell() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def softcache(*args, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([SCRIPT, *map(str, args)], cwd=cwd, env=ENV, preexec_fn=ordinary_shell,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


# A timm ViT by name (4x4 patches of the 32 px views: 64 tokens + the class token), normalised its own way
VIT_STUDENT = "timm:vit_tiny_patch16_224,img_size=32,patch_size=4,embed_dim=64,depth=2,num_heads=2"


@pytest.fixture(scope="module")
def flow(cifar_full, tmp_path_factory) -> dict[str, Path]:
    """train-teacher (1 epoch), dump-teacher (2 views + layer3, after and before its ReLU, and the teacher's
    head), train-student (1 epoch, KD+AT; a timm ViT student with KD; DKD+OFD) on the full set."""
    assert SCRIPT, "the softcache console script is not installed: pip install -e '.[dev]'"
    work = tmp_path_factory.mktemp("full")
    data = f"imagefolder:{cifar_full}"
    softcache("train-teacher", "--model", "tinynet:tiny", "--data", data, "--epochs", "1", "--out", "teacher", cwd=work)
    softcache("dump-teacher", "--teacher", "tinynet:tiny", "--weights", "teacher/model.pt", "--data", data,
              "--views", "2", "--layers", "layer3,layer3.pre_relu", "--teacher-head", "--out", "cache", cwd=work)
    softcache("train-student", "--cache", "cache", "--student", "tinynet:tiny", "--loss", "kd,at", "--pair",
              "layer3=layer3", "--epochs", "1", "--out", "student", cwd=work)
    softcache("train-student", "--cache", "cache", "--student", VIT_STUDENT, "--loss", "kd", "--epochs", "1",
              "--out", "vit_student", cwd=work)
    softcache("train-student", "--cache", "cache", "--student", "tinynet:tiny", "--loss", "ce,dkd,ofd", "--pair",
              "ofd:layer3.pre_relu=layer3.pre_relu", "--epochs", "1", "--out", "dkd_ofd_student", cwd=work)
    return {"work": work, "data": data}


@pytest.mark.slow
def test_full_cifar10_flow_in_an_ordinary_shell(flow):
    work = flow["work"]
    for run, terms in (("teacher", {"train_loss"}), ("student", {"train_kd", "train_at", "train_ce"}),
                       ("vit_student", {"train_kd", "train_ce"}),
                       ("dkd_ofd_student", {"train_ce", "train_dkd", "train_ofd"})):
        metrics = [json.loads(line) for line in (work / run / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 1 and terms <= set(metrics[0]) and 10.0 < metrics[0]["test_acc"] <= 100.0, (run, metrics)
        assert metrics[0]["images_per_s"] > 0 and (work / run / "model.pt").is_file()
    cache = open_cache(work / "cache")
    assert cache.shape("logits") == (50000, 2, 10) and cache.shape("features/layer3") == (50000, 2, 32, 8, 8)
    assert cache.shape("features/layer3.pre_relu") == (50000, 2, 32, 8, 8)
    assert {"bn/layer3.pre_relu/weight", "classifier/weight"} <= set(stored_params(cache.manifest))
    assert cache.shard_samples() <= 50000 // 16  # the dump committed many times
    labels = cache.read("labels")
    assert np.bincount(labels).tolist() == [5000] * 10


@pytest.mark.slow
def test_full_cifar10_flow_with_randaugment_mixup_and_cutmix(flow):
    """Pixel work and mixing at full size: 50,000 x 2 views through RandAugment, Mixup and CutMix (each view's
    partner decoded and augmented too), and a student replaying them in DataLoader workers, every replayed view
    checked against its CRC-32."""
    work, data = flow["work"], flow["data"]
    softcache("dump-teacher", "--teacher", "tinynet:tiny", "--weights", "teacher/model.pt", "--data", data,
              "--views", "2", "--aa", "rand-m9-n2", "--mixup", "0.8", "--cutmix", "1.0", "--out", "mixed", cwd=work)
    softcache("train-student", "--cache", "mixed", "--student", "tinynet:tiny", "--loss", "kd,ce", "--epochs", "1",
              "--out", "mixed_student", cwd=work)
    cache = open_cache(work / "mixed")
    assert cache.shape("views/seed") == (50000, 2) and cache.shape("views/mix") == (50000, 2, 6)
    mixes, lam = cache.read("views/mix"), cache.read("views/lam")
    cut = mixes[..., 4] > 0
    assert (mixes[..., 0] >= 0).all()  # --mix-prob 1: every view is mixed, about half of them by CutMix
    assert 0.45 < cut.mean() < 0.55 and (lam < 1).mean() > 0.9
    metrics = [json.loads(line) for line in (work / "mixed_student" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and {"train_kd", "train_ce"} <= set(metrics[0]) and metrics[0]["images"] >= 49_000
    assert np.isfinite(metrics[0]["train_loss"]) and metrics[0]["test_acc"] > 10.0, metrics


@pytest.mark.slow
def test_killed_logits_only_dump_resumes_past_the_start(flow):
    work, data = flow["work"], flow["data"]
    args = ["dump-teacher", "--teacher", "tinynet:tiny", "--weights", "teacher/model.pt", "--data", data,
            "--views", "2", "--out", "logits"]
    proc = subprocess.Popen([SCRIPT, *args], cwd=work, env=ENV, preexec_fn=ordinary_shell,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # kill once a few shards are committed
        if committed_samples(work / "logits") >= 3 * 4096:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the dump finished before it could be killed"
    committed = committed_samples(work / "logits")
    assert 0 < committed < 50000
    out = softcache(*args, cwd=work).stdout
    shard = open_cache(work / "logits").shard_samples()
    computed = -(-50000 // shard) - committed // shard  # only the shards the killed dump had not committed
    assert f"resumed: {committed} samples were committed, {computed} shards computed" in out, out
    # the resumed cache is intact and holds what the teacher computes, on samples from both sides of the kill
    check = softcache("verify", "logits", "--teacher", "tinynet:tiny", "--weights", "teacher/model.pt",
                      "--samples", "64", cwd=work).stdout
    assert check.rstrip().endswith("ok"), check
