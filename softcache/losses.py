"""Distillation losses as small modules with explicit tensor contracts.

Each term returns an unweighted scalar; `DistillLoss` applies the weights and returns every weighted term by
name plus their sum under 'loss', so logs show each term.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from softcache.errors import SoftcacheError


class CELoss(nn.Module):
    """Cross-entropy with the hard labels: `forward(student_logits [B, K], labels [B]) -> []`."""

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student_logits, labels)


class KDLoss(nn.Module):
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

    `T^2 * KL(softmax(t / T) || softmax(s / T))`, averaged over the batch. The T^2 factor keeps the soft
    term's gradient on the scale of the hard-label term as T changes.
    `forward(student_logits [B, K], teacher_logits [B, K]) -> []`.
    """

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps `[B, C, H, W]` to the other's spatial size."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-1] > b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


class FitNetsLoss(nn.Module):
    """Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

    A 1x1 conv + BN regressor maps the student's hint layer to the teacher's channel count; the loss is the
    mean squared error to the teacher's feature, spatial sizes matched by average pooling.
    `forward(student_feature [B, Cs, Hs, Ws], teacher_feature [B, Ct, Ht, Wt]) -> []`.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.regressor = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                                       nn.BatchNorm2d(teacher_channels))

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(self.regressor(student_feature), teacher_feature.to(student_feature.dtype))
        return F.mse_loss(s.float(), t.float())


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis's spatial attention: `normalize(mean_c(f^2))`, `[B, C, H, W] -> [B, H * W]`, unit L2 norm per sample."""
    return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), dim=1)


class ATLoss(nn.Module):
    """Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).

    Mean over batch and positions of the squared difference of the normalised attention maps (so the usual
    beta = 1000 applies, as in the RepDistiller benchmarks). Spatial sizes are matched by average pooling.
    `forward(student_feature [B, Cs, H, W], teacher_feature [B, Ct, H', W']) -> []`.
    """

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(student_feature, teacher_feature)
        return (attention_map(s) - attention_map(t)).pow(2).mean()


LOSSES = {"ce": CELoss, "kd": KDLoss, "fitnets": FitNetsLoss, "at": ATLoss}
FEATURE_LOSSES = ("fitnets", "at")


def resolve_weights(terms: Sequence[str], *, alpha: float, beta: float, hint_weight: float,
                    overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Weight of every active term. `kd` brings Hinton's mix: kd weighted alpha, hard-label ce weighted 1 - alpha.

    Without kd, `ce` (if listed) has weight 1; `at` has beta, `fitnets` hint_weight; `overrides` win.
    """
    unknown = [t for t in terms if t not in LOSSES]
    if unknown:
        raise SoftcacheError(f"unknown loss '{unknown[0]}'; valid: {', '.join(sorted(LOSSES))}")
    weights: dict[str, float] = {}
    if "kd" in terms:
        weights.update(ce=1.0 - alpha, kd=alpha)
    elif "ce" in terms:
        weights["ce"] = 1.0
    if "at" in terms:
        weights["at"] = beta
    if "fitnets" in terms:
        weights["fitnets"] = hint_weight
    for term, w in (overrides or {}).items():
        if term not in weights:
            raise SoftcacheError(f"--weight names '{term}', which is not an active term; active: {', '.join(weights)}")
        weights[term] = float(w)
    return weights


class DistillLoss(nn.Module):
    """All active terms of a student's objective.

    `pairs` maps student layer -> teacher layer; `channels` gives `(student C, teacher C)` per pair (FitNets
    needs them to size its regressors, which train with the student).
    `forward(logits [B, K], labels [B], student_features {s_layer: [B, C, H, W]}, teacher_logits [B, K],
    teacher_features {t_layer: [B, C, H, W]}) -> {'loss', term: weighted value ...}`.
    """

    def __init__(self, weights: Mapping[str, float], *, temperature: float = 4.0,
                 pairs: Mapping[str, str] | None = None, channels: Mapping[str, tuple[int, int]] | None = None):
        super().__init__()
        self.weights, self.pairs = dict(weights), dict(pairs or {})
        self.ce, self.kd, self.at = CELoss(), KDLoss(temperature), ATLoss()
        self.hints = nn.ModuleDict()
        if "fitnets" in self.weights:
            self.hints.update({s.replace(".", "__"): FitNetsLoss(*channels[s]) for s in self.pairs})

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, student_features: Mapping[str, torch.Tensor],
                teacher_logits: torch.Tensor | None, teacher_features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if "ce" in self.weights:
            terms["ce"] = self.ce(logits, labels)
        if "kd" in self.weights:
            terms["kd"] = self.kd(logits, teacher_logits)
        if "at" in self.weights:
            terms["at"] = sum(self.at(student_features[s], teacher_features[t]) for s, t in self.pairs.items())
        if "fitnets" in self.weights:
            terms["fitnets"] = sum(self.hints[s.replace(".", "__")](student_features[s], teacher_features[t])
                                   for s, t in self.pairs.items())
        out = {name: self.weights[name] * value for name, value in terms.items()}
        out["loss"] = sum(out.values())
        return out
