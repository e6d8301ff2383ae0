"""`softcache report`: what it reads from the run folders and the cache, and the arithmetic of the cost table."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import load_teacher
from softcache.cli import cli
from softcache.data import load_source
from softcache.dump import dump_teacher
from softcache.models import file_sha256
from softcache.report import collect, markdown
from softcache.store import open_cache
from softcache.views import Augment


def fake_run(folder: Path, config: dict, *, acc: float, wall: float, images: int, epochs: int = 2) -> None:
    """A finished run folder as fit writes it (the report reads nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    curve = [acc / 2, acc][-epochs:]
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1, "test_acc": a}) + "\n"
                                                  for e, a in enumerate(curve)))
    (folder / "summary.json").write_text(json.dumps({"test_acc": acc, "best_test_acc": acc, "epochs": epochs,
                                                     "wall_s": wall, "images": images}))


def test_report_groups_seeds_finds_the_teacher_and_estimates_the_online_cost(tmp_path, teacher_weights):
    root = tmp_path / "runs"
    (root / "teacher").mkdir(parents=True)
    shutil.copy(teacher_weights, root / "teacher" / "model.pt")
    fake_run(root / "teacher", {"model": "resnet8", "seed": 0}, acc=90.0, wall=100.0, images=4000)
    dump_teacher(load_teacher(teacher_weights), load_source("synthetic:20", "train"), root / "cache",
                 augment=Augment("cifar", image_size=32), views=2, workers=0,
                 teacher_info={"arch": "resnet8", "weights_sha256": file_sha256(teacher_weights)})
    cost = open_cache(root / "cache").cost
    assert cost["views"] == 40 and cost["devices"] == ["cpu"] and 0 < cost["teacher_s"] <= cost["wall_s"]
    student = {"cache": str(root / "cache"), "student": "resnet8", "losses": ["kd"], "optim": {"epochs": 2}}
    fake_run(root / "students" / "kd_s0", {**student, "seed": 0}, acc=70.0, wall=10.0, images=1000)
    fake_run(root / "students" / "kd_s1", {**student, "seed": 1}, acc=74.0, wall=12.0, images=1000)
    fake_run(root / "students" / "ce", {**student, "losses": ["ce"], "seed": 0}, acc=60.0, wall=9.0, images=1000)
    fake_run(root / "students" / "live", {"teacher": "resnet8", "teacher_weights": "w.pt", "student": "resnet8",
                                          "losses": ["kd"], "seed": 0}, acc=72.0, wall=30.0, images=1000)
    fake_run(root / "baseline", {"model": "resnet8", "seed": 3}, acc=61.0, wall=8.0, images=1000)

    report = collect(root)
    kinds = {run.name: run.kind for run in report.runs}
    assert kinds == {"teacher": "teacher", "baseline": "teacher", "students/kd_s0": "cached",
                     "students/kd_s1": "cached", "students/ce": "cached", "students/live": "online"}
    configs = {c["label"]: c for c in report.configurations()}
    assert configs["students/kd"]["mean"] == pytest.approx(72.0) and configs["students/kd"]["seeds"] == [0, 1]
    assert configs["students/kd"]["std"] == pytest.approx(2 ** 0.5 * 2)
    costs = report.costs()
    rows = {r["stage"]: r for r in costs["rows"]}
    per_view = cost["teacher_s"] / cost["views"]  # seconds of teacher forward per view, as the dump measured
    assert rows["train-teacher teacher"]["online_s"] == 100.0  # the teacher is trained either way
    assert rows["train-teacher baseline (baseline)"]["online_s"] == 8.0  # a CE run no cache came from
    assert rows["train-student students/kd_s0"]["online_s"] == pytest.approx(10.0 + 1000 * per_view)
    assert rows["train-student students/ce"]["online_s"] == 9.0  # ce alone needs no teacher
    assert rows["dump-teacher cache"]["wall_s"] == cost["wall_s"] and rows["dump-teacher cache"]["online_s"] == 0.0
    cached = 100.0 + cost["wall_s"] + 10.0 + 12.0 + 9.0 + 8.0
    online = 100.0 + 10.0 + 12.0 + 2000 * per_view + 9.0 + 8.0
    assert costs["cached_s"] == pytest.approx(cached) and costs["online_s"] == pytest.approx(online)
    assert costs["saving"] == pytest.approx(online / cached)
    assert costs["measured_online"] == [{"run": "students/live", "wall_s": 30.0, "images": 1000}]
    text = markdown(report)
    assert "| students/kd | cached | resnet8 | kd | 2 | 72.00% | 70.00% | 74.00% | 2.83 |" in text
    assert "Measured online runs (the teacher in the loop): students/live 30.0 s." in text

    result = CliRunner().invoke(cli, ["report", str(root)])
    assert result.exit_code == 0, result.output
    assert (root / "report.md").read_text() == text and (root / "report.png").stat().st_size > 20_000
    assert f"saving {online / cached:.2f}x" in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = CliRunner().invoke(cli, ["report", str(empty)])
    assert refused.exit_code == 1 and "holds no finished run (summary.json) and no complete cache" in refused.stderr
