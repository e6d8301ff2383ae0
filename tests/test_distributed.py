"""torchrun: a dump by several processes, each computing whole shards of its own (gloo on CPU)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import ENV, arrays, dump_args
from softcache.cli import cli
from softcache.locks import cache_lock_path, holder, run_lock_path
from softcache.models import build_model
from softcache.store import committed_samples, open_cache


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "softcache"]


def kill_every_process_of(marker: str, lock: Path) -> None:
    """SIGKILL every process whose command line holds `marker` (torchrun's workers live in sessions of their
    own), and wait until they are gone and the writer's `lock` is free. The scan repeats until it finds none
    alive (a process forked between a scan and the kills, such as a DataLoader worker, inherits rank 0's lock),
    and the lock is waited for itself: a process that is exiting reads as an empty command line while it still
    holds its files."""
    deadline = time.monotonic() + 30
    while True:
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (marker in (entry / "cmdline").read_bytes().decode(errors="replace")
                                             or _holds(entry, lock)):
                    pids.append(int(entry.name))
            except OSError:
                continue
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]
        if not alive and holder(lock) is None:
            return
        assert time.monotonic() < deadline, "killed processes did not end"
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _holds(proc: Path, path: Path) -> bool:
    """Whether the process `/proc/PID` has `path` open (whatever its command line reads as)."""
    target = str(path.resolve())
    try:
        return any(os.readlink(fd) == target for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    except (OSError, IndexError):
        return "zombie"


@pytest.mark.slow
def test_a_two_process_dump_equals_one_process_and_resumes_with_one(tmp_path, teacher_weights):
    single = tmp_path / "single"
    assert CliRunner().invoke(cli, dump_args(teacher_weights, single)).exit_code == 0
    expected = arrays(single)

    both = subprocess.run(torchrun(2) + dump_args(teacher_weights, tmp_path / "two"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert both.returncode == 0, both.stderr[-3000:]
    assert arrays(tmp_path / "two") == expected  # bit-identical, however the shards were dealt out

    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(2) + dump_args(teacher_weights, killed), env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and committed_samples(killed) < 96:
        time.sleep(0.005)
    kill_every_process_of(str(killed), cache_lock_path(killed))  # the launcher and both ranks, at once
    proc.wait()
    committed = committed_samples(killed)
    assert 96 <= committed < 400, "the dump finished before it could be killed"
    resumed = CliRunner().invoke(cli, dump_args(teacher_weights, killed))  # one process finishes it
    assert resumed.exit_code == 0, resumed.output
    got, computed = map(int, re.search(r"resumed: (\d+) samples were committed, (\d+) shards computed",
                                       resumed.stdout).groups())
    assert got == committed and computed == 50 - committed // 8  # only the missing shards were computed
    assert arrays(killed) == expected


@pytest.mark.slow
@pytest.mark.parametrize("logits,targets", [("fp16", "features"), ("topk:3", "attention"), ("sampled:3", "features")])
def test_two_processes_dump_class_sorted_data_in_tiny_shards(tmp_path, teacher_weights, cifar_subset, logits, targets):
    # ImageFolder order is class-sorted: the first 12 labels are class 0, so 2-sample shards of labels are all
    # zeros (the fill value) on both ranks; rank 1's reopened arrays once skipped such shards (KeyError)
    args = ["dump-teacher", "--teacher", "resnet8", "--weights", str(teacher_weights), "--data",
            f"imagefolder:{cifar_subset}", "--views", "2", "--layers", "layer2,layer3", "--shard-mb", "0.03",
            "--logits", logits, "--targets", targets, "--batch-size", "16", "--workers", "0", "--device", "cpu"]
    single = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    # shards of a few samples (attention maps are small: 1 MiB of them, the least a shard holds, is 16 samples)
    assert open_cache(tmp_path / "single").shard_samples() <= (4 if targets == "features" else 16)
    both = subprocess.run(torchrun(2) + [*args, "--out", str(tmp_path / "two")], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert both.returncode == 0, both.stderr[-3000:]
    assert arrays(tmp_path / "two") == arrays(tmp_path / "single")
    verified = CliRunner().invoke(cli, ["verify", str(tmp_path / "two")])
    assert verified.exit_code == 0, verified.output


def test_a_reopened_writer_writes_shards_of_zeros(tmp_path):
    """A second process (or a resumed dump) reopens the arrays: zarr does not store the array config, so
    `write_empty_chunks` must be set again, or a shard equal to the fill value is never written."""
    from softcache.store import Existing, prepare_cache
    layout = {"labels": ((8,), "int64"), "logits": ((8, 1, 3), "float16")}
    manifest = {"id": "x", "storage": {"shard_bytes": 16, "planned_samples": 8}}
    first = prepare_cache(tmp_path / "c", layout, manifest, existing=Existing("new"), backend="zarr")
    assert first.shard_samples == 2
    first.write(0, {"labels": np.zeros(2, np.int64), "logits": np.ones((2, 1, 3), np.float16)})
    first.close()
    other = prepare_cache(tmp_path / "c", layout, manifest, existing=Existing("new"), backend="zarr", create=False)
    other.write(2, {"labels": np.zeros(2, np.int64), "logits": np.zeros((2, 1, 3), np.float16)})
    other.close()
    assert ((tmp_path / "c" / "labels" / "c" / "1").is_file()
            and (tmp_path / "c" / "logits" / "c" / "1" / "0" / "0").is_file())


def test_an_hdf5_cache_is_written_by_one_process(tmp_path, teacher_weights, monkeypatch):
    from softcache import distributed
    monkeypatch.setattr(distributed, "init", lambda device: distributed.World(rank=0, size=2))  # as under torchrun
    result = CliRunner().invoke(cli, dump_args(teacher_weights, tmp_path / "c.h5"))
    assert result.exit_code != 0 and result.stderr.strip().splitlines() == [
        "Error: an HDF5 cache is written by one process; use a zarr --out (a folder) under torchrun, or run "
        "dump-teacher without torchrun"]
    assert not (tmp_path / "c.h5").exists()


def _trace(path: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in Path(f"{path}.{rank}").read_text().splitlines()]


@pytest.fixture(scope="module")
def student_cache(tmp_path_factory, teacher_weights) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "cache"
    result = CliRunner().invoke(cli, ["dump-teacher", "--teacher", "resnet8", "--weights", str(teacher_weights),
                                      "--data", "synthetic:64", "--views", "2", "--layers", "layer3", "--workers", "0",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def update_gap(initial: dict, expected: dict, got: dict) -> float:
    """The largest relative difference between two runs' weight updates from the same initial weights:
    max over float tensors of |(got - w0) - (expected - w0)| / |expected - w0| (L2 norms)."""
    gaps = []
    for name, w0 in initial.items():
        if w0.is_floating_point():
            step = expected[name].double() - w0.double()
            if step.norm() > 0:
                gaps.append(((got[name].double() - w0.double() - step).norm() / step.norm()).item())
    return max(gaps)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train-teacher", "train-student"])
def test_two_ranks_visit_what_one_process_visits_and_reach_its_weights(tmp_path, student_cache, stage):
    # 64 samples, global batch 32: two steps. The weights are compared by their *update* from the common
    # initial weights, relative to its size. N ranks add the same float32 terms as one process in another
    # order (per-rank convolutions, all-reduced gradients and BatchNorm sums); measured on the development
    # machine that moves an update by 2e-6 to 9e-5 of itself (the most in the stem, whose gradients are long
    # sums that nearly cancel), while ranks that see other samples move it by 120-140%. The bounds, 1e-2 and
    # 0.2, sit 100x above the first and 6x below the second, and two steps leave rounding no room to grow
    # (many steps of momentum did: a weight tolerance then depended on the machine).
    common = ["--epochs", "1", "--batch-size", "32", "--workers", "0", "--device", "cpu"]
    if stage == "train-teacher":
        args = [stage, "--model", "resnet8", "--data", "synthetic:64", *common]
    else:  # fitnets: its regressor (and its BatchNorm) trains under DDP too
        args = [stage, "--cache", str(student_cache), "--student", "resnet8", "--loss", "kd,fitnets", "--pair",
                "layer3=layer3", "--data-path", "stream", *common]  # targets streamed per rank
    env = {**ENV, "SOFTCACHE_TRACE_BATCHES": str(tmp_path / "one")}
    one = subprocess.run([sys.executable, "-m", "softcache", *args, "--out", str(tmp_path / "single")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    env["SOFTCACHE_TRACE_BATCHES"] = str(tmp_path / "two")
    two = subprocess.run(torchrun(2) + [*args, "--sync-bn", "--out", str(tmp_path / "ranks")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    diverging = torchrun(2)[:-2] + [str(Path(__file__).with_name("diverging_ranks.py"))]
    apart = subprocess.run(diverging + [*args, "--sync-bn", "--out", str(tmp_path / "apart")], env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert apart.returncode == 0, apart.stderr[-3000:]

    single, ranks = _trace(tmp_path / "one", 0), [_trace(tmp_path / "two", r) for r in (0, 1)]
    assert len(single) == 2 and [len(r) for r in ranks] == [2, 2]
    for step, whole in enumerate(single):  # each global step: rank 0's 16 samples, then rank 1's, with their views
        assert ranks[0][step]["index"] + ranks[1][step]["index"] == whole["index"]
        assert ranks[0][step]["view"] + ranks[1][step]["view"] == whole["view"]

    torch.manual_seed(0)  # the initial weights both runs start from (--seed 0)
    initial = build_model("resnet8", num_classes=10).state_dict()
    expected = torch.load(tmp_path / "single" / "model.pt", weights_only=True)
    got = torch.load(tmp_path / "ranks" / "model.pt", weights_only=True)
    assert expected.keys() == got.keys()  # SyncBatchNorm's state is BatchNorm's: the weights load anywhere
    assert update_gap(initial, expected, got) < 1e-2
    assert update_gap(initial, expected, torch.load(tmp_path / "apart" / "model.pt", weights_only=True)) > 0.2
    lines = (tmp_path / "ranks" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 0 alone writes the run folder
    solo = json.loads((tmp_path / "single" / "metrics.jsonl").read_text())
    assert json.loads(lines[0])["train_loss"] == pytest.approx(solo["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_to_the_same_model(tmp_path, student_cache):
    args = ["train-student", "--cache", str(student_cache), "--student", "resnet8", "--loss", "kd,fitnets", "--pair",
            "layer3=layer3", "--epochs", "4", "--batch-size", "16", "--workers", "0", "--device", "cpu"]
    whole = subprocess.run(torchrun(2) + [*args, "--out", str(tmp_path / "whole")], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(2) + [*args, "--out", str(run)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.005)
    kill_every_process_of(str(run), run_lock_path(run))
    proc.wait()
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists(), "it finished before the kill"
    first_epoch = (run / "metrics.jsonl").read_text().splitlines()[0]
    again = subprocess.run(torchrun(2) + [*args, "--out", str(run)], env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    expected = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    got = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # same ranks, same arithmetic: bit-identical
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert lines[0] == first_epoch  # resumed, not restarted: epoch 1 (its timings too) is the killed run's
