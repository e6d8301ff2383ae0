"""The names the command line offers, without importing torch: `softcache --help` and argument errors answer
at once. The modules that implement them use these tuples (and a test checks they agree)."""
from __future__ import annotations

LOSS_NAMES = ("ce", "kd", "fitnets", "at", "rkd", "pkt", "sp", "nst", "crd")
POLICIES = ("cifar", "imagenet", "none")
TARGET_KINDS = ("features", "attention")
BACKENDS = ("zarr", "hdf5")
