"""Distillation losses as small modules with explicit tensor contracts, one module per family:

    registry.py     the one table of terms (LossSpec: what each takes, its default weight, its implementation)
    response.py     ce, kd (and KD from cached top-K or samples), deit  features.py   fitnets, at, nst, vid, ft, gram
    logit.py        dkd, dist, mlkd; standardization, CTKD's temperature
    relations.py    rkd, pkt, sp, cc                                   contrastive.py  crd
    stages.py       fsp, kdsvd, reviewkd, ab, ofd (all their pairs)    simkd.py      simkd
    routing.py      resolve_weights, resolve_options, --pair routing   distill.py    DistillLoss, the weighted sum

Each term returns an unweighted scalar; `DistillLoss` applies the weights and returns every weighted term by
name plus their sum under 'loss', so logs show each term.

Importing this package, its registry or its routing does not import torch (`softcache --help` reads them); the
torch-side names below are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from softcache.losses.registry import (DEFAULT_WEIGHTS, FEATURE_LOSSES, LOSS_NAMES, MAP_LOSSES, REGISTRY,
                                       TRAINED_HEADS, VECTOR_LOSSES, LossSpec)
from softcache.losses.routing import (PAIR_REDUCTIONS, resolve_options, resolve_weights, route_pairs,
                                      split_pair)

# name -> the module defining it: every registered loss class, and the torch-side helpers others import.
_LAZY = {**{name: module for module, name in (spec.impl.split(":") for spec in REGISTRY.values())},
         "LOSSES": "softcache.losses.distill", "DistillLoss": "softcache.losses.distill",
         "attention_map": "softcache.losses.features", "match_spatial": "softcache.losses.features",
         "teacher_logits": "softcache.losses.logit", "standardize": "softcache.losses.logit",
         "pairwise_distances": "softcache.losses.relations"}

# `import *` takes the torch-free names only; dir() and attribute access see the lazy ones too.
__all__ = ["DEFAULT_WEIGHTS", "FEATURE_LOSSES", "LOSS_NAMES", "MAP_LOSSES", "PAIR_REDUCTIONS", "REGISTRY",
           "TRAINED_HEADS", "VECTOR_LOSSES", "LossSpec", "resolve_options", "resolve_weights", "route_pairs",
           "split_pair"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
