"""The one table of loss terms. Everything else derives from it: the CLI's names (softcache.names), which `--pair`
kinds serve which term, the default weights, which terms own trained modules, `LOSSES`.

Torch-free on purpose: `softcache --help` reads it without importing torch. Each implementation is named by
`module:Class` and imported on first use (`LossSpec.load`). A new loss is one module in this package, one entry
below, and its test.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Takes = Literal["logits", "map", "attention", "vector", "tokens", "input"]
WeightOption = Literal["alpha", "beta", "hint_weight"]


@dataclass(frozen=True)
class LossSpec:
    """What one loss term declares."""

    impl: str                         # "package.module:Class", imported by `load` (so this module needs no torch)
    takes: tuple[Takes, ...]          # ("logits",): the student's logits [B, K]; otherwise the --pair kinds it fits:
                                      # "map" [B, C, H, W], "attention" (a cached AT map [B, H, W]), "vector" [B, D],
                                      # "tokens" [B, N, D] (a ViT block's; the vector terms take the class token);
                                      # ("input",): the input-gradient maps (gat), no pair
    weight: float | WeightOption      # default weight, or the resolve_weights option that sets it (--alpha, ...)
    help: str                         # one line for --help and error messages
    trained: bool = False             # owns parameters that train with the student, one module per pair
    options: Mapping[str, float] = field(default_factory=dict)  # its own settings and their defaults (the
                                      # reference code's CIFAR-100 values), set by --loss-option TERM.KEY=VALUE;
                                      # `warmup` (epochs) ramps its weight by min((epoch + 1) / warmup, 1);
                                      # `init_epochs`: epochs it trains alone before the main ones (softcache.train)
    full_logits: bool = False         # reads the teacher's whole logit vector: refused with a topk or sampled cache
    joint: bool = False               # takes all its pairs at once, shallow to deep, relating consecutive stages
    teacher_params: Literal["bn", "classifier"] | None = None  # reads what the cache stores of the teacher once
                                      # (models.teacher_params): the BatchNorms before tapped ReLUs, the classifier
    equal_channels: bool = False      # its student and teacher maps must have the same channel counts
    min_pairs: int = 1                # pairs it needs (2: it relates consecutive stages)

    @property
    def paired(self) -> bool:
        """Whether the term reads a `--pair` of student and teacher tensors (every term but the logit ones and
        the input-gradient one)."""
        return not {"logits", "input"} & set(self.takes)

    def load(self) -> type:
        """The implementing class (imports torch)."""
        module, _, name = self.impl.partition(":")
        return getattr(importlib.import_module(module), name)


_PKG = "softcache.losses"
REGISTRY: dict[str, LossSpec] = {
    "ce": LossSpec(f"{_PKG}.response:CELoss", ("logits",), 1.0,
                   "cross-entropy with the hard labels (weight 1 - alpha beside kd)"),
    "kd": LossSpec(f"{_PKG}.response:KDLoss", ("logits",), "alpha",
                   "Hinton's KD: T^2 KL of the softened teacher and student distributions"),
    "deit": LossSpec(f"{_PKG}.response:DeiTLoss", ("logits",), "alpha",
                     "DeiT hard distillation: CE of the distillation head with the teacher's top class"),
    "deit-soft": LossSpec(f"{_PKG}.response:SoftDeiTLoss", ("logits",), "alpha",
                          "DeiT soft distillation: T^2 KL of teacher and distillation head"),
    "dkd": LossSpec(f"{_PKG}.logit:DKDLoss", ("logits",), 1.0,
                    "decoupled KD: alpha TCKD + beta NCKD, KD split at the target class (ce weight 1 beside it)",
                    options={"alpha": 1.0, "beta": 8.0, "warmup": 20}, full_logits=True),
    "dist": LossSpec(f"{_PKG}.logit:DISTLoss", ("logits",), 2.0,
                     "DIST: Pearson distances of the predictions per sample and per class (ce weight 1 beside it)",
                     options={"tau": 4.0, "beta": 1.0, "gamma": 1.0}, full_logits=True),
    "mlkd": LossSpec(f"{_PKG}.logit:MLKDLoss", ("logits",), "alpha",
                     "multi-level logit distillation: instance, class and batch terms at five temperatures on a weak "
                     "and a strong view (--strong-stream)", full_logits=True),
    "gat": LossSpec(f"{_PKG}.features:GradientATLoss", ("input",), "beta",
                    "gradient-based attention: the student's input-gradient map of the teacher's top class against "
                    "the teacher's (the cache needs --layers input_gradient)"),
    "fitnets": LossSpec(f"{_PKG}.features:FitNetsLoss", ("map", "tokens"), "hint_weight",
                        "FitNets hints: MSE after a trained regressor (1x1 conv + BN; linear + LayerNorm on tokens)",
                        trained=True, options={"init_epochs": 0}),
    "at": LossSpec(f"{_PKG}.features:ATLoss", ("map", "attention"), "beta",
                   "attention transfer: squared distance of normalised spatial attention maps"),
    "rkd": LossSpec(f"{_PKG}.relations:RKDLoss", ("vector", "tokens"), 1.0,
                    "relational KD: distance and angle potentials of the batch's embeddings"),
    "pkt": LossSpec(f"{_PKG}.relations:PKTLoss", ("vector", "tokens"), 30000.0,
                    "probabilistic knowledge transfer: KL of cosine-similarity distributions"),
    "sp": LossSpec(f"{_PKG}.relations:SPLoss", ("map", "tokens"), 3000.0,
                   "similarity-preserving KD: distance of the batch's normalised Gram matrices"),
    "nst": LossSpec(f"{_PKG}.features:NSTLoss", ("map",), 50.0,
                    "neuron selectivity transfer: polynomial-kernel MMD of channel maps"),
    "cc": LossSpec(f"{_PKG}.relations:CCLoss", ("vector", "tokens"), 0.02,
                   "correlation congruence (RepDistiller's): products of consecutive samples' embedding gaps",
                   trained=True),
    "vid": LossSpec(f"{_PKG}.features:VIDLoss", ("map",), 1.0,
                    "variational information distillation: Gaussian likelihood of the teacher map given the student's",
                    trained=True, options={"init_var": 5.0}),
    "gram": LossSpec(f"{_PKG}.features:GramLoss", ("map",), 1.0,
                     "channel Gram matrices G = F F^T / HW per sample, squared distance (the seed's variant)",
                     equal_channels=True),
    "fsp": LossSpec(f"{_PKG}.stages:FSPLoss", ("map",), 1.0,
                    "flow of solution procedure: Gram matrices between consecutive stages (two or more pairs)",
                    joint=True, equal_channels=True, options={"init_epochs": 30}, min_pairs=2),
    "kdsvd": LossSpec(f"{_PKG}.stages:KDSVDLoss", ("map",), 1.0,
                      "KD with SVD: RBF relations of consecutive stages' singular vectors (two or more pairs)",
                      joint=True, equal_channels=True, options={"k": 1}, min_pairs=2),
    "reviewkd": LossSpec(f"{_PKG}.stages:ReviewKDLoss", ("map", "vector"), 1.0,
                         "knowledge review: fused student stages, deep to shallow, against the teacher's pre-ReLU "
                         "stages and embedding (pairs shallow to deep, the embedding last)",
                         trained=True, joint=True, options={"warmup": 20, "max_mid": 512}),
    "ab": LossSpec(f"{_PKG}.stages:ABLoss", ("map",), 1.0,
                   "activation boundaries: margin L2 on pre-ReLU stages, the deepest weighted most",
                   trained=True, joint=True, options={"margin": 1.0, "init_epochs": 30}),
    "ft": LossSpec(f"{_PKG}.features:FTLoss", ("map",), 200.0,
                   "factor transfer: L1 of translated student and paraphrased teacher factors",
                   trained=True, options={"rate": 0.5, "init_epochs": 30}),
    "ofd": LossSpec(f"{_PKG}.stages:OFDLoss", ("map",), 0.001,
                    "overhaul of feature distillation: partial L2 to pre-ReLU stages above the teacher's BN margin",
                    trained=True, joint=True, teacher_params="bn"),
    "simkd": LossSpec(f"{_PKG}.simkd:SimKDLoss", ("map",), 1.0,
                      "SimKD: the student's last map projected to the teacher's, classified by the teacher's head "
                      "(one pair; the cache needs --teacher-head)", teacher_params="classifier", equal_channels=True),
    "crd": LossSpec(f"{_PKG}.contrastive:CRDLoss", ("vector", "tokens"), 0.8,
                    "contrastive representation distillation: NCE with trained heads and memories", trained=True),
}

LOSS_NAMES = tuple(REGISTRY)
MAP_LOSSES = tuple(n for n, s in REGISTRY.items() if "map" in s.takes)        # pair feature maps (at: attention too)
TOKEN_LOSSES = tuple(n for n, s in REGISTRY.items() if "tokens" in s.takes)   # pair ViT tokens [B, N, D]
VECTOR_LOSSES = tuple(n for n, s in REGISTRY.items() if "vector" in s.takes)  # pair embeddings [B, D]
FEATURE_LOSSES = tuple(dict.fromkeys(MAP_LOSSES + VECTOR_LOSSES))           # every term that needs --pair
TRAINED_HEADS = tuple(n for n, s in REGISTRY.items() if s.trained)           # modules of their own, one per pair
# The pair terms' fixed weights (the CRD benchmark's); kd, at and fitnets take theirs from options.
DEFAULT_WEIGHTS = {n: s.weight for n, s in REGISTRY.items() if s.paired and isinstance(s.weight, float)}
DISTILL_HEAD_LOSSES = ("deit", "deit-soft")  # on a DeiT student's distillation head (models.DIST_LOGITS)
FULL_LOGIT_LOSSES = tuple(n for n, s in REGISTRY.items() if s.full_logits)
JOINT_LOSSES = tuple(n for n, s in REGISTRY.items() if s.joint)                # all their pairs at once
STANDARDIZED = ("kd", "dkd")   # the terms --kd-standardize and --learn-temperature change
TWO_VIEW_LOSSES = ("mlkd",)    # read a second (strong) view of every sample, --strong-stream
