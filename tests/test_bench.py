"""`softcache bench` runs every measurement and writes its table (no timing is asserted)."""
from __future__ import annotations

import json

from click.testing import CliRunner

from softcache.cli import cli


def test_bench_measures_every_row(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--teacher", "resnet8", "--student", "resnet8", "--data", "synthetic:32",
                                      "--batch-size", "8", "--steps", "2", "--workers", "0", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "bench.json").read_text())
    names = [row["name"] for row in table["rows"]]
    assert names == ["teacher inference only", "dump: logits + layer3", "dump: logits only", "student CE only",
                     "student KD (cache)", "student KD+AT (cache)", "student KD+FitNets (cache)",
                     "student KD+AT (cache, streamed)", "student KD (online teacher)", "student KD+AT (online teacher)"]
    assert all(row["images_per_s"] > 0 for row in table["rows"])
    assert table["rows"][3]["ratio"] == 1.0 and table["data_path"] == "resident images, resident targets"
    assert "student KD+AT (cache)" in result.output
