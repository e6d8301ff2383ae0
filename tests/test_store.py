"""The cache store: bit-exact round trips on both backends, whole-shard writes, checksums, completeness rules."""
from __future__ import annotations

import errno
import json

import h5py
import numpy as np
import pytest
import torch
import zarr

from softcache import names
from softcache.errors import SoftcacheError
from softcache.store import (Existing, array_layout, build_manifest, check_existing, committed_samples, find_caches,
                             open_cache, prepare_cache)
from softcache.store import base

BACKENDS = [("zarr", "c"), ("hdf5", "c.h5")]


def _manifest(layers=("layer3",), views=3):
    return build_manifest(teachers=[{"name": "t", "arch": "t", "weights_sha256": "x"}],
                          dataset={"spec": "s", "fingerprint": {"sha256": "f"}},
                          augment={"policy": "cifar", "views": views, "num_views": views, "seed": 0,
                                   "image_size": 32, "pad": 4, "scale": [0.08, 1], "ratio": [0.75, 1.33],
                                   "mean": [0.5] * 3, "std": [0.2] * 3},
                          layers=layers,
                          storage={"backend": "zarr", "logits": {"format": "fp16"}, "targets": "features"})


def _layout(n, v, layers=True):
    targets = {"logits": ((10,), "float16")}
    if layers:
        targets["features/layer3"] = ((4, 2, 2), "float16")
    return array_layout(n, v, targets)


def _random_rows(n, v, rng, layers=True):
    rows = {"labels": rng.integers(0, 10, n).astype(np.int64),
            "logits": rng.standard_normal((n, v, 10)).astype(np.float16),
            "views/box": rng.integers(-4, 33, (n, v, 4)).astype(np.float32),
            "views/flip": rng.random((n, v)) < 0.5}
    if layers:
        rows["features/layer3"] = rng.standard_normal((n, v, 4, 2, 2)).astype(np.float16)
    return rows


def _write(path, backend, rows, sizes, manifest=None, existing=Existing("new")):
    n, v = rows["logits"].shape[:2]
    writer = prepare_cache(path, _layout(n, v, "features/layer3" in rows), manifest or _manifest(),
                           existing=existing, backend=backend)
    missing = writer.missing()  # a fresh or interrupted cache's missing shards are its tail, here
    start = missing[0] * writer.shard_samples if missing else n
    for size in sizes:
        if start >= n:
            break
        writer.write(start, {k: a[start:start + size] for k, a in rows.items()})
        start += size
    return writer


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(base, "SHARD_BYTES", 1024)  # many shards from small arrays
    monkeypatch.setattr(base, "CHUNK_BYTES", 256)


def test_both_backends_round_trip_bit_identical(tmp_path, small_shards):
    rows = _random_rows(37, 3, np.random.default_rng(0))
    read = {}
    for backend, name in BACKENDS:
        writer = _write(tmp_path / name, backend, rows, (5, 1, 13, 9, 9))  # batches straddle shard boundaries
        assert writer.shard_samples < 37
        writer.finish()
        cache = open_cache(tmp_path / name)
        assert cache.manifest["complete"] and set(cache.names()) == set(rows)
        read[backend] = {k: cache.read(k) for k in rows}
        for k, expected in rows.items():
            got = read[backend][k]
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), (backend, k)
        index = np.array([0, 3, 17, 36])
        assert cache.rows("logits", index).tobytes() == rows["logits"][index].tobytes()
    assert all(read["zarr"][k].tobytes() == read["hdf5"][k].tobytes() for k in rows)


def test_zarr_arrays_are_sharded_compressed_and_checksummed(small_cache):
    meta = json.loads((small_cache / "logits" / "zarr.json").read_text())
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    inner = [c["name"] for c in sharding["configuration"]["codecs"]]
    assert "blosc" in inner and "crc32c" in inner
    assert "crc32c" in [c["name"] for c in sharding["configuration"]["index_codecs"]]
    group = zarr.open_group(str(small_cache), mode="r")  # other tools read it with plain zarr
    assert group.attrs["softcache"]["complete"] is True
    assert group["features/layer3"].shape == (20, 5, 64, 8, 8)


def test_manifest_records_what_made_the_cache(small_cache):
    m = open_cache(small_cache).manifest
    assert m["format_version"] == 4 and m["layers"] == ["layer2", "layer3"] and len(m["id"]) == 16
    assert m["dataset"]["spec"] == "synthetic:20" and m["dataset"]["num_samples"] == 20
    assert m["dataset"]["fingerprint"]["num_samples"] == 20 and len(m["dataset"]["fingerprint"]["sha256"]) == 64
    assert m["augment"]["policy"] == "cifar" and m["augment"]["num_views"] == 5 and m["augment"]["seed"] == 7
    assert len(m["augment"]["mean"]) == 3 and m["teacher"]["arch"] == "resnet8"
    assert m["storage"] == {"backend": "zarr", "logits": {"format": "fp16"}, "targets": "features",
                            "shard_bytes": 64 << 20}


