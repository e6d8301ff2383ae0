"""End to end through the CLI: real CIFAR-10 JPEGs, and the quickstart pipeline as a newcomer runs it."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest
import zarr

from helpers import invoke

REPO = Path(__file__).resolve().parents[1]


def ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def check_run_folder(run: Path, terms: set[str], epochs: int) -> dict:
    assert (run / "model.pt").is_file()
    config = json.loads((run / "config.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert len(metrics) == epochs and [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    assert {f"train_{t}" for t in terms} | {"train_loss", "train_acc", "test_acc", "lr"} <= set(metrics[-1])
    assert summary["test_acc"] == metrics[-1]["test_acc"] and 0.0 <= summary["test_acc"] <= 100.0
    return config


@pytest.mark.slow
@pytest.mark.parametrize("cache_name", ["cache", "cache.h5"])
def test_cifar_jpeg_subset_teacher_dump_student(tmp_path, cifar_subset, cache_name):
    data = f"imagefolder:{cifar_subset}"
    teacher, cache, student = tmp_path / "teacher", tmp_path / cache_name, tmp_path / "student"
    ok("train-teacher", "--model", "resnet8", "--data", data, "--augment", "cifar", "--epochs", "2",
       "--batch-size", "32", "--workers", "1", "--out", teacher, "--device", "cpu")
    config = check_run_folder(teacher, {"loss"}, 2)
    assert config["model"] == "resnet8" and config["optim"]["epochs"] == 2
    out = ok("dump-teacher", "--teacher", "resnet8", "--weights", teacher / "model.pt", "--data", data,
             "--augment", "cifar", "--views", "3", "--layers", "layer2,layer3", "--out", cache, "--workers", "1")
    assert re.search(r"cache [0-9a-f]{16} complete: .*\(120 samples x 3 views", out)
    if cache.suffix == ".h5":  # other tools read either backend with plain h5py / zarr
        group = h5py.File(cache, "r")
        manifest = json.loads(group.attrs["softcache"])
    else:
        group = zarr.open_group(str(cache), mode="r")
        manifest = group.attrs["softcache"]
    assert manifest["complete"] and manifest["dataset"]["spec"] == data and manifest["dataset"]["num_samples"] == 120
    assert manifest["dataset"]["classes"][0] == "airplane" and len(manifest["teacher"]["weights_sha256"]) == 64
    shapes = {name: group[name].shape for name in ("labels", "logits", "views/box", "views/flip",
                                                   "features/layer2", "features/layer3")}
    assert shapes == {"labels": (120,), "logits": (120, 3, 10), "views/box": (120, 3, 4), "views/flip": (120, 3),
                      "features/layer2": (120, 3, 32, 16, 16), "features/layer3": (120, 3, 64, 8, 8)}
    assert "features/layer3" in ok("inspect", cache)
    # ls keeps its columns aligned with a long dataset spec (the subset's absolute folder)
    listed = ok("ls", tmp_path).splitlines()
    header, row = listed[0], listed[1]
    assert len(manifest["dataset"]["resolved"]) > 30 and row.endswith(str(cache))
    for column in ("teacher", "dataset", "layers", "complete", "path"):  # left-aligned: starts line up
        assert row[header.index(column) - 1] == " " and row[header.index(column)] != " ", (column, listed)
    for column in ("views", "size"):  # right-aligned: ends line up
        end = header.index(column) + len(column)
        assert row[end - 1] != " " and row[end] == " ", (column, listed)
    ok("train-student", "--cache", cache, "--student", "resnet8", "--loss", "kd,at,fitnets", "--pair", "layer3=layer3",
       "--pair", "layer2=layer2", "--epochs", "2", "--batch-size", "32", "--workers", "1", "--out", student)
    config = check_run_folder(student, {"ce", "kd", "at", "fitnets"}, 2)
    assert config["data"] is None and config["pairs"] == [["layer3", "layer3"], ["layer2", "layer2"]]


@pytest.mark.slow
def test_quickstart_pipeline_runs_offline_and_skips_finished_stages(tmp_path):
    env_root = tmp_path / "runs"
    script = shutil.which("softcache")
    assert script, "the softcache console script is not installed: pip install -e '.[dev]'"
    cmd = [script, "run", str(REPO / "pipelines" / "quickstart.toml"), "--root", str(env_root)]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    kd_at = env_root / "students" / "kd_at"
    check_run_folder(kd_at, {"ce", "kd", "at"}, 6)
    check_run_folder(env_root / "students" / "ce", {"ce"}, 6)
    table = first.stdout.splitlines()
    assert any(line.startswith("kd_at") and "kd+at" in line for line in table)
    assert any(line.startswith("teacher") for line in table)
    # output to a pipe, not a terminal: a plain line for every epoch of every stage, and for the dump
    for run, epochs in (("teacher", 12), ("ce", 6), ("kd_at", 6)):
        for epoch in range(1, epochs + 1):
            assert re.search(rf"^{run}: epoch {epoch}/{epochs}, loss [0-9.]+, .* images/s, .* s elapsed$",
                             first.stderr, re.M), (run, epoch, first.stderr)
    assert re.search(r"^dump-teacher cache: 2,000 samples in [0-9.]+ s", first.stderr, re.M), first.stderr
    check_report(env_root, first.stdout)
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("skipped") == 4


def check_report(root: Path, stdout: str) -> None:
    """report.png is a PNG of a sensible size; report.md and the amortisation table hold the runs' own numbers."""
    from PIL import Image
    with Image.open(root / "report.png") as image:
        assert image.format == "PNG" and 1000 <= image.width <= 3000 and 400 <= image.height <= 1500
        image.load()  # decodes the whole image
    report = (root / "report.md").read_text()
    teacher = json.loads((root / "teacher" / "summary.json").read_text())
    for name in ("ce", "kd_at"):
        summary = json.loads((root / "students" / name / "summary.json").read_text())
        assert summary["images"] == 6 * (2000 // 128) * 128  # every training view of every epoch, counted
        row = f"| students/{name} | cached | resnet8 | {name.replace('_', '+')} | 0 | 6 | {summary['test_acc']:.2f}% |"
        assert row in report
        assert re.search(rf"^train-student students/{name} +{summary['wall_s']:,.1f} ", stdout, re.M)
    assert f"| train-teacher teacher | {teacher['wall_s']:,.1f} |" in report
    # the dump: its size on disk, and the online estimate of kd_at from the dump's measured teacher rate
    from softcache.store import open_cache, where
    cache = open_cache(root / "cache")
    size, cost = where.total_size(root / "cache"), cache.cost
    assert cost["views"] == 2000 * 4 and cost["devices"] == ["cpu"] and 0 < cost["teacher_s"] < cost["wall_s"]
    assert re.search(rf"^dump-teacher cache +{cost['wall_s']:,.1f} +{size / 2**20:,.1f} +{size / 2000:,.0f} ", stdout,
                     re.M)
    kd_at = json.loads((root / "students" / "kd_at" / "summary.json").read_text())
    estimate = kd_at["wall_s"] + kd_at["images"] * cost["teacher_s"] / cost["views"]
    assert f"| train-student students/kd_at | {kd_at['wall_s']:,.1f} | - | - | {estimate:,.1f} |" in report
    assert re.search(r"saving [0-9.]+x", stdout)


def test_the_readme_figure_is_the_current_quickstarts():
    """docs/quickstart_report.png is regenerated whenever pipelines/quickstart.toml changes (README says how)."""
    import hashlib
    from PIL import Image
    recipe = hashlib.sha256((REPO / "pipelines" / "quickstart.toml").read_bytes()).hexdigest()
    assert (REPO / "docs" / "quickstart_report.sha256").read_text().strip() == recipe, \
        "pipelines/quickstart.toml changed: regenerate docs/quickstart_report.png (see README, Quickstart)"
    with Image.open(REPO / "docs" / "quickstart_report.png") as image:
        assert image.format == "PNG" and image.width >= 1000
    assert "docs/quickstart_report.png" in (REPO / "README.md").read_text()
