"""The names the command line offers, without importing torch: `softcache --help` and argument errors answer
at once. The loss names come from the loss registry (torch-free); the modules that implement the other names use
these tuples (and a test checks they agree)."""
from __future__ import annotations

from softcache.losses.registry import LOSS_NAMES

__all__ = ["AUTO_SPELLINGS", "BACKENDS", "LOSS_NAMES", "POLICIES", "TARGET_KINDS"]

POLICIES = ("cifar", "imagenet", "none")
TARGET_KINDS = ("features", "attention")
BACKENDS = ("zarr", "hdf5")
AUTO_SPELLINGS = ("rand-mM-nN", "trivialaugment", "ta_wide", "autoaugment", "original", "autoaugment-imagenet",
                  "autoaugment-cifar10", "autoaugment-svhn")  # --aa (softcache.pixels)
