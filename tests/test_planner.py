"""The one data-path planner: resident vs loader images, resident vs streamed targets, from real sizes."""
from __future__ import annotations

import pytest

from softcache import planner
from softcache.errors import SoftcacheError
from softcache.planner import DataPlan, image_bytes, plan
from softcache.views import Augment


def test_resident_images_are_counted_with_the_padding_their_crops_need():
    cifar, none = Augment("cifar", image_size=32), Augment("none", image_size=32)
    assert (cifar.crop_pad, none.crop_pad, Augment("imagenet", image_size=224).crop_pad) == (4, 0, 0)
    assert image_bytes(50_000, 32, cifar.crop_pad) == 50_000 * 3 * 40 * 40  # CIFAR-10 padded: 240 MB
    assert image_bytes(50_000, 32, none.crop_pad) == 50_000 * 3 * 32 * 32


@pytest.mark.parametrize("data_path, crops, images, targets, expected", [
    ("auto", True, 100, 100, DataPlan("resident", "resident")),
    ("auto", True, 600, 500, DataPlan("loader", "resident")),      # together they do not fit
    ("auto", False, 100, 100, DataPlan("loader", "resident")),     # resized views cannot be gathered
    ("auto", True, 100, 2000, DataPlan("resident", "stream")),     # targets past the budget stream
    ("stream", True, 100, 100, DataPlan("resident", "stream")),
    ("stream", True, 2000, 100, DataPlan("loader", "stream")),
    ("loader", True, 100, 100, DataPlan("loader", "resident")),
    ("resident", True, 2000, 2000, DataPlan("resident", "resident")),  # forced
])
def test_the_plan_for_each_data_path(monkeypatch, data_path, crops, images, targets, expected):
    monkeypatch.setattr(planner, "RESIDENT_BYTES", 1000)
    assert plan(data_path, crops=crops, images=images, targets=targets, stage_targets=True) == expected


def test_stages_without_cached_targets_and_impossible_plans_are_refused(monkeypatch):
    monkeypatch.setattr(planner, "RESIDENT_BYTES", 1000)
    assert plan("auto", crops=True, images=900) == DataPlan("resident")
    assert plan("auto", crops=True, images=1100) == DataPlan("loader")
    with pytest.raises(SoftcacheError, match=r"unknown data path 'stream'; valid: auto, resident, loader$"):
        plan("stream", crops=True, images=10)
    with pytest.raises(SoftcacheError, match="--data-path resident needs crop-only views"):
        plan("resident", crops=False, images=10, what="'imagenet' views")
