"""Caches in an object store: a real S3-compatible server (moto's, as zarr's and s3fs's own tests use) on
127.0.0.1, reached through zarr's FsspecStore and s3fs; no client library is mocked."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from helpers import arrays, dump_args
from softcache.cli import cli
from softcache.store import committed_samples

moto_server = pytest.importorskip("moto.server", reason="the s3 extra (pip install -e '.[s3]') is not installed")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A bucket on a local S3 server; the environment points every s3 client at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("softcache-test")
    yield "s3://softcache-test"
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.mark.slow
def test_a_cache_in_s3_dumps_resumes_verifies_lists_and_trains(tmp_path, teacher_weights, s3):
    local = tmp_path / "local"
    assert CliRunner().invoke(cli, dump_args(teacher_weights, str(local))).exit_code == 0
    url = f"{s3}/caches/r8"
    proc = subprocess.Popen([sys.executable, "-m", "softcache", *dump_args(teacher_weights, url)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    fs = s3fs.S3FileSystem()

    def markers() -> int:  # one listing per look (reading every marker would let the dump outrun the watcher)
        try:
            return sum(name.endswith(".json") for name in fs.ls(f"{url}/progress", refresh=True))
        except FileNotFoundError:
            return 0
    while proc.poll() is None and time.monotonic() < deadline and markers() < 12:  # 12 shards of 8 samples
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    committed = committed_samples(url)
    assert 96 <= committed < 400, "the dump finished before it could be killed"
    resumed = CliRunner().invoke(cli, dump_args(teacher_weights, url))
    assert resumed.exit_code == 0, resumed.output
    got, computed = map(int, re.search(r"resumed: (\d+) samples were committed, (\d+) shards computed",
                                       resumed.stdout).groups())
    assert got == committed and computed == 50 - committed // 8
    assert arrays(url) == arrays(local)  # the arrays equal a local dump's

    verified = CliRunner().invoke(cli, ["verify", url])
    assert verified.exit_code == 0 and verified.stdout.strip().endswith("ok"), verified.output
    inspected = CliRunner().invoke(cli, ["inspect", url])
    assert inspected.exit_code == 0 and "features/layer3" in inspected.stdout
    listed = CliRunner().invoke(cli, ["ls", s3])
    assert listed.exit_code == 0 and url in listed.stdout and "yes" in listed.stdout, listed.output
    trained = CliRunner().invoke(cli, ["train-student", "--cache", url, "--student", "resnet8", "--loss", "kd,at",
                                       "--pair", "layer3=layer3", "--epochs", "1", "--batch-size", "64", "--workers",
                                       "0", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    refused = CliRunner().invoke(cli, [*dump_args(teacher_weights, url), "--overwrite"])
    assert refused.exit_code != 0 and "delete" in refused.stderr and arrays(url) == arrays(local)


def test_what_an_object_store_cannot_hold_is_refused(tmp_path, teacher_weights, small_cache):
    h5 = CliRunner().invoke(cli, dump_args(teacher_weights, "s3://bucket/c.h5"))
    assert h5.exit_code != 0 and "an HDF5 cache is one file written in place" in h5.stderr
    run = CliRunner().invoke(cli, ["train-student", "--cache", str(small_cache), "--student", "resnet8", "--epochs",
                                   "1", "--batch-size", "8", "--workers", "0", "--out", "s3://bucket/run"])
    assert run.exit_code != 0 and "'s3://bucket/run' is a URL; run folders and HDF5 caches live on local" in run.stderr
