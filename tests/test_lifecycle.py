"""A cache as a shared asset: reused not rebuilt, resumed after SIGKILL, damage found, read by many at once."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest
import torch

from helpers import ENV, arrays, dump_args, invoke
from softcache import dump as dump_module
from softcache.models import Tapped
from softcache.store import committed_samples, open_cache, progress_dir

SCRIPT = shutil.which("softcache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_weights) -> Path:
    """An uninterrupted dump to compare against."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    result = invoke(*dump_args(teacher_weights, out, device=None))
    assert result.exit_code == 0, result.output
    return out


def test_identical_dump_is_reused_without_a_teacher(tmp_path, teacher_weights, reference, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher was built or run for a cache that exists")

    monkeypatch.setattr(dump_module, "build_model", no_teacher)
    monkeypatch.setattr(Tapped, "forward", no_teacher)
    started = time.perf_counter()
    result = invoke(*dump_args(teacher_weights, cache, device=None))
    assert result.exit_code == 0, result.output
    assert "reused (same cache id, no teacher run)" in result.output
    print(f"reuse answered in {time.perf_counter() - started:.2f} s")  # the closing note compares it to a dump
    changed = invoke(*dump_args(teacher_weights, cache, "--logits", "topk:3", device=None))
    assert changed.exit_code != 0
    assert "(storage.logits.format, storage.logits.k, storage.logits.temperatures differ)" in changed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name, kill_at", [("cache", 8), ("cache", 96), ("cache", 200), ("cache.h5", 120)])
def test_sigkilled_dump_resumes_to_identical_arrays(tmp_path, teacher_weights, reference, name, kill_at):
    assert SCRIPT, "the softcache console script is not installed"
    out = tmp_path / name
    cmd = [SCRIPT, *dump_args(teacher_weights, out, device=None)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if committed_samples(out) >= kill_at:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the dump finished before it could be killed"
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    resumed, computed = map(int, re.search(r"resumed: (\d+) samples were committed, (\d+) shards computed",
                                           result.stdout).groups())
    assert kill_at <= resumed < 400  # it continued, it did not start over ...
    assert computed == 50 - resumed // 8  # ... and computed only the shards (8 samples each) left
    assert arrays(out) == arrays(reference)  # the zarr reference: both backends hold identical arrays


def _flip_bytes(path: Path, offset: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for k in range(offset, offset + count):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_flipped_bytes_are_named_by_verify_and_train_student(tmp_path, teacher_weights, reference, backend):
    if backend == "zarr":
        cache = tmp_path / "cache"
        shutil.copytree(reference, cache)
        shard = cache / "features" / "layer3" / "c" / "3" / "0" / "0" / "0" / "0"  # samples 24-32
        _flip_bytes(shard, shard.stat().st_size // 3)
    else:
        cache = tmp_path / "cache.h5"
        assert invoke(*dump_args(teacher_weights, cache, device=None)).exit_code == 0
        with h5py.File(cache, "r") as f:
            info = f["features/layer3"].id.get_chunk_info(3)
        _flip_bytes(cache, info.byte_offset + info.size // 3)
    result = invoke("verify", cache)
    assert result.exit_code != 0
    assert re.search(r"is damaged: array 'features/layer3' samples \d+-\d+: its shard fails the crc32c recorded at "
                     r"commit \(and 1 more\)", result.stderr)  # the record's crc32c, then the chunk's own
    assert re.search(r"DAMAGED array 'features/layer3' samples \d+-\d+: a chunk fails its checksum", result.stdout)
    run = invoke("train-student", "--cache", cache, "--student", "resnet8", "--loss", "kd,at", "--pair",
                 "layer3=layer3", "--epochs", "1", "--workers", "0", "--out", tmp_path / "run")
    assert run.exit_code != 0 and isinstance(run.exception, SystemExit)
    assert re.search(r"is damaged: array 'features/layer3' samples \d+-\d+ fail their checksum", run.stderr)
    assert not (tmp_path / "run" / "summary.json").exists()


def _delete_shard(cache: Path) -> None:
    (cache / "logits" / "c" / "2" / "0" / "0").unlink()  # samples 16-24


def _delete_array_metadata(cache: Path) -> None:
    (cache / "features" / "layer3" / "zarr.json").unlink()


def _edit_zarr_manifest(cache: Path) -> None:
    meta = json.loads((cache / "zarr.json").read_text())
    meta["attributes"]["softcache"]["augment"]["seed"] = 1  # as if the views were drawn with another seed
    (cache / "zarr.json").write_text(json.dumps(meta))


def _delete_hdf5_array(cache: Path) -> None:
    with h5py.File(cache, "r+") as f:
        del f["features/layer3"]


def _edit_hdf5_manifest(cache: Path) -> None:
    with h5py.File(cache, "r+") as f:
        manifest = json.loads(f.attrs["softcache"])
        manifest["dataset"]["num_samples"] = 399
        f.attrs["softcache"] = json.dumps(manifest)


@pytest.mark.parametrize("name, damage, named", [
    ("cache", _delete_shard, r"array 'logits' samples 16-24: its shard is missing"),
    ("cache", _delete_array_metadata, r"array 'features/layer3' is missing"),
    ("cache", _edit_zarr_manifest, r"its manifest was changed after the dump"),
    ("cache.h5", _delete_hdf5_array, r"array 'features/layer3' is missing"),
    ("cache.h5", _edit_hdf5_manifest, r"its manifest was changed after the dump"),
])
def test_a_missing_or_changed_part_is_named_by_verify_and_train_student(tmp_path, teacher_weights, reference, name,
                                                                        damage, named):
    cache = tmp_path / name
    if name == "cache":
        shutil.copytree(reference, cache)
    else:
        assert invoke(*dump_args(teacher_weights, cache, device=None)).exit_code == 0
    assert invoke("verify", cache).exit_code == 0
    damage(cache)
    result = invoke("verify", cache)
    assert result.exit_code != 0 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert re.search(f"cache '{re.escape(str(cache))}' is damaged: {named}", result.stderr), result.stderr
    run = invoke("train-student", "--cache", cache, "--student", "resnet8", "--loss", "kd,at", "--pair",
                 "layer3=layer3", "--epochs", "1", "--workers", "0", "--out", tmp_path / "run")
    assert run.exit_code != 0 and isinstance(run.exception, SystemExit) and len(run.stderr.strip().splitlines()) == 1
    assert re.search(named, run.stderr), run.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_verify_recomputes_with_the_teacher(reference, teacher_weights):
    result = invoke("verify", reference, "--teacher", "resnet8", "--weights", teacher_weights, "--samples", "6")
    assert result.exit_code == 0, result.output
    errors = {m.group(1): float(m.group(2)) for m in re.finditer(r"(\S+)\s+max \|error\| (\S+)", result.stdout)}
    assert set(errors) == {"logits", "features/layer3"} and max(errors.values()) < 1e-2
    assert result.stdout.strip().endswith("ok")


def test_ls_lists_caches(tmp_path, reference):
    shutil.copytree(reference, tmp_path / "a" / "cache")
    (tmp_path / "b").mkdir()
    result = invoke("ls", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    manifest = open_cache(reference).manifest
    assert len(lines) == 2 and lines[1].split()[:4] == [manifest["id"], "resnet8", "synthetic:400", "4"]
    assert "layer3" in lines[1] and "yes" in lines[1]


@pytest.mark.slow
def test_concurrent_students_match_solo_runs(tmp_path, reference):
    def student(out: Path) -> list[str]:
        return [SCRIPT, "train-student", "--cache", str(reference), "--student", "resnet8", "--loss", "kd,at",
                "--pair", "layer3=layer3", "--epochs", "2", "--batch-size", "64", "--workers", "0", "--out", str(out)]

    def metrics(out: Path) -> list[dict]:
        timing = {"epoch_s", "images_per_s"}
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    solo = subprocess.run(student(tmp_path / "solo"), env=ENV, capture_output=True, text=True)
    assert solo.returncode == 0, solo.stderr
    procs = [subprocess.Popen(student(tmp_path / f"side{k}"), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    expected = metrics(tmp_path / "solo")
    assert len(expected) == 2 and all(metrics(tmp_path / f"side{k}") == expected for k in range(2))


@pytest.mark.slow
@pytest.mark.parametrize("second", [(), ("--overwrite",)])
def test_a_second_writer_is_refused_while_a_dump_runs(tmp_path, teacher_weights, reference, second):
    out = tmp_path / "cache"
    proc = subprocess.Popen([SCRIPT, *dump_args(teacher_weights, out, device=None)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not progress_dir(out).exists():  # the first dump is writing
        time.sleep(0.002)
    assert proc.poll() is None, "the first dump finished before a second could try"
    started = time.perf_counter()
    refused = invoke(*dump_args(teacher_weights, out, *second, device=None))
    assert time.perf_counter() - started < 10
    assert refused.exit_code != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"being written by another softcache process (pid {proc.pid})" in refused.stderr
    busy = invoke("train-student", "--cache", out, "--student", "resnet8", "--out", tmp_path / "run", "--epochs", "1")
    assert busy.exit_code != 0 and f"a dump is writing it now (pid {proc.pid})" in busy.stderr
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert arrays(out) == arrays(reference)  # the first dump went on untouched


def test_a_second_training_run_on_one_folder_is_refused(tmp_path, reference):
    from softcache.locks import WriterLock, run_lock_path
    run = tmp_path / "run"
    with WriterLock(run_lock_path(run), "run folder"):  # as a train-student process holds it while it trains
        (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
        refused = invoke("train-student", "--cache", reference, "--student", "resnet8", "--out", run, "--epochs", "1")
        assert refused.exit_code != 0 and len(refused.stderr.strip().splitlines()) == 1
        assert f"run folder '{run}' is being written by another softcache process (pid {os.getpid()})" in refused.stderr
        assert (run / "metrics.jsonl").read_text() == '{"epoch": 1}\n'  # nothing was changed
    done = invoke("train-student", "--cache", reference, "--student", "resnet8", "--out", run, "--epochs", "1",
                  "--batch-size", "64", "--workers", "0")
    assert done.exit_code == 0, done.output


def test_overwrite_keeps_the_old_cache_until_the_new_one_is_complete(tmp_path, teacher_weights, cifar_subset):
    data = tmp_path / "data"
    shutil.copytree(cifar_subset, data)
    base = ["dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data", f"imagefolder:{data}",
            "--workers", "0", "--batch-size", "32"]
    # resnet8 layer1 at 4 views is 128 KiB a sample: shards of 8 samples, 15 in all
    # --image-size: no scan of every header first (it would find the bad image before the dump starts)
    new_options = ["--views", "4", "--layers", "layer1", "--data-path", "loader", "--image-size", "32", "--overwrite"]
    cache = tmp_path / "cache"
    assert invoke(*base, "--out", cache).exit_code == 0
    before = arrays(cache)
    bad = sorted((data / "train" / "truck").iterdir())[5]  # sample 113 of 120
    good = bad.read_bytes()
    bad.write_bytes(good[:200])
    failed = invoke("-q", *base, *new_options, "--out", cache)  # -q: no progress lines, the error alone
    assert failed.exit_code != 0 and len(failed.stderr.strip().splitlines()) == 1, failed.output
    assert f"image '{bad}' cannot be read" in failed.stderr
    committed = committed_samples(tmp_path / "cache.new")
    assert 80 <= committed < 113  # the new cache, beside the old one, got as far as the bad image
    assert arrays(cache) == before and invoke("verify", cache).exit_code == 0  # the old cache, untouched

    bad.write_bytes(good)
    done = invoke(*base, *new_options, "--out", cache)
    assert done.exit_code == 0, done.output
    assert "complete, replacing the old cache" in done.stdout  # started over: the image's size is in the fingerprint
    assert not (tmp_path / "cache.new").exists() and not (tmp_path / "cache.old").exists()
    fresh = tmp_path / "fresh"
    assert invoke(*base, *new_options, "--out", fresh).exit_code == 0
    assert arrays(cache) == arrays(fresh) and invoke("verify", cache).exit_code == 0


@pytest.mark.parametrize("kind", ["empty", "truncated", "text"])
def test_an_unreadable_image_is_one_line_naming_it(tmp_path, teacher_weights, cifar_subset, kind):
    data = tmp_path / "data"
    shutil.copytree(cifar_subset, data)
    bad = sorted((data / "train" / "cat").iterdir())[3]
    bad.write_bytes({"empty": b"", "truncated": bad.read_bytes()[:300], "text": b"not an image\n"}[kind])
    result = invoke("-q", "dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data",
                    f"imagefolder:{data}", "--out", tmp_path / "cache")  # default options: 2 decode workers
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert re.fullmatch(rf"Error: image '{re.escape(str(bad))}' cannot be read \(.+\); replace or remove it and "
                        r"rerun \(that changes the dataset: a dump it stopped then starts over, with --overwrite\)",
                        result.stderr.strip()), result.stderr
    teacher = invoke("train-teacher", "--model", "resnet8", "--data", f"imagefolder:{data}", "--epochs", "1",
                     "--batch-size", "32", "--out", tmp_path / "run")
    assert teacher.exit_code != 0 and f"image '{bad}' cannot be read" in teacher.stderr
    assert len(teacher.stderr.strip().splitlines()) == 1, teacher.stderr


def test_the_dataset_path_recorded_in_a_cache_works_from_any_folder(tmp_path, teacher_weights, cifar_subset,
                                                                   monkeypatch):
    shutil.copytree(cifar_subset, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert invoke("dump-teacher", "--teacher", "resnet8", "--weights", teacher_weights, "--data", "imagefolder:data",
                  "--workers", "0", "--out", "cache").exit_code == 0
    dataset = open_cache(tmp_path / "cache").manifest["dataset"]
    assert dataset["spec"] == "imagefolder:data" and dataset["resolved"] == f"imagefolder:{tmp_path / 'data'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    student = ["train-student", "--cache", tmp_path / "cache", "--student", "resnet8", "--epochs", "1", "--workers",
               "0", "--batch-size", "32"]
    assert invoke(*student, "--out", "run").exit_code == 0
    (tmp_path / "data").rename(tmp_path / "moved")
    gone = invoke(*student, "--out", "run2")
    assert gone.exit_code != 0 and len(gone.stderr.strip().splitlines()) == 1
    assert (f"the dataset recorded in the cache ('imagefolder:data', at imagefolder:{tmp_path / 'data'}) cannot be "
            "read") in gone.stderr and "pass --data SPEC" in gone.stderr
    assert invoke(*student, "--data", f"imagefolder:{tmp_path / 'moved'}", "--out", "run3").exit_code == 0


def _kill_after_epochs(cmd: list[str], run: Path, epochs: int) -> None:
    """Start `cmd` and SIGKILL it as soon as `epochs` epochs are in its metrics.jsonl."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len((run / "metrics.jsonl").read_text().splitlines()) >= epochs:
                break
        except OSError:
            pass
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train-student", "train-teacher"])
def test_a_killed_training_run_resumes_to_the_same_model(tmp_path, reference, stage):
    def command(out: Path) -> list[str]:
        common = ["--epochs", "4", "--batch-size", "64", "--workers", "0", "--out", str(out)]
        if stage == "train-student":  # fitnets: the checkpoint must carry its regressor too
            return [SCRIPT, stage, "--cache", str(reference), "--student", "resnet8", "--loss", "kd,fitnets",
                    "--pair", "layer3=layer3", *common]
        return [SCRIPT, stage, "--model", "resnet8", "--data", "synthetic:400", *common]

    def epochs(out: Path) -> list[dict]:
        timing = {"epoch_s", "images_per_s"}
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    whole = subprocess.run(command(tmp_path / "whole"), env=ENV, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "killed"
    _kill_after_epochs(command(run), run, 2)
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()
    first_epoch = (run / "metrics.jsonl").read_text().splitlines()[0]
    again = subprocess.run(command(run), env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    # resumed, not restarted: epoch 1 was not trained again (its line, timings included, is the killed run's)
    assert (run / "metrics.jsonl").read_text().splitlines()[0] == first_epoch
    expected = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    resumed = torch.load(run / "model.pt", weights_only=True)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert epochs(run) == epochs(tmp_path / "whole") and [r["epoch"] for r in epochs(run)] == [1, 2, 3, 4]
    assert not (run / "checkpoint.pt").exists()  # removed once the run finished


def _truncate(path: Path) -> None:  # as an interrupted copy or a full disk leaves a file
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name", ["cache", "cache.h5"])
def test_a_truncated_cache_is_damaged_for_every_command_and_replaced_by_overwrite(tmp_path, teacher_weights, name):
    cache = tmp_path / name
    args = dump_args(teacher_weights, cache, "--data", "synthetic:40", device=None)
    assert invoke(*args).exit_code == 0
    damaged = cache / "zarr.json" if name == "cache" else cache
    _truncate(damaged)
    before = damaged.read_bytes()
    student = ["train-student", "--cache", cache, "--student", "resnet8", "--epochs", "1", "--workers", "0",
               "--out", tmp_path / "run"]
    for command in (["verify", cache], ["inspect", cache], student):
        result = invoke(*command)
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert re.search(f"cache '{re.escape(str(cache))}' is damaged: .*; re-dump it: rerun its dump-teacher "
                         "command with --overwrite", result.stderr), result.stderr
    refused = invoke(*args)
    assert refused.exit_code != 0 and "holds a damaged cache" in refused.stderr and "--overwrite" in refused.stderr
    assert damaged.read_bytes() == before  # nothing was changed
    replaced = invoke(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert open_cache(cache).manifest["complete"] and invoke("verify", cache).exit_code == 0


def test_ls_shows_damage_what_is_stored_and_sizes_at_any_scale(tmp_path, teacher_weights, reference):
    shutil.copytree(reference, tmp_path / "good")
    shutil.copytree(reference, tmp_path / "garbled")
    _truncate(tmp_path / "garbled" / "zarr.json")
    shutil.copytree(reference, tmp_path / "holed")
    _delete_shard(tmp_path / "holed")
    small = tmp_path / "small-attention"  # an HDF5 cache without the .h5 suffix: known by its signature
    assert invoke(*dump_args(teacher_weights, small, "--data", "synthetic:40", "--targets", "attention",
                             "--format", "hdf5", device=None)).exit_code == 0
    result = invoke("ls", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    rows = {Path(line.split()[-1]).name: line for line in lines[1:5]}
    assert set(rows) == {"good", "garbled", "holed", "small-attention"}, result.stdout
    assert " yes " in rows["good"] and re.search(r" \d+\.\d MiB ", rows["good"])
    assert " DAMAGED " in rows["garbled"] and " DAMAGED " in rows["holed"]
    assert "layer3 (attention)" in rows["small-attention"] and " yes " in rows["small-attention"]
    assert re.search(r" \d+\.\d KiB ", rows["small-attention"]), rows["small-attention"]  # not "0.0"
    notes = "\n".join(lines[5:])
    assert re.search(r"garbled: damaged: its root zarr.json is not valid JSON .*--overwrite", notes), notes
    assert re.search(r"holed: damaged: array 'logits' samples 16-24: its shard is missing", notes), notes
