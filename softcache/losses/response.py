"""Response-based terms: on the student's logits, against the hard labels or the teacher's (cached) output."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class CELoss(nn.Module):
    """Cross-entropy with the hard labels: `forward(student_logits [B, K], labels [B], mixed=None) -> []`.

    For mixed views (Mixup, CutMix; softcache.mixing) `mixed = (partner_labels [B], lam [B])` and the target is
    the mixed label `λ·y + (1 − λ)·y_partner`: `λ·CE(y) + (1 − λ)·CE(y_partner)`, averaged over the batch.
    `label_smoothing` ε (Szegedy et al. 2016, the baseline the seed compares KD with) replaces each one-hot
    target by `(1 − ε)·onehot + ε / K` (torch's `cross_entropy(label_smoothing=ε)`).
    """

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor,
                mixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        ls = self.label_smoothing
        if mixed is None:
            return F.cross_entropy(student_logits, labels, label_smoothing=ls)
        partner, lam = mixed
        lam = lam.to(student_logits.device, student_logits.dtype)
        own = F.cross_entropy(student_logits, labels, reduction="none", label_smoothing=ls)
        other = F.cross_entropy(student_logits, partner.to(labels.device), reduction="none", label_smoothing=ls)
        return (lam * own + (1 - lam) * other).mean()


class KDLoss(nn.Module):
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

    `T^2 * KL(softmax(t / T) || softmax(s / T))`, averaged over the batch. The T^2 factor keeps the soft
    term's gradient on the scale of the hard-label term as T changes.
    `forward(student_logits [B, K], teacher_logits [B, K]) -> []`.
    """

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                temperature: float | torch.Tensor | None = None) -> torch.Tensor:
        """`temperature`: this step's T instead of the loss's own (a learned one, `LearnedTemperature`)."""
        t = self.temperature if temperature is None else temperature
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
        return self.from_log_probs(student_logits, log_p_t, t)

    def from_log_probs(self, student_logits: torch.Tensor, teacher_log_p: torch.Tensor,
                       temperature: float | torch.Tensor | None = None) -> torch.Tensor:
        """The same loss from the teacher's log-probabilities at T `[B, K]` (e.g. an ensemble's)."""
        t = self.temperature if temperature is None else temperature
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
        log_p_tail = torch.logsumexp(log_p_s_all.masked_fill(in_top, float("-inf")), dim=1, keepdim=True)
        log_p_s = torch.cat([log_p_s_all.gather(1, indices), log_p_tail], dim=1)
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

    def from_target(self, student_logits: torch.Tensor,
                    target: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
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
        return self.from_samples(student_logits, target["sampled_ids"], target["sampled_weights"],
                                 target["sampled_logp"])


def teacher_argmax(target: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's top class `[B]` from a KD target (`KDLoss.from_target`'s forms): the argmax of its logits or
    log-probabilities, or the first of its top-K (sorted). A `sampled` cache holds no argmax (`DeiTLoss` refuses
    it before training)."""
    if isinstance(target, torch.Tensor):
        return target.argmax(1)
    for key in ("logits", "log_p"):
        if key in target:
            return target[key].argmax(1)
    return target["topk_indices"][:, 0].long()


class DeiTLoss(nn.Module):
    """Touvron et al., "Training data-efficient image transformers & distillation through attention" (ICML 2021).

    A DeiT student has a class token and a distillation token, each with its head. The distillation head learns
    from the teacher; the class head from the labels (the `ce` term, weighted 1 - alpha as beside kd; DeiT's own
    mix is alpha = 0.5). Hard distillation (`deit`, the paper's best): `CE(z_dist, argmax z_teacher)`, the
    teacher's top class on the very view the student sees (here: the replayed, possibly mixed, view). Soft
    (`deit-soft`): `T^2 KL(softmax(z_t / T) || softmax(z_dist / T))`. At evaluation the student averages its two
    heads' logits (timm's distilled ViTs do this in eval mode).
    `forward(dist_logits [B, K], teacher (a KD target, see KDLoss.from_target)) -> []`.
    """

    hard: bool = True

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.kd = KDLoss(temperature)

    def forward(self, dist_logits: torch.Tensor, teacher: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.hard:
            return F.cross_entropy(dist_logits.float(), teacher_argmax(teacher).to(dist_logits.device))
        return self.kd.from_target(dist_logits, teacher)


class SoftDeiTLoss(DeiTLoss):
    """`deit-soft`: DeiT's soft distillation on the distillation head (see DeiTLoss)."""

    hard = False
