"""Helpers several test modules share (imported as `from helpers import ...`: pytest's default import mode puts
this folder on sys.path, as it does for `from conftest import load_teacher`)."""
from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner, Result

from softcache.cli import cli
from softcache.store import open_cache

# for subprocesses: one thread each, so a process computes the same arithmetic alone or side by side
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def invoke(*args: object) -> Result:
    """Run the softcache CLI in-process on `args` (each made a string), as click's CliRunner does."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def arrays(path: str | Path) -> dict[str, bytes]:
    """Every array of the cache at `path` (a folder, .h5 file or URL), by name, as raw bytes: equal dicts mean
    bit-identical caches."""
    cache = open_cache(path)
    return {name: cache.read(name).tobytes() for name in cache.names()}


def dump_args(weights: str | Path, out: str | Path, *extra: str, device: str | None = "cpu") -> list[str]:
    """dump-teacher arguments for the resnet8 `weights` on synthetic:400, 4 views with layer3, into `out`;
    `extra` comes last (so it overrides). `device=None` passes no --device (the CLI's default: cuda when
    there is one)."""
    # resnet8 layer3 at 4 views is 32 KiB a sample: 0.25 MiB shards hold 8 samples, 50 shards in all
    args = ["dump-teacher", "--teacher", "resnet8", "--weights", str(weights), "--data", "synthetic:400",
            "--views", "4", "--layers", "layer3", "--shard-mb", "0.25", "--batch-size", "32", "--workers", "0"]
    if device is not None:
        args += ["--device", device]
    return [*args, "--out", str(out), *extra]
