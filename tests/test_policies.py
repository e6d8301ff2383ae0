"""Augmentation policies as objects in one registry: what each declares, and a new one needs nothing else."""
from __future__ import annotations

import numpy as np
import pytest

from softcache import names, policies
from softcache.policies import POLICIES, Policy
from softcache.views import Augment


def test_the_registry_is_what_the_cli_offers_and_each_policy_keeps_its_views():
    assert tuple(POLICIES) == names.POLICIES
    cifar, none = Augment("cifar", image_size=32), Augment("none", image_size=32)
    boxes, flips = cifar.all_views(32, 32)
    assert len(boxes) == cifar.count_all() == 162 and flips.sum() == 81
    assert {(int(b[0]), int(b[1])) for b in boxes} == {(t, left) for t in range(-4, 5) for left in range(-4, 5)}
    assert (boxes[:, 2:] == 32).all() and cifar.crop_pad == 4
    assert none.all_views(40, 32)[0].tolist() == [[4, 0, 32, 32]] and none.crop_pad == 0
    assert Augment("imagenet", image_size=224).eval_box(256, 256) == (16, 16, 224, 224)  # 87.5% of 256
    assert not Augment("imagenet").finite and Augment("cifar").finite


def test_a_new_policy_is_one_class_in_the_registry(monkeypatch):
    class Mirror(Policy):
        """The whole image, as it is and mirrored: two views."""

        name = "mirror"

        def count(self, a):
            return 2

        def views(self, a, height, width):
            return np.asarray([[0, 0, height, width]] * 2, np.float32), np.asarray([False, True])

    monkeypatch.setitem(policies.POLICIES, "mirror", Mirror())
    augment = Augment("mirror", image_size=32)
    assert augment.resolve_views("all") == 2
    boxes, flips = augment.stored_views(32, 32, 2, seed=0, indices=np.arange(5))
    assert boxes.shape == (5, 2, 4) and (flips.sum(1) == 1).all()  # both views, in a random order per sample
    with pytest.raises(Exception, match="exceeds the 2 distinct views of policy 'mirror'"):
        augment.resolve_views(3)
