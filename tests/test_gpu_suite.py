"""benchmarks/gpu_suite.sh, the one command for the GPU figures, run end to end on CPU with a tiny configuration."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from softcache.pipeline import load_pipeline

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ["ce", "kd", "kd_online", "kd_at", "fitnets", "sp", "rkd", "pkt", "crd", "dkd", "dist", "ofd"]


def test_the_suite_recipe_is_the_documented_one():
    suite = load_pipeline(REPO / "benchmarks" / "gpu_suite.toml")
    assert suite.teacher.model == "resnet56" and suite.dump.data == "imagefolder:data/cifar10-jpeg"
    assert [name for name, _ in suite.students] == [f"{s}_s{seed}" for s in STUDENTS for seed in (0, 1)]
    assert {s.student for _, s in suite.students} == {"resnet20"}
    online = dict(suite.students)["kd_online_s1"]
    assert online.teacher == "resnet56" and online.seed == 1 and online.losses == ("kd",)


@pytest.mark.slow
def test_gpu_suite_runs_end_to_end_on_cpu(tmp_path, cifar_subset):
    out = tmp_path / "suite"
    env = {**os.environ,
           "SUITE_SET": "epochs=1 batch_size=16 workers=0 model=resnet8 student=resnet8 device=cpu",
           "SUITE_BENCH_ARGS": "--teacher resnet8 --student resnet8 --batch-size 8 --steps 1 --rounds 1 --workers 0 "
                               "--device cpu",
           "SUITE_DROP_CACHE": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(out), f"imagefolder:{cifar_subset}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    suite = (out / "suite.md").read_text()
    assert suite.startswith("# softcache GPU suite: cpu") and "**Incomplete**" not in suite
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert "student KD (online teacher)" in {row["name"] for row in bench["rows"]}
    assert "student KD (online teacher)" in suite and [p.name for p in (out / "bench").iterdir()] == ["bench.json"]
    runs = out / "runs"
    for name in STUDENTS:  # two seeds of every student, each a finished run
        for seed in (0, 1):
            summary = json.loads((runs / "students" / f"{name}_s{seed}" / "summary.json").read_text())
            config = json.loads((runs / "students" / f"{name}_s{seed}" / "config.json").read_text())
            assert config["seed"] == seed and summary["epochs"] == 1
            kind = "online" if name == "kd_online" else "cached"
            row = (f"| students/{name}_s{seed} | {kind} | resnet8 | {'+'.join(config['losses'])} | {seed} | 1 | "
                   f"{summary['test_acc']:.2f}% |")
            assert row in suite, row
        assert re.search(rf"^\| students/{name} \| .* \| 2 \| ", suite, re.M), name  # mean over the two seeds
    assert "![report](runs/report.png)" in suite and (runs / "report.png").stat().st_size > 20_000
    assert not (runs / "cache").exists()  # SUITE_DROP_CACHE: the next call re-dumps it
    # a second call finds everything finished: no stage runs again
    again = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(out), f"imagefolder:{cifar_subset}"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    log = (out / "run.log").read_text()
    assert log.count("is finished: skipped") == 1 + 2 * len(STUDENTS)
