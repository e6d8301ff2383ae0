"""The run folder (softcache/runs.py): its kind recorded, the resume rules in one place, runs read back by kind,
and the refusals that come before anything is loaded."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import invoke
from softcache import progress
from softcache.locks import WriterLock, cache_lock_path, run_lock_path
from softcache.runs import read_run


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def student_args(cache: Path, out: Path, *extra) -> list:
    return ["train-student", "--cache", cache, "--student", "resnet8", "--loss", "kd", "--epochs", "2",
            "--batch-size", "10", "--workers", "0", "--device", "cpu", "--out", out, *extra]


def test_an_unfinished_run_resumes_with_other_workers_and_refuses_other_settings(tmp_path, small_cache, monkeypatch):
    run = tmp_path / "run"
    real_say = progress.say

    def stop_after_the_first_epoch(text: str) -> None:
        real_say(text)
        if "epoch 1/2" in text:  # said once the epoch's checkpoint is written
            raise KeyboardInterrupt

    monkeypatch.setattr(progress, "say", stop_after_the_first_epoch)
    assert invoke(*student_args(small_cache, run)).exit_code != 0
    monkeypatch.setattr(progress, "say", real_say)
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()

    other = invoke(*student_args(small_cache, run, "--lr", "0.05"))
    assert "holds an unfinished run made with other settings (optim.lr differ)" in one_line_error(other)
    resumed = invoke(*student_args(small_cache, run, "--workers", "1", "--data-path", "loader"))
    assert resumed.exit_code == 0, resumed.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert read_run(run).kind == "student" and read_run(run).config["optim"]["workers"] == 1


def test_ensemble_reads_a_train_online_run_and_refuses_runs_of_other_datasets(tmp_path, teacher_weights):
    common = ["--epochs", "1", "--batch-size", "10", "--workers", "0", "--device", "cpu"]
    online = invoke("train-online", "--teacher", "resnet8", "--weights", teacher_weights, "--student", "resnet8",
                    "--data", "synthetic:20", "--loss", "kd", *common, "--out", tmp_path / "online")
    assert online.exit_code == 0, online.output
    plain = invoke("train-teacher", "--model", "resnet8", "--data", "synthetic:30", *common, "--out", tmp_path / "ce")
    assert plain.exit_code == 0, plain.output
    assert read_run(tmp_path / "online").kind == "online" and read_run(tmp_path / "ce").kind == "teacher"

    alone = invoke("ensemble", tmp_path / "online", "--workers", "0", "--device", "cpu")
    assert alone.exit_code == 0, alone.output
    assert "ensemble of 1" in alone.stdout
    mixed = invoke("ensemble", tmp_path / "online", tmp_path / "ce", "--workers", "0", "--device", "cpu")
    assert "trained on different datasets" in one_line_error(mixed) and "pass --data SPEC" in mixed.stderr
    both = invoke("ensemble", tmp_path / "online", tmp_path / "ce", "--data", "synthetic:20", "--workers", "0",
                  "--device", "cpu")
    assert both.exit_code == 0 and "ensemble of 2" in both.stdout, both.output


def test_ensemble_refuses_a_save_path_it_cannot_write_before_computing(tmp_path, monkeypatch):
    import softcache.ensemble
    monkeypatch.setattr(softcache.ensemble, "ensemble", lambda *a, **k: pytest.fail("computed before refusing"))
    (tmp_path / "run").mkdir()
    refused = invoke("ensemble", tmp_path / "run", "--save", tmp_path / "missing" / "x.npz")
    assert "--save" in one_line_error(refused) and "does not exist" in refused.stderr


NO_TORCH_YET = ("import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, "
                "file=sys.stderr)); from softcache.cli import main; main()")


def test_a_second_writer_is_refused_before_anything_is_loaded(tmp_path):
    """The lock is looked at first: the refusal comes before torch is imported or the data is read."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    commands = {
        cache: ["dump-teacher", "--teacher", "resnet8", "--weights", "w.pt", "--data", "synthetic:20", "--out", cache],
        run: ["train-teacher", "--model", "resnet8", "--data", "synthetic:20", "--out", run],
    }
    for out, lock in ((cache, cache_lock_path(cache)), (run, run_lock_path(run))):
        with WriterLock(lock, "held by the test"):
            done = subprocess.run([sys.executable, "-c", NO_TORCH_YET, *map(str, commands[out])],
                                  capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        error, imported = done.stderr.strip().splitlines()
        assert "is being written by another softcache process" in error, done.stderr
        assert imported == "torch imported: False"


def test_a_refused_or_finished_dump_leaves_no_lock_file(tmp_path, small_cache, teacher_weights):
    other = invoke("dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data", "synthetic:20",
                   "--views", "2", "--workers", "0", "--out", small_cache)
    assert "made with other options" in one_line_error(other)
    assert not cache_lock_path(small_cache).exists()
    done = invoke("dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data", "synthetic:20",
                  "--workers", "0", "--out", tmp_path / "new")
    assert done.exit_code == 0, done.output
    assert not cache_lock_path(tmp_path / "new").exists() and not run_lock_path(tmp_path / "new").exists()
