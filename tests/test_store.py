"""The zarr cache: bit-exact round trips, whole-shard writes, checksums, completeness and overwrite rules."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from softcache.errors import SoftcacheError
from softcache.store import array_layout, build_manifest, create_cache, open_cache
from softcache.store import zarr_store


def _manifest(layers=("layer3",)):
    return build_manifest(teacher={"arch": "t", "weights_sha256": "x"}, dataset={"spec": "s"},
                          augment={"policy": "cifar"}, layers=layers)


def _random_rows(n, v, rng):
    return {"labels": rng.integers(0, 10, n).astype(np.int64),
            "logits": rng.standard_normal((n, v, 10)).astype(np.float16),
            "views/box": rng.integers(-4, 33, (n, v, 4)).astype(np.float32),
            "views/flip": rng.random((n, v)) < 0.5,
            "features/layer3": rng.standard_normal((n, v, 4, 2, 2)).astype(np.float16)}


def test_round_trip_is_bit_exact_across_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(zarr_store, "SHARD_BYTES", 1024)  # many shards from a small array
    rng = np.random.default_rng(0)
    n, v = 37, 3
    rows = _random_rows(n, v, rng)
    layout = array_layout(n, v, 10, {"layer3": (4, 2, 2)})
    writer = create_cache(tmp_path / "c", layout, _manifest())
    assert writer.shard_samples < n
    start = 0
    for size in (5, 1, 13, 9, 9):  # batch sizes that straddle shard boundaries
        writer.write(start, {k: a[start:start + size] for k, a in rows.items()})
        start += size
    writer.finish(_manifest())
    cache = open_cache(tmp_path / "c")
    for name, expected in rows.items():
        got = cache.arrays[name][...]
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), name


def test_arrays_are_sharded_compressed_and_checksummed(small_cache):
    meta = json.loads((small_cache / "logits" / "zarr.json").read_text())
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    inner = [c["name"] for c in sharding["configuration"]["codecs"]]
    assert "blosc" in inner and "crc32c" in inner
    assert "crc32c" in [c["name"] for c in sharding["configuration"]["index_codecs"]]
    # other tools read it with plain zarr
    group = zarr.open_group(str(small_cache), mode="r")
    assert group.attrs["softcache"]["complete"] is True
    assert group["features/layer3"].shape == (20, 5, 64, 8, 8)


def test_manifest_records_what_made_the_cache(small_cache):
    m = open_cache(small_cache).manifest
    assert m["format_version"] == 1 and m["layers"] == ["layer2", "layer3"]
    assert m["dataset"]["spec"] == "synthetic:20" and m["dataset"]["num_samples"] == 20
    assert m["dataset"]["fingerprint"]["num_samples"] == 20 and len(m["dataset"]["fingerprint"]["sha256"]) == 64
    assert m["augment"]["policy"] == "cifar" and m["augment"]["num_views"] == 5 and m["augment"]["seed"] == 7
    assert len(m["augment"]["mean"]) == 3 and m["teacher"]["arch"] == "resnet8"


def test_incomplete_cache_is_refused_and_complete_one_not_overwritten(tmp_path):
    layout = array_layout(4, 1, 10, {})
    writer = create_cache(tmp_path / "c", layout, _manifest(layers=()))
    writer.write(0, {k: a for k, a in _random_rows(2, 1, np.random.default_rng(1)).items() if k != "features/layer3"})
    with pytest.raises(SoftcacheError, match="incomplete: a dump is in progress or died"):
        open_cache(tmp_path / "c")
    writer.write(2, {k: a for k, a in _random_rows(2, 1, np.random.default_rng(2)).items() if k != "features/layer3"})
    writer.finish(_manifest(layers=()))
    before = open_cache(tmp_path / "c").arrays["logits"][...]
    with pytest.raises(SoftcacheError, match="--overwrite"):
        create_cache(tmp_path / "c", layout, _manifest(layers=()))
    assert open_cache(tmp_path / "c").arrays["logits"][...].tobytes() == before.tobytes()


def test_a_folder_that_is_not_a_cache_is_never_touched(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SoftcacheError, match="not a softcache cache"):
        create_cache(tmp_path / "mine", array_layout(2, 1, 10, {}), _manifest(), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
