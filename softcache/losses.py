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
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
        return self.from_log_probs(student_logits, log_p_t)

    def from_log_probs(self, student_logits: torch.Tensor, teacher_log_p: torch.Tensor) -> torch.Tensor:
        """The same loss from the teacher's log-probabilities at T `[B, K]` (e.g. an ensemble's)."""
        t = self.temperature
        log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
        return F.kl_div(log_p_s, teacher_log_p, log_target=True, reduction="batchmean") * t * t

    def from_topk(self, student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  tail_lse: torch.Tensor) -> torch.Tensor:
        """KD over K + 1 buckets: the teacher's top-K classes and its merged tail.

        `values [B, K]` are the teacher's top logits at classes `indices [B, K]`; `tail_lse [B]` is
        `log sum_{j not in top-K} exp(z_j / T)`. The student's tail bucket is its probability mass outside the
        top-K classes, so both sides sum to one and only the spread inside the tail is lost.
        """
        t = self.temperature
        teacher = torch.cat([values.float() / t, tail_lse.float()[:, None]], dim=1)
        log_p_t = teacher - torch.logsumexp(teacher, dim=1, keepdim=True)
        log_p_s_all = F.log_softmax(student_logits.float() / t, dim=1)
        in_top = torch.zeros_like(log_p_s_all, dtype=torch.bool).scatter_(1, indices, True)
        log_p_s = torch.cat([log_p_s_all.gather(1, indices),
                             torch.logsumexp(log_p_s_all.masked_fill(in_top, float("-inf")), dim=1, keepdim=True)], dim=1)
        terms = torch.where(torch.isfinite(log_p_t), log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(log_p_t))
        return terms.sum() / len(student_logits) * t * t

    def from_samples(self, student_logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     teacher_log_p: torch.Tensor) -> torch.Tensor:
        """Importance-sampled KD (Anshumann et al., ACL 2025): `sum_k w_k (log p_t(j_k) - log p_s(j_k))`.

        With `j_k ~ q` and `w_k = p_t(j_k) / (K q(j_k))` its expectation is the full KL(p_t || p_s).
        `ids, weights, teacher_log_p`: `[B, K]`, drawn at this loss's temperature.
        """
        t = self.temperature
        log_p_s = F.log_softmax(student_logits.float() / t, dim=1).gather(1, ids)
        return (weights * (teacher_log_p - log_p_s)).sum() / len(student_logits) * t * t

    def from_target(self, student_logits: torch.Tensor, target: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Dispatch on what the cache holds (see softcache.targets): logits, log_p, top-K or samples.

        A plain tensor is taken as the teacher's logits `[B, K]`.
        """
        if isinstance(target, torch.Tensor):
            return self(student_logits, target)
        if "logits" in target:
            return self(student_logits, target["logits"])
        if "log_p" in target:
            return self.from_log_probs(student_logits, target["log_p"])
        if "topk_values" in target:
            return self.from_topk(student_logits, target["topk_values"], target["topk_indices"], target["tail_lse"])
        return self.from_samples(student_logits, target["sampled_ids"], target["sampled_weights"], target["sampled_logp"])


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
        if teacher_feature.dim() == 3:  # a cached attention map [B, H, W] (--targets attention)
            return self.from_map(student_feature, teacher_feature)
        s, t = match_spatial(student_feature, teacher_feature)
        return (attention_map(s) - attention_map(t)).pow(2).mean()

    def from_map(self, student_feature: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """AT against the teacher's stored map `[B, H, W]` (already normalised). A larger student feature is
        pooled to the map's size as on the features path; a larger map is pooled and renormalised."""
        size = teacher_map.shape[-2:]
        if student_feature.shape[-1] > size[-1]:
            student_feature = F.adaptive_avg_pool2d(student_feature, size)
        elif student_feature.shape[-1] < size[-1]:
            teacher_map = F.adaptive_avg_pool2d(teacher_map[:, None].float(), student_feature.shape[-2:])[:, 0]
        t = F.normalize(teacher_map.float().flatten(1), dim=1)
        return (attention_map(student_feature) - t).pow(2).mean()


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
    `forward(logits [B, K], labels [B], student_features {s_layer: [B, C, H, W]}, teacher (a KD target, see
    KDLoss.from_target), teacher_features {t_layer: [B, C, H, W] or attention map [B, H, W]})
    -> {'loss', term: weighted value ...}`.
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
                teacher: Mapping[str, torch.Tensor] | None, teacher_features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if "ce" in self.weights:
            terms["ce"] = self.ce(logits, labels)
        if "kd" in self.weights:
            terms["kd"] = self.kd.from_target(logits, teacher)
        if "at" in self.weights:
            terms["at"] = sum(self.at(student_features[s], teacher_features[t]) for s, t in self.pairs.items())
        if "fitnets" in self.weights:
            terms["fitnets"] = sum(self.hints[s.replace(".", "__")](student_features[s], teacher_features[t])
                                   for s, t in self.pairs.items())
        out = {name: self.weights[name] * value for name, value in terms.items()}
        out["loss"] = sum(out.values())
        return out