@pytest.mark.parametrize("backend, name", BACKENDS)
def test_incomplete_cache_is_refused_then_resumed(tmp_path, small_shards, backend, name):
    rows = _random_rows(40, 2, np.random.default_rng(1), layers=False)
    manifest = _manifest(layers=(), views=2)
    writer = _write(tmp_path / name, backend, rows, (7, 7, 7), manifest)  # 21 rows handed over, fewer committed
    writer.wait()
    committed, shard = committed_samples(tmp_path / name, backend), writer.shard_samples
    assert 0 < committed < 21 and writer.stored_shards == committed // shard
    del writer
    with pytest.raises(SoftcacheError, match="incomplete: its dump died; rerun its dump-teacher command"):
        open_cache(tmp_path / name)
    existing = check_existing(tmp_path / name, manifest, overwrite=False, backend=backend)
    assert existing.action == "resume" and sorted(existing.committed) == list(range(committed // shard))
    writer = _write(tmp_path / name, backend, rows, [7] * 10, manifest, existing)
    assert writer.missing()[0] == committed // writer.shard_samples
    writer.finish()
    assert writer.stored_shards == -(-40 // shard) - committed // shard  # only the shards left were written
    cache = open_cache(tmp_path / name)
    assert all(cache.read(k).tobytes() == rows[k].tobytes() for k in rows)
    assert check_existing(tmp_path / name, manifest, overwrite=False, backend=backend) == Existing("reuse")


def test_other_options_are_refused_naming_the_difference(tmp_path):
    rows = _random_rows(4, 3, np.random.default_rng(2))
    _write(tmp_path / "c", "zarr", rows, (4,)).finish()
    before = open_cache(tmp_path / "c").read("logits")
    with pytest.raises(SoftcacheError, match=r"made with other options \(augment.views differ\)"):
        check_existing(tmp_path / "c", _manifest(views=5), overwrite=False, backend="zarr")
    assert open_cache(tmp_path / "c").read("logits").tobytes() == before.tobytes()
    assert check_existing(tmp_path / "c", _manifest(views=5), overwrite=True, backend="zarr").action == "replace"


def test_a_folder_that_is_not_a_cache_is_never_touched(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SoftcacheError, match="not a softcache cache"):
        check_existing(tmp_path / "mine", _manifest(), overwrite=True, backend="zarr")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("backend, name", BACKENDS)
def test_disk_full_leaves_an_incomplete_cache_that_resumes(tmp_path, small_shards, monkeypatch, backend, name):
    rows = _random_rows(40, 2, np.random.default_rng(3), layers=False)
    manifest = _manifest(layers=(), views=2)
    writer_cls = type(prepare_cache(tmp_path / "probe", _layout(40, 2, False), manifest, existing=Existing("new"),
                                    backend=backend))
    real, calls = writer_cls._write_block, []

    def full_disk(self, name_, lo, hi, block):
        calls.append(lo)
        if lo == 16:  # later shards would fit again: they must still not count as committed
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, name_, lo, hi, block)

    monkeypatch.setattr(writer_cls, "_write_block", full_disk)
    with pytest.raises(SoftcacheError,
                       match=r"out of disk space .* stays incomplete with 16 samples committed; free space and rerun"):
        _write(tmp_path / name, backend, rows, [8] * 5, manifest).finish()  # the writer thread's error surfaces
    with pytest.raises(SoftcacheError, match="incomplete"):
        open_cache(tmp_path / name)
    monkeypatch.setattr(writer_cls, "_write_block", real)
    existing = check_existing(tmp_path / name, manifest, overwrite=False, backend=backend)
    assert existing.action == "resume" and sorted(existing.committed) == [0]  # one shard of 16 samples
    _write(tmp_path / name, backend, rows, [8] * 5, manifest, existing).finish()
    cache = open_cache(tmp_path / name)
    assert all(cache.read(k).tobytes() == rows[k].tobytes() for k in rows)


class _RowsOf(torch.utils.data.Dataset):
    """Reads one row per item through a cache reader handed to the DataLoader workers."""

    def __init__(self, reader, name):
        self.reader, self.name = reader, name

    def __len__(self):
        return self.reader.shape(self.name)[0]

    def __getitem__(self, i):
        return torch.from_numpy(self.reader.read(self.name, i, i + 1)[0].astype(np.float32))


def test_hdf5_reader_opens_its_file_inside_each_worker(tmp_path, small_shards):
    rows = _random_rows(24, 2, np.random.default_rng(4))
    _write(tmp_path / "c.h5", "hdf5", rows, (24,)).finish()
    reader = open_cache(tmp_path / "c.h5")
    reader.read("logits", 0, 1)  # the parent holds an open handle now; workers must not inherit it
    loader = torch.utils.data.DataLoader(_RowsOf(reader, "logits"), batch_size=5, num_workers=2)
    got = torch.cat(list(loader))
    assert torch.equal(got, torch.from_numpy(rows["logits"].astype(np.float32)))


def test_the_backend_registry_is_what_the_cli_offers():
    from softcache.store import backends
    assert tuple(backends.BACKENDS) == names.BACKENDS  # the torch-free names --format offers
    for name, backend in backends.BACKENDS.items():
        assert backend.name == name and not backend.__abstractmethods__, name
        assert issubclass(backend.writer, base.ShardWriter) and issubclass(backend.reader, base.CacheReader), name


def test_an_incomplete_cache_with_other_options_is_refused_in_words(tmp_path, small_shards):
    rows = _random_rows(40, 2, np.random.default_rng(5), layers=False)
    writer = _write(tmp_path / "c", "zarr", rows, (7,), _manifest(layers=(), views=2))
    writer.wait()
    del writer
    with pytest.raises(SoftcacheError, match=r"holds an incomplete cache made with other options \(augment.views"):
        check_existing(tmp_path / "c", _manifest(layers=(), views=5), overwrite=False, backend="zarr")


def _truncate(path):  # as an interrupted copy or a full disk leaves a file
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _garble_hdf5_manifest(path):
    with h5py.File(path, "r+") as f:
        f.attrs["softcache"] = f.attrs["softcache"][:40]


def _files(path):
    return {p: p.read_bytes() for p in sorted([path, *path.rglob("*")]) if p.is_file()}


@pytest.mark.parametrize("backend, name, damage, named", [
    ("hdf5", "c.h5", _truncate, r"the file has the HDF5 signature but cannot be opened \(.*truncated file"),
    ("hdf5", "c.h5", _garble_hdf5_manifest, r"its manifest \(root attribute 'softcache'\) is not valid JSON"),
    ("zarr", "c", lambda path: _truncate(path / "zarr.json"), r"its root zarr.json is not valid JSON"),
    ("zarr", "c", lambda path: (path / "zarr.json").unlink(), r"its root zarr.json is missing"),
])
def test_a_damaged_cache_is_called_damaged_and_kept(tmp_path, small_shards, backend, name, damage, named):
    path, manifest = tmp_path / name, _manifest(layers=(), views=2)
    _write(path, backend, _random_rows(8, 2, np.random.default_rng(6), layers=False), (8,), manifest).finish()
    damage(path)
    before = _files(path)
    with pytest.raises(SoftcacheError, match=f"cache '.*' is damaged: {named}.*with --overwrite"):
        open_cache(path)
    with pytest.raises(SoftcacheError, match=f"holds a damaged cache \\({named}.*pass --overwrite to replace it"):
        check_existing(path, manifest, overwrite=False, backend=backend)
    assert _files(path) == before  # nothing was changed
    assert check_existing(path, manifest, overwrite=True, backend=backend).action == "replace"


def test_what_is_not_a_cache_of_ours_is_still_not_a_cache(tmp_path):
    with h5py.File(tmp_path / "theirs.h5", "w") as f:
        f["x"] = np.arange(3)
    zarr.open_group(str(tmp_path / "theirs"), mode="w").attrs["tool"] = "theirs"
    (tmp_path / "theirs.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for path in ("theirs.h5", "theirs", "theirs.bin"):
        with pytest.raises(SoftcacheError, match="is not a softcache cache"):
            open_cache(tmp_path / path)
    assert list(find_caches(tmp_path)) == []


def test_an_hdf5_cache_is_found_by_its_signature_not_its_name(tmp_path, small_shards):
    rows = _random_rows(8, 2, np.random.default_rng(7), layers=False)
    _write(tmp_path / "caches" / "teacher-cache", "hdf5", rows, (8,), _manifest(layers=(), views=2)).finish()
    found = [path.name for path, _ in find_caches(tmp_path)]
    assert found == ["teacher-cache"]
    assert open_cache(tmp_path / "caches" / "teacher-cache").read("logits").tobytes() == rows["logits"].tobytes()


def test_sizes_and_layers_read_at_any_scale():
    from softcache.store.listing import human_size, stored_layers
    sizes = [0, 1023, 1536, 20 * 2**20 + 2**19, 5 * 2**30 + 2**29]
    assert [human_size(n) for n in sizes] == ["0 B", "1023 B", "1.5 KiB", "20.5 MiB", "5.5 GiB"]
    features, attention = _manifest(layers=("layer2", "layer3")), _manifest(layers=("layer3", "embedding"))
    attention["storage"]["targets"] = "attention"
    assert stored_layers(features) == "layer2,layer3"
    assert stored_layers(attention) == "layer3 (attention), embedding (features)"
    assert stored_layers(_manifest(layers=())) == "-"


def test_an_array_whose_metadata_is_cut_short_is_damage_named(tmp_path, small_shards):
    _write(tmp_path / "c", "zarr", _random_rows(8, 2, np.random.default_rng(8)), (8,)).finish()
    _truncate(tmp_path / "c" / "features" / "layer3" / "zarr.json")
    with pytest.raises(SoftcacheError,
                       match=r"cache '.*' is damaged: its arrays cannot be opened \(.*with --overwrite"):
        open_cache(tmp_path / "c")
