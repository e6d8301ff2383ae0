"""A failed read leaves no asyncio noise at exit ("Task was destroyed but it is pending!")."""
from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from softcache.cli import cli

READ_DAMAGED = """
import sys
import numpy as np
from softcache.errors import SoftcacheError
from softcache.store import open_cache
reader = open_cache(sys.argv[1], check=False)
try:
    reader.rows("features/layer3", np.arange(0, 64))  # one orthogonal read over every chunk: many zarr tasks
except SoftcacheError as err:
    print(err, file=sys.stderr)
    sys.exit(1)
"""


def test_a_damaged_read_exits_with_its_error_alone(tmp_path, teacher_weights):
    cache = tmp_path / "cache"  # one sample per shard: 64 chunks, each read by a task of its own
    dumped = CliRunner().invoke(cli, ["dump-teacher", "--teacher", "resnet8", "--weights", str(teacher_weights),
                                      "--data", "synthetic:64", "--views", "2", "--layers", "layer3", "--shard-mb",
                                      "0.01", "--workers", "0", "--device", "cpu", "--out", str(cache)])
    assert dumped.exit_code == 0, dumped.output
    for shard in (cache / "features" / "layer3" / "c").rglob("*"):
        if shard.is_file():
            data = bytearray(shard.read_bytes())
            data[20:-200] = bytes(len(data) - 220)  # the chunks, not the shard index at its end
            shard.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-c", READ_DAMAGED, str(cache)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "is damaged: array 'features/layer3'" in done.stderr
    assert "Task was destroyed" not in done.stderr and "Traceback" not in done.stderr, done.stderr
