"""`softcache bench`: every row measured in interleaved rounds, medians, spreads and per-round ratios (no timing
is asserted: only the structure of what it reports, and arithmetic that must hold)."""
from __future__ import annotations

import json
import statistics

import pytest
from click.testing import CliRunner

from softcache.bench import summarise
from softcache.cli import cli
from softcache.store import open_cache

STUDENT_ROWS = ["student CE only", "student KD (cache)", "student KD+AT (cache)", "student KD+FitNets (cache)",
                "student KD+AT (cache, streamed)", "student KD (online teacher)", "student KD+AT (online teacher)"]


def test_bench_reports_medians_spreads_and_per_round_ratios(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--teacher", "resnet8", "--student", "resnet8", "--data", "synthetic:32",
                                      "--batch-size", "8", "--steps", "2", "--rounds", "2", "--workers", "0",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "bench.json").read_text())
    assert table["rounds"] == 2 and table["data_path"] == "resident images, resident targets"
    rows = {row["name"]: row for row in table["rows"]}
    writer_rows = [n for n in rows if n.startswith("writer: ")]
    assert list(rows)[:3] == ["teacher inference only", "dump: logits + layer3", "dump: logits only"]
    assert list(rows)[-len(STUDENT_ROWS):] == STUDENT_ROWS
    assert {n.split(",")[0] for n in writer_rows} == {"writer: logits", "writer: features layer3",
                                                       "writer: attention layer3"}
    assert any(n.endswith(", 1 thread") for n in writer_rows)
    for name, row in rows.items():
        assert len(row["per_round"]) == 2 and all(r > 0 for r in row["per_round"]), name
        assert row["median"] == pytest.approx(statistics.median(row["per_round"]))
        assert row["spread"] == pytest.approx((max(row["per_round"]) - min(row["per_round"])) / row["median"])
        assert row["unit"] == ("MB/s" if name.startswith("writer") else "images/s")
    for name in STUDENT_ROWS[1:]:
        ratios = [a / b for a, b in zip(rows[name]["per_round"], rows["student CE only"]["per_round"])]
        assert (rows[name]["ratio_to"] == "student CE only"
                and rows[name]["ratio"] == pytest.approx(statistics.median(ratios)))
    assert rows["dump: logits only"]["ratio_to"] == "teacher inference only" and "ratio" not in rows["student CE only"]
    assert all(isinstance(w, str) for w in table["warnings"])
    assert "student KD+AT (cache)" in result.output and "median of 2 interleaved rounds" in result.output


def test_summary_ratios_are_medians_of_ratios_within_a_round():
    # a load spike in round 2 slows both rows: the per-round ratio stays 0.5, a ratio of medians would not
    per_round = {"base": [100.0, 20.0, 100.0, 100.0], "row": [50.0, 10.0, 50.0, 40.0]}
    rows = {r["name"]: r for r in summarise(per_round, {"base": None, "row": "base"})}
    assert rows["row"]["ratio"] == pytest.approx(0.5) and rows["base"]["spread"] == pytest.approx(0.8)
    assert rows["row"]["median"] == pytest.approx(45.0)


def test_bench_takes_pixel_work_and_mixing(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--teacher", "resnet8", "--student", "resnet8", "--data", "synthetic:32",
                                      "--aa", "rand-m9-n2", "--mixup", "0.8", "--batch-size", "8", "--steps", "2",
                                      "--rounds", "1", "--workers", "0", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "bench.json").read_text())
    assert table["augment"] == "cifar, rand-m9-n2, mixup 0.8"
    assert table["data_path"].startswith("loader images")  # pixel work is replayed on CPU workers
    assert "views/crc" in open_cache(tmp_path / "cache_feat").names()
    assert "2 views of cifar, rand-m9-n2, mixup 0.8" in result.output
