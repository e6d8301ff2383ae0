"""The student's whole objective: every active term, weighted, by name."""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from softcache.errors import SoftcacheError
from softcache.losses.contrastive import CRDLoss
from softcache.losses.features import FitNetsLoss, GradientATLoss, TokenFitNetsLoss
from softcache.losses.logit import LearnedTemperature, standardize, teacher_logits
from softcache.losses.stages import ofd_margin
from softcache.losses.registry import DISTILL_HEAD_LOSSES, REGISTRY, STANDARDIZED, TWO_VIEW_LOSSES, VECTOR_LOSSES
from softcache.models import DIST_LOGITS, INPUT_GRADIENT, class_token
from softcache.losses.response import CELoss, KDLoss
from softcache.losses.routing import PAIR_REDUCTIONS

LOSSES: dict[str, type[nn.Module]] = {name: spec.load() for name, spec in REGISTRY.items()}
SCHEDULE_KEYS = ("warmup", "init_epochs")  # options the schedule reads, not the term's module


def _key(layer: str) -> str:
    return layer.replace(".", "__")  # ModuleDict keys cannot hold dots


class DistillLoss(nn.Module):
    """All active terms of a student's objective.

    `routes` maps each pair-term to its (student layer, teacher layer) pairs (`route_pairs`); a term over
    several pairs is their sum (`reduce='sum'`, as RepDistiller sums AT over layer groups) or their mean.
    `channels[(s, t)]` gives `(student C, teacher C)` per pair (`(D, D)` for tokens, whose FitNets regressor is
    linear, as `kinds[(s, t)] == 'tokens'` says; FitNets sizes its regressors from them; they
    train with the student). A pair-term without trained parameters is one module, built without arguments and
    called as `term(student_feature, teacher_feature)`; the trained ones (`LossSpec.trained`) get one per pair.
    `forward(logits [B, K], labels [B], student_features {s_layer: [B, C, H, W] or [B, D]}, teacher (a KD
    target, see KDLoss.from_target), teacher_features {t_layer: [B, C, H, W], [B, H, W] or [B, D]})
    -> {'loss', term: weighted value ...}`.
    """

    def __init__(self, weights: Mapping[str, float], *, temperature: float = 4.0,
                 routes: Mapping[str, Sequence[tuple[str, str]]] | None = None,
                 channels: Mapping[tuple[str, str], tuple[int, int]] | None = None, reduce: str = "sum",
                 labels: Sequence[int] | None = None, seed: int = 0,
                 kinds: Mapping[tuple[str, str], str] | None = None,
                 options: Mapping[str, Mapping[str, float]] | None = None, standardize: bool = False,
                 learn_temperature: bool = False, label_smoothing: float = 0.0,
                 teacher_params: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        if reduce not in PAIR_REDUCTIONS:
            raise SoftcacheError(f"unknown pair reduction '{reduce}'; valid: {', '.join(PAIR_REDUCTIONS)}")
        self.weights, self.reduce, self.temperature = dict(weights), reduce, temperature
        self.teacher_params = {k: torch.as_tensor(v) for k, v in (teacher_params or {}).items()}
        # every active term's settings: its registry defaults, then --loss-option; `warmup` is the schedule's
        self.options = {t: {**REGISTRY[t].options, **(options or {}).get(t, {})} for t in self.weights}
        self.routes = {term: list(pairs) for term, pairs in (routes or {}).items()}
        self.ce, self.kd = CELoss(label_smoothing), KDLoss(temperature)
        self.gat = GradientATLoss() if "gat" in self.weights else None
        self.input_gradient = self.gat is not None  # DistillStep then computes the student's input-gradient map
        self.standardize = standardize
        self.temperature_module = LearnedTemperature() if learn_temperature else None
        self.logit_terms = nn.ModuleDict({t: self._build(t) for t in self.weights
                                          if REGISTRY[t].takes == ("logits",) and t not in ("ce", "kd")})
        for term, pairs in self.routes.items():
            if REGISTRY[term].equal_channels:
                for s, t in pairs:
                    if channels[(s, t)][0] != channels[(s, t)][1]:
                        raise SoftcacheError(
                            f"{term} compares channel by channel, and --pair {s}={t} pairs {channels[(s, t)][0]} "
                            f"student channels with {channels[(s, t)][1]} teacher channels; pair layers of equal width")
        # the untrained pair terms and the joint ones (one module each); per-pair trained heads below
        self.terms = nn.ModuleDict({t: self._build_pair_term(t, [channels[p] for p in pairs] if channels else [],
                                                             [t_layer for _, t_layer in pairs])
                                    for t, pairs in self.routes.items()
                                    if REGISTRY[t].joint or not REGISTRY[t].trained})
        # the initialisation stage: the terms that train alone first (RepDistiller's init(), FitNets' stage 1)
        self.init_terms = [t for t in self.routes if self.options[t].get("init_epochs", 0) > 0]
        self.init_epochs = int(max((self.options[t]["init_epochs"] for t in self.init_terms), default=0))
        # those the main stage leaves out (ab, fsp, two-stage FitNets), as RepDistiller's and the seed's stage 2
        # train on the task loss; ft goes on with its paraphraser frozen
        self.init_only = {t for t in self.init_terms if not getattr(LOSSES[t], "continues_after_init", False)}
        self.set_epoch(0)
        # The trained terms' modules, keyed by the student layer; the attribute names are the checkpoints' keys.
        self.hints = nn.ModuleDict()     # fitnets: one regressor per pair
        for s, t in self.routes.get("fitnets", []):
            if _key(s) in self.hints:
                raise SoftcacheError(f"fitnets pairs student layer '{s}' twice; give each student layer one hint")
            hint = TokenFitNetsLoss if (kinds or {}).get((s, t)) == "tokens" else FitNetsLoss
            self.hints[_key(s)] = hint(*channels[(s, t)])
        self.contrast = nn.ModuleDict()  # crd: heads and memories per pair (the training set's labels draw negatives)
        for k, (s, t) in enumerate(self.routes.get("crd", [])):
            self.contrast[_key(s)] = CRDLoss(*channels[(s, t)], labels, seed=seed + k)
        self.heads = nn.ModuleDict()     # the other trained terms (vid, cc, ...): one module per pair
        for term, pairs in self.routes.items():
            if REGISTRY[term].trained and not REGISTRY[term].joint and term not in ("fitnets", "crd"):
                self.heads[term] = nn.ModuleDict({_key(s): self._build_pair_term(term, [channels[(s, t)]])
                                                  for s, t in pairs})

    def _build(self, term: str) -> nn.Module:
        """A logit term's module: its options (but the schedule's), and the KD temperature where it takes one."""
        cls = LOSSES[term]
        kwargs = {k: v for k, v in self.options[term].items() if k not in SCHEDULE_KEYS}
        if "temperature" in inspect.signature(cls).parameters:
            kwargs["temperature"] = self.temperature
        return cls(**kwargs)

    def _build_pair_term(self, term: str, channels: list[tuple[int, int]],
                         teacher_layers: Sequence[str] = ()) -> nn.Module:
        """A pair term's module with its options: a trained one from its pair's `(student C, teacher C)` (a joint
        trained one from every pair's), an untrained one from its options alone; ofd with the margins of its
        teacher layers' BatchNorms (`teacher_params`)."""
        spec, kwargs = REGISTRY[term], {k: v for k, v in self.options[term].items() if k not in SCHEDULE_KEYS}
        if spec.teacher_params == "bn":
            missing = [t for t in teacher_layers if f"bn/{t}/weight" not in self.teacher_params]
            if missing:
                raise SoftcacheError(
                    f"{term} needs the teacher's BatchNorm before the ReLU of '{missing[0]}', which this cache does "
                    "not hold: pair the teacher's LAYER.pre_relu layers (dump-teacher stores their BatchNorm with "
                    f"them), e.g. --pair {term}:layer3.pre_relu=layer3.pre_relu")
            kwargs["margins"] = [ofd_margin(self.teacher_params[f"bn/{t}/weight"], self.teacher_params[f"bn/{t}/bias"])
                                 for t in teacher_layers]
        if not spec.trained:
            return LOSSES[term](**kwargs)
        return LOSSES[term](channels, **kwargs) if spec.joint else LOSSES[term](*channels[0], **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """The epoch (0-based, initialisation epochs first) the next steps belong to: the stage, the warm-up
        ramps and the learned temperature's λ (both counted from the first main epoch)."""
        self.stage = "init" if epoch < self.init_epochs else "main"
        self.epoch = max(0, epoch - self.init_epochs)
        if self.temperature_module is not None:
            self.temperature_module.set_epoch(self.epoch)

    def _init_stage(self, student_features: Mapping[str, torch.Tensor],
                    teacher_features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The initialisation stage's terms, each unweighted (RepDistiller's init() sums them as they are): a
        term's `init_loss` where it has one (ft: the paraphraser's reconstruction), else the term itself."""
        terms = {term: self._term(term, student_features, teacher_features, None, None, init=True)
                 for term in self.init_terms}
        terms["loss"] = sum(terms.values())
        return terms

    def _term(self, term: str, student_features: Mapping[str, torch.Tensor],
              teacher_features: Mapping[str, torch.Tensor], index: torch.Tensor | None, labels: torch.Tensor | None,
              init: bool = False) -> torch.Tensor:
        """A pair term, unweighted: a joint term over all its pairs (shallow to deep), else over each pair, summed
        or averaged (`reduce`); `init`: a trained head's `init_loss` where it has one."""
        pairs = self.routes[term]
        if REGISTRY[term].joint:
            return self.terms[term]([student_features[s] for s, _ in pairs], [teacher_features[t] for _, t in pairs])
        values = []
        for s, t in pairs:
            head = self.heads[term][_key(s)] if init and term in self.heads else None
            values.append(head.init_loss(student_features[s], teacher_features[t]) if hasattr(head, "init_loss")
                          else self._pair_loss(term, student_features[s], teacher_features[t], s, index, labels))
        return sum(values) / (len(values) if self.reduce == "mean" else 1)

    def ramp(self, term: str) -> float:
        """A term's warm-up factor `min((epoch + 1) / warmup, 1)` (mdistiller's, its epochs counted from 1)."""
        warmup = self.options[term].get("warmup", 0)
        return min((self.epoch + 1) / warmup, 1.0) if warmup > 0 else 1.0

    def _logit_terms(self, logits: torch.Tensor, labels: torch.Tensor, student_features: Mapping[str, torch.Tensor],
                     teacher: torch.Tensor | Mapping[str, torch.Tensor] | None,
                     strong: tuple[torch.Tensor, torch.Tensor | Mapping[str, torch.Tensor]] | None = None
                     ) -> dict[str, torch.Tensor]:
        """kd and the other logit terms, unweighted. Standardization and the learned temperature change kd and
        dkd (`STANDARDIZED`); those and the `full_logits` terms read the teacher's logit vector."""
        terms: dict[str, torch.Tensor] = {}
        changed = self.standardize or self.temperature_module is not None
        full = teacher_logits(teacher, self.temperature) if teacher is not None else None
        t = self.temperature_module() if self.temperature_module is not None else None
        s_z, t_z = logits, full
        if self.standardize and full is not None:
            s_z, t_z = standardize(logits), standardize(full)
        if "kd" in self.weights:
            terms["kd"] = self.kd(s_z, t_z, temperature=t) if changed else self.kd.from_target(logits, teacher)
        for name, term in self.logit_terms.items():
            if name in DISTILL_HEAD_LOSSES:
                assert DIST_LOGITS in student_features, "a deit term needs the student's distillation head (Tapped)"
                terms[name] = term(student_features[DIST_LOGITS], teacher)
            elif name in STANDARDIZED:
                terms[name] = term(s_z, t_z, labels, temperature=t)
            elif name in TWO_VIEW_LOSSES:
                assert strong is not None, f"{name} needs the strong views (PairedBatches)"
                terms[name] = term(logits, full, strong[0], teacher_logits(strong[1], self.temperature))
            else:
                terms[name] = term(logits, full, labels)
        return terms

    def _pair_loss(self, term: str, student: torch.Tensor, teacher: torch.Tensor, s_layer: str,
                  index: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Unweighted `term` on one pair: `student`, `teacher` as routed from layers (`s_layer`, ...). The
        embedding terms take a token feature's class token (`models.class_token`)."""
        if term in VECTOR_LOSSES and student.dim() == 3:
            student, teacher = class_token(student), class_token(teacher)
        if term == "fitnets":
            return self.hints[_key(s_layer)](student, teacher)
        if term == "crd":
            return self.contrast[_key(s_layer)](student, teacher, index, labels)
        if term in self.heads:
            return self.heads[term][_key(s_layer)](student, teacher)
        return self.terms[term](student, teacher)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, student_features: Mapping[str, torch.Tensor],
                teacher: Mapping[str, torch.Tensor] | None, teacher_features: Mapping[str, torch.Tensor],
                index: torch.Tensor | None = None,
                mixed: tuple[torch.Tensor, torch.Tensor] | None = None,
                strong: tuple[torch.Tensor, torch.Tensor | Mapping[str, torch.Tensor]] | None = None
                ) -> dict[str, torch.Tensor]:
        """`index [B]`: the batch's sample indices (crd's positives and memory rows); `mixed`: the partner labels
        and λ of mixed views, for the ce term (`CELoss`); `strong`: the student's logits and the teacher's target
        on a second (strong) view of the same samples (mlkd; ce then adds the strong view's CE, as MLKD does)."""
        if self.stage == "init":
            return self._init_stage(student_features, teacher_features)
        terms: dict[str, torch.Tensor] = {}
        if "ce" in self.weights:
            terms["ce"] = self.ce(logits, labels, mixed)
            if strong is not None:
                terms["ce"] = terms["ce"] + self.ce(strong[0], labels, mixed)
        terms.update(self._logit_terms(logits, labels, student_features, teacher, strong))
        if self.gat is not None:
            terms["gat"] = self.gat(student_features[INPUT_GRADIENT], teacher_features[INPUT_GRADIENT])
        for term in self.routes:
            if term not in self.init_only:
                terms[term] = self._term(term, student_features, teacher_features, index, labels)
        out = {name: self.weights[name] * self.ramp(name) * value for name, value in terms.items()}
        out["loss"] = sum(out.values())
        return out
