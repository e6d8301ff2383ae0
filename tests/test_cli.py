"""The CLI: bad input gives one line and a non-zero exit; train-student never touches a teacher."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from helpers import invoke
from softcache import cifar_resnet, models
from softcache.data import load_source
from softcache.losses.registry import REGISTRY
from softcache.dump import dump_teacher
from softcache.store import open_cache
from softcache.models import build_model
from softcache.views import Augment


def assert_fails(result, pattern: str) -> None:
    """Exit code != 0, exactly one line on stderr matching `pattern`, and no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def resnet20_cache(tmp_path_factory):
    """A cache dumped from a resnet20 teacher (random weights) on synthetic:20, with layer3."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("r20") / "cache"
    dump_teacher(build_model("resnet20", 10).eval(), load_source("synthetic:20", "train"), out,
                 augment=Augment("cifar", image_size=32), views=2, layers=["layer3"], workers=0,
                 teacher_info={"arch": "resnet20", "weights_sha256": "test"})
    return out


TEACHER = ["train-teacher", "--model", "resnet8", "--epochs", "1", "--workers", "0"]


@pytest.mark.parametrize("args, pattern", [
    (["--data", "imagefolder:/no/such/folder"],
     r"dataset folder '/no/such/folder' does not exist; imagefolder:ROOT needs ROOT/train"),
    (["--data", "mnist"],
     r"unknown dataset 'mnist'; valid: cifar10\[:ROOT\], cifar100\[:ROOT\], imagefolder:ROOT, synthetic"),
    (["--data", "synthetic:20", "--augment", "random"],
     r"Invalid value for '--augment': 'random' is not a policy; valid: cifar, imagenet, none, "
     r"or package.module:callable"),
    (["--data", "synthetic:20", "--model", "resnet21"], r"unknown model 'resnet21'; valid: resnet8, "),
])
def test_train_teacher_bad_input(tmp_path, args, pattern):
    # --model given twice: the later one wins, so each case can override it
    assert_fails(invoke(*TEACHER, "--out", tmp_path / "run", *args), pattern)
    assert not (tmp_path / "run" / "summary.json").exists()


def _dump(weights, out, *args):
    return invoke("dump-teacher", "--teacher", "resnet8", "--weights", weights, "--data", "synthetic:20",
                  "--out", out, "--workers", "0", *args)


def test_dump_bad_input(tmp_path, teacher_weights):
    assert_fails(_dump(teacher_weights, tmp_path / "c", "--layers", "layer3,layer5"),
                 r"unknown layer 'layer5'; valid: embedding, conv1, layer1, layer2, layer3, pool, fc")
    assert_fails(_dump(teacher_weights, tmp_path / "c", "--augment", "imagenet", "--views", "all"),
                 r"--views all needs a finite policy \(cifar, none\); 'imagenet' draws its views")
    assert_fails(invoke("dump-teacher", "--teacher", "resnet20", "--weights", teacher_weights, "--data", "synthetic:20",
                        "--out", tmp_path / "c"), r"checkpoint .* does not fit CifarResNet: missing keys: layer1\.1\.")
    assert_fails(_dump(tmp_path / "nope.pt", tmp_path / "c"), r"weights file .*nope\.pt' does not exist")
    assert not (tmp_path / "c").exists()  # every refusal came before anything was written


def test_dump_never_overwrites_a_complete_cache_or_foreign_folder(tmp_path, teacher_weights, small_cache):
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    before = (cache / "zarr.json").read_text()
    assert_fails(_dump(teacher_weights, cache), r"holds a complete cache made with other options "
                 r"\(augment.seed, augment.views, layers, teachers differ\); choose another --out, or pass --overwrite")
    assert (cache / "zarr.json").read_text() == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    assert_fails(_dump(teacher_weights, mine, "--overwrite"), r"exists and is not a softcache cache")
    assert (mine / "keep.txt").read_text() == "x"


STUDENT = ["train-student", "--student", "resnet8", "--epochs", "1", "--workers", "0", "--batch-size", "8"]


def test_train_student_bad_input(tmp_path, small_cache, cifar_subset):
    run = tmp_path / "run"
    assert_fails(invoke(*STUDENT, "--cache", tmp_path / "none", "--out", run), r"cache .* does not exist")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(small_cache, incomplete)
    meta = json.loads((incomplete / "zarr.json").read_text())
    meta["attributes"]["softcache"]["complete"] = False
    (incomplete / "zarr.json").write_text(json.dumps(meta))
    assert_fails(invoke(*STUDENT, "--cache", incomplete, "--out", run),
                 r"cache .* is incomplete: its dump died; rerun its dump-teacher command to resume it")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--data", "synthetic:30"),
                 r"--data synthetic:30 is not the dataset the cache was dumped from \(synthetic:20, 20 samples\)")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--loss", "kd,at", "--pair", "layer3=layer1"),
                 r"the cache has no features for teacher layer 'layer1'; cached layers: layer2, layer3")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--loss", "kd,at", "--pair", "block9=layer3"),
                 r"unknown layer 'block9'; valid: embedding, conv1, layer1")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--loss", "kd,at"),
                 r"at needs a --pair of feature maps \(e.g. --pair layer3=layer3\)")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--loss", "kd,dark"),
                 re.escape(f"unknown loss 'dark'; valid: {', '.join(sorted(REGISTRY))}"))
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--loss", "ce,dkd", "--loss-option",
                        "dkd.gamma=1"),
                 r"--loss-option dkd.gamma=1: dkd has no setting 'gamma'; its settings: dkd.alpha \(default 1\), "
                 r"dkd.beta \(default 8\), dkd.warmup \(default 20\)")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--loss-option", "dkd.beta=2"),
                 r"--loss-option dkd.beta=2 names 'dkd', which is not an active term; active: ce, kd")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--loss-option", "dkd=2"),
                 r"'dkd=2' is not TERM.KEY=VALUE \(e.g. dkd.beta=2\)")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--loss", "ce,dist", "--kd-standardize"),
                 r"--kd-standardize changes kd and dkd, and --loss has neither \(ce, dist\); add kd or dkd")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--loss", "dkd", "--label-smoothing", "0.1"),
                 r"--label-smoothing smooths the ce term, which --loss does not have; add ce")
    three = tmp_path / "three"
    for split in ("train", "test"):
        for cls in ("airplane", "bird", "cat"):
            shutil.copytree(cifar_subset / split / cls, three / split / cls)
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--data", f"imagefolder:{three}"),
                 r"class-count mismatch: the cache has 10 classes, --data imagefolder:.* has 3")
    assert not (run / "summary.json").exists()


def test_train_student_never_builds_or_loads_a_teacher(tmp_path, resnet20_cache, monkeypatch):
    real_init = cifar_resnet.CifarResNet.__init__

    def no_teacher(self, blocks, widths, num_classes=10):
        if blocks == 3:  # resnet20 is the teacher's architecture
            raise AssertionError("train-student built the teacher architecture")
        real_init(self, blocks, widths, num_classes)

    def no_load(*args, **kwargs):
        raise AssertionError("train-student loaded a checkpoint")

    monkeypatch.setattr(cifar_resnet.CifarResNet, "__init__", no_teacher)
    monkeypatch.setattr(torch, "load", no_load)
    monkeypatch.setattr(models, "load_weights", no_load)
    with pytest.raises(AssertionError):  # the trap works
        build_model("resnet20", 10)
    result = invoke(*STUDENT, "--cache", resnet20_cache, "--out", tmp_path / "s", "--loss", "kd,at,fitnets",
                    "--pair", "layer3=layer3")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_kd", "train_ce", "train_at", "train_fitnets", "test_acc"} <= set(metrics)


def test_finished_run_is_not_overwritten(tmp_path, small_cache):
    run = tmp_path / "s"
    assert invoke(*STUDENT, "--cache", small_cache, "--out", run).exit_code == 0
    summary = (run / "summary.json").read_text()
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run),
                 r"holds a finished run \(summary\.json\); pass --overwrite")
    assert (run / "summary.json").read_text() == summary
    assert invoke(*STUDENT, "--cache", small_cache, "--out", run, "--overwrite").exit_code == 0


def test_inspect_shows_arrays_and_bytes(small_cache):
    result = invoke("inspect", small_cache)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    manifest = open_cache(small_cache).manifest
    assert lines[0] == f"cache    {manifest['id']} complete: {small_cache}"  # the summary first
    assert lines[2] == "dataset  synthetic:20 (20 samples, 10 classes)"
    assert lines[3] == "views    cifar, 5 per sample, 32x32, seed 7"
    assert lines[4] == "targets  logits fp16; features: layer2, layer3"
    whole = invoke("inspect", "--json", small_cache)
    assert whole.exit_code == 0 and json.loads(whole.stdout)["manifest"] == manifest
    assert {a["name"] for a in json.loads(whole.stdout)["arrays"]} >= {"logits", "features/layer3", "views/box"}
    row = next(line for line in result.stdout.splitlines() if line.startswith("features/layer3"))
    assert "(20, 5, 64, 8, 8)" in row and "float16" in row
    on_disk = int(row.split()[-3].replace(",", ""))
    per_sample = float(row.split()[-2])
    assert on_disk > 0 and per_sample == pytest.approx(on_disk / 20, abs=0.1)


def test_values_are_checked_where_they_enter(tmp_path, small_cache, teacher_weights):
    run = tmp_path / "run"
    student = [*STUDENT, "--cache", small_cache, "--out", run]
    for args, pattern in [
        (["--lr", "0"], r"Invalid value for '--lr'"),
        (["--temperature", "-1"], r"Invalid value for '--temperature'"),
        (["--alpha", "1.5"], r"Invalid value for '--alpha'"),
        (["--beta", "-3"], r"Invalid value for '--beta'"),
        (["--hint-weight", "-1"], r"Invalid value for '--hint-weight'"),
        (["--weight", "kd=-0.5"], r"'kd=-0.5': a loss weight must be >= 0"),
        (["--weight", "dark=1"], r"unknown loss 'dark' in 'dark=1'"),
        (["--loss", "kd,kd"], r"'kd' is given twice in 'kd,kd'"),
        (["--loss", "kd,,at"], r"'kd,,at' has an empty entry"),
        (["--loss", "kd", "--pair", "layer3=layer3"],
         r"--pair is given, but no loss uses it; add one of fitnets, at, sp, nst, vid, gram, fsp, kdsvd, reviewkd"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"],
         r"Invalid value for '--device'"),
    ]:
        assert_fails(invoke(*student, *args), pattern)
    assert not run.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", a_file / "run"),
                 r"cannot create the run folder .*'.*a_file' is a file, not a folder")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", small_cache), r"is a softcache cache; give a folder")
    assert a_file.read_text() == "x" and open_cache_ok(small_cache)
    dump = ["dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data", "synthetic:20"]
    assert_fails(invoke(*dump, "--out", tmp_path / "c", "--layers", "layer3,layer3"), r"'layer3' is given twice")
    assert_fails(invoke(*dump, "--out", tmp_path / "c", "--layers", "layer2,"), r"has an empty entry")
    assert_fails(invoke(*dump, "--out", tmp_path / "c", "--logits", "sampled:5:0"), r"TAU must be > 0")
    assert_fails(invoke(*dump, "--out", a_file / "c"), r"cannot write cache .*'.*a_file' is a file, not a folder")
    # /proc takes no new folders, even from root (chmod would not stop a root test run)
    assert_fails(invoke(*dump, "--out", "/proc/softcache/c"), r"cannot write cache '/proc/softcache/c' \(.*\); give "
                 "--out a path in a folder that can be written")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", "/proc/softcache/run"),
                 r"cannot create the run folder '/proc/softcache/run' \(.*\); give --out a folder that can be written")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"")  # the other run died after an epoch: it is never restarted
    (unfinished / "config.json").write_text(json.dumps({"student": "resnet20", "seed": 0}))
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", unfinished),
                 r"'.*unfinished' holds an unfinished run made with other settings \(.*student.*\); rerun it with "
                 r"its own settings to continue it, pass --overwrite to start over")
    assert (unfinished / "checkpoint.pt").exists()
    assert_fails(invoke("verify", small_cache, "--tolerance", "-1"), r"Invalid value for '--tolerance'")
    assert_fails(invoke(*STUDENT[:-1], "64", "--cache", small_cache, "--out", run),
                 r"the training split has 20 samples, fewer than --batch-size 64: no full batch to train on")
    assert_fails(invoke("train-teacher", "--model", "resnet8", "--data", "synthetic:20", "--batch-size", "32",
                        "--out", run), r"has 20 samples, fewer than --batch-size 32")
    assert not run.exists()


def open_cache_ok(path) -> bool:
    from softcache.store import open_cache
    return open_cache(path).manifest["complete"]


def test_help_and_argument_errors_answer_without_importing_torch():
    import subprocess
    import sys
    probe = ("import sys\nfrom click.testing import CliRunner\nfrom softcache.cli import cli\n"
             "for args in (['--help'], ['dump-teacher', '--help'], ['train-student', '--help'], ['run', '--help'],\n"
             "             ['train-online', '--help'], ['report', '--help'], ['-q', 'inspect', '--help'],\n"
             "             ['train-student', '--cache', 'c', '--student', 's', '--loss', 'dark', '--out', 'r']):\n"
             "    assert CliRunner().invoke(cli, args).exit_code in (0, 2), args\n"
             "print(sorted(m for m in ('torch', 'torchvision', 'zarr', 'h5py', 'matplotlib') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # none of the heavy libraries was imported


def test_the_names_the_cli_offers_are_the_implemented_ones():
    from softcache import names
    from softcache.losses import LOSSES
    from softcache.store import BACKENDS
    from softcache.targets import TARGET_KINDS
    from softcache.views import POLICIES, Augment
    assert set(names.LOSS_NAMES) == set(LOSSES)
    assert (POLICIES, TARGET_KINDS, BACKENDS) == (names.POLICIES, names.TARGET_KINDS, names.BACKENDS)
    for policy in names.POLICIES:
        Augment(policy, image_size=32)  # each one is a policy Augment knows


def test_train_online_draws_fresh_views_as_train_teacher_does(tmp_path, teacher_weights):
    """With ce alone, train-online is train-teacher with a teacher idling beside it: the same fresh views each
    epoch, the same steps, the same final weights."""
    common = ["--data", "synthetic:40", "--epochs", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
              "--seed", "5"]
    plain = invoke("train-teacher", "--model", "resnet8", *common, "--out", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    online = invoke("train-online", "--teacher", "resnet8", "--weights", teacher_weights, "--student", "resnet8",
                    "--loss", "ce", *common, "--out", tmp_path / "online")
    assert online.exit_code == 0, online.output
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "online" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kd_at = invoke("train-online", "--teacher", "resnet8", "--weights", teacher_weights, "--student", "resnet8",
                   "--loss", "kd,at", "--pair", "layer3=layer3", *common, "--out", tmp_path / "kd_at")
    assert kd_at.exit_code == 0, kd_at.output
    config = json.loads((tmp_path / "kd_at" / "config.json").read_text())
    assert config["teacher_weights"] == str(teacher_weights) and config["views_from"] is None
    metrics = [json.loads(line) for line in (tmp_path / "kd_at" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and {"train_kd", "train_at", "train_ce"} <= set(metrics[-1])
    for args, message in [
        (["--loss", "kd"], r"train-online needs --data SPEC \(or --views-from CACHE"),
        (["--loss", "kd", "--data", "synthetic:40", "--weights", tmp_path / "none.pt"],
         r"weights file .*none\.pt' does not exist"),
        (["--loss", "kd,at", "--data", "synthetic:40", "--pair", "layer3=layer9"], r"layer9"),
    ]:
        options = ["--teacher", "resnet8", "--weights", teacher_weights, "--student", "resnet8", "--out",
                   tmp_path / "bad", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", *args]
        result = invoke("train-online", *options)
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
        assert re.search(message, result.stderr), result.stderr


def test_models_and_writes_that_go_wrong_are_one_line(tmp_path, small_cache, teacher_weights, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))  # tinynet
    run = tmp_path / "run"
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--student", "tinynet:five_way"),
                 r"model 'tinynet:five_way' gives 5 logits per image, but the data has 10 classes")
    assert_fails(invoke(*TEACHER, "--data", "synthetic:20", "--out", run, "--model", "tinynet:five_way"),
                 r"model 'tinynet:five_way' gives 5 logits per image")
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--student", "os:getcwd"),
                 r"custom model 'os:getcwd' cannot be called as os:getcwd\(num_classes=10\)")
    assert _dump(teacher_weights, tmp_path / "cache").exit_code == 0
    assert_fails(invoke("verify", tmp_path / "cache", "--teacher", "resnet8", "--weights", teacher_weights,
                        "--data", "synthetic:30"), r"--data synthetic:30 is not the dataset the cache was dumped from")
    assert not (run / "summary.json").exists()

    real_save = torch.save

    def full_disk(value, f):
        real_save(value, f)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1450\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    assert_fails(invoke(*STUDENT, "--cache", small_cache, "--out", run, "--batch-size", "10"),
                 r"cannot write '.*checkpoint.pt' \(PytorchStreamWriter failed writing file data/0: file write "
                 r"failed\); is the disk full\? Free space and rerun the same command")
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl"]  # no checkpoint.pt.tmp left


def test_a_damaged_cache_is_not_reused(tmp_path, teacher_weights):
    cache = tmp_path / "cache"
    assert _dump(teacher_weights, cache).exit_code == 0
    shard = next(p for p in (cache / "logits" / "c").rglob("*") if p.is_file())
    shard.unlink()
    assert_fails(_dump(teacher_weights, cache), r"holds this cache, but it is damaged: .*logits.*; pass "
                 r"--overwrite to dump it again")
    again = _dump(teacher_weights, cache, "--overwrite")
    assert again.exit_code == 0, again.output
    assert open_cache(cache).check() is not None and shard.is_file()
