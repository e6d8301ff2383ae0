"""Logit terms beyond Hinton's KD (response.py): DKD and DIST; logit standardization and CTKD's learned
temperature, which change how kd (and dkd) read the logits.

Each needs the teacher's whole logit vector (`LossSpec.full_logits`): a `topk` or `sampled` cache is refused
before training (`check_full_logits`). Several cached teachers averaged (`--teachers mean`) give the logits of
their mean distribution at T, `T · log p̄`, exact up to a constant per row, which none of these terms sees.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


def teacher_logits(target: torch.Tensor | Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor | None:
    """The teacher's logits `[B, K]` from a KD target (`KDLoss.from_target`'s forms): stored logits, or `T · log p`
    of an ensemble's mean at T (the same softmax at every temperature up to the constant shift, which softmax,
    DKD, DIST and standardization ignore); None for top-K or sampled targets."""
    if isinstance(target, torch.Tensor):
        return target
    if "logits" in target:
        return target["logits"]
    if "log_p" in target:
        return target["log_p"] * temperature
    return None


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024): `(z − mean(z)) / (std(z) + eps)`
    per sample (std with Bessel's correction, as the reference code's `torch.std`), so the student matches the
    teacher's logit *relations* rather than their scale."""
    z = logits.float()
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + eps)


class DKDLoss(nn.Module):
    """Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022).

    KD split at the target class y. With p = softmax(z / T) of each network, b = (p_y, 1 − p_y) its binary
    target / non-target split and p̂ = softmax over the non-target classes only (z_y removed):
        TCKD = T² · KL(b_t ‖ b_s),   NCKD = T² · KL(p̂_t ‖ p̂_s)   (summed over classes, averaged over the batch)
        loss = alpha · TCKD + beta · NCKD
    mdistiller's CIFAR-100 settings: alpha 1, beta 8 (ResNet-32x4 → 8x4; beta 2 for ResNet-56 → 20), T 4, CE
    weight 1, the term's weight ramped over 20 warm-up epochs. `forward(s [B, K], t [B, K], labels [B]) -> []`.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0):
        super().__init__()
        self.temperature, self.alpha, self.beta = temperature, alpha, beta

    @staticmethod
    def split(logits: torch.Tensor, target: torch.Tensor, t: float | torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log b `[B, 2]`, log p̂ `[B, K]` with −inf at the target class)."""
        log_p = F.log_softmax(logits / t, dim=1)
        log_py = log_p.gather(1, target[:, None])
        log_rest = torch.logsumexp(log_p.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf")),
                                   dim=1, keepdim=True)
        hat = F.log_softmax((logits / t).masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf")), dim=1)
        return torch.cat([log_py, log_rest], dim=1), hat

    @staticmethod
    def kl(log_p: torch.Tensor, log_q: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`sum p (log p − log q)` per row over the entries `keep` (all; p̂: all but the removed target class),
        the others set to 0 before any arithmetic, so no gradient meets their −inf."""
        if keep is not None:
            log_p, log_q = log_p.masked_fill(~keep, 0.0), log_q.masked_fill(~keep, 0.0)
        terms = log_p.exp() * (log_p - log_q)
        return (terms if keep is None else terms * keep).sum(1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float | torch.Tensor | None = None) -> torch.Tensor:
        """`temperature`: a learned one (CTKD) reaches the loss through both sides, as in CTKD's DKD; the
        teacher's logits themselves are constants."""
        t = self.temperature if temperature is None else temperature
        b_s, hat_s = self.split(student_logits.float(), labels, t)
        b_t, hat_t = self.split(teacher_logits.float().detach(), labels, t)
        others = ~F.one_hot(labels, student_logits.shape[1]).bool()
        tckd, nckd = self.kl(b_t, b_s).mean(), self.kl(hat_t, hat_s, others).mean()
        return (self.alpha * tckd + self.beta * nckd) * t * t


def pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`1 − ρ(a_i, b_i)` per row `[B]`: one minus the Pearson correlation, the cosine of the mean-centred rows
    (eps added to the product of their norms, as the reference code does)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DISTLoss(nn.Module):
    """Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022).

    With y = softmax(z / tau) `[B, K]` of each network, Pearson distances of the predictions:
        inter = tau² · mean_i (1 − ρ(y_s[i, :], y_t[i, :]))   (each sample's class scores)
        intra = tau² · mean_k (1 − ρ(y_s[:, k], y_t[:, k]))   (each class's scores over the batch)
        loss = beta · inter + gamma · intra
    The official CIFAR-100 setting (`dist_t4`): tau 4, beta 1, gamma 1, the term weighted 2 beside CE weight 1.
    The intra term depends on the whole batch. `forward(s [B, K], t [B, K], labels [B]) -> []` (labels unused).
    """

    def __init__(self, tau: float = 4.0, beta: float = 1.0, gamma: float = 1.0):
        super().__init__()
        self.tau, self.beta, self.gamma = tau, beta, gamma

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        y_s = F.softmax(student_logits.float() / self.tau, dim=1)
        y_t = F.softmax(teacher_logits.float() / self.tau, dim=1).detach()
        inter, intra = pearson_distance(y_s, y_t).mean(), pearson_distance(y_s.t(), y_t.t()).mean()
        return self.tau ** 2 * (self.beta * inter + self.gamma * intra)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


class LearnedTemperature(nn.Module):
    """Li et al., "Curriculum Temperature for Knowledge Distillation" (CTKD, AAAI 2023), its global temperature.

    One parameter θ (initialised to 1), trained with the student (same optimizer, weight decay included, as the
    reference) but adversarially: a gradient-reversal layer scales its gradient by −λ, so the temperature moves
    to make distillation *harder*. λ follows the cosine curriculum from 0 to 1 over the first `ramp` epochs,
    set once per epoch, epochs counted from 1: `λ_e = (1 − cos(π · min(e, ramp) / ramp)) / 2`.
    `T = t_min + t_range · σ(θ)` (1 + 20 σ(θ), so T starts at 15.62 and stays in (1, 21)).
    `forward() -> T []`; `set_epoch(epoch)` (0-based) sets λ.
    """

    def __init__(self, init: float = 1.0, t_min: float = 1.0, t_range: float = 20.0, ramp: int = 10):
        super().__init__()
        self.theta = nn.Parameter(torch.full((), float(init)))
        self.t_min, self.t_range, self.ramp = t_min, t_range, ramp
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.lam = (1 - math.cos(math.pi * min(epoch + 1, self.ramp) / max(1, self.ramp))) / 2

    def forward(self) -> torch.Tensor:
        return self.t_min + self.t_range * torch.sigmoid(_ReverseGradient.apply(self.theta, self.lam))


def _softmax_gram(logits: torch.Tensor, t: float, classes: bool) -> torch.Tensor:
    """`PᵀP` `[K, K]` (class level) or `PPᵀ` `[B, B]` (batch level) of P = softmax(z / t)."""
    p = F.softmax(logits.float() / t, dim=1)
    return p.t() @ p if classes else p @ p.t()


class MLKDLoss(nn.Module):
    """Jin et al., "Multi-Level Logit Distillation" (CVPR 2023), as its reference code computes it.

    Each sample comes as a weak and a strong view (two view streams of one cache, `--strong-stream`): the student
    and the cached teacher logits of both. With the temperatures 𝒯 = {T, 3, 5, 2, 6} (T the KD temperature, 4):
        instance  kd_τ(a, b) = τ² · mean_i KL(softmax(b_i / τ) ‖ softmax(a_i / τ))
        class     cc_τ(a, b) = ‖G_t − G_s‖²_F / K,  G = PᵀP of P = softmax(z / τ)   [K, K]
        batch     bc_τ(a, b) = ‖G_t − G_s‖²_F / B,  G = PPᵀ                        [B, B]
    and the reference's confidence masks (samples whose teacher confidence on the weak view is at most the
    batch median; classes whose summed probability is at most their median), which multiply terms already
    averaged and so act as their kept fractions m and m_c (about 1/2):
        loss = sum_τ [m kd_τ(s_w, t_w) + m_c cc_τ(s_w, t_w) + m bc_τ(s_w, t_w)]
               + sum_{τ in T, 3, 5} kd_τ(s_s, t_s) + sum_{τ in 2, 6} kd_τ(s_w, t_w)
    (the reference's strong-view sum takes the weak views at τ = 2 and 6, and leaves its strong-view class and
    batch terms out of the loss; both kept here, so the numbers are the published code's). The term is weighted
    alpha (0.9, its KD weight) beside ce weight 1 − alpha on both views, CE(s_w, y) + CE(s_s, y).
    `forward(s_w [B, K], t_w [B, K], s_s [B, K], t_s [B, K]) -> []`.
    """

    TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # besides T, in the reference's order

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    @staticmethod
    def kd(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
        log_p = F.log_softmax(a.float() / t, dim=1)
        q = F.softmax(b.float() / t, dim=1)
        return F.kl_div(log_p, q, reduction="none").sum(1).mean() * t * t

    @staticmethod
    def gram_distance(a: torch.Tensor, b: torch.Tensor, t: float, classes: bool) -> torch.Tensor:
        diff = _softmax_gram(b, t, classes).detach() - _softmax_gram(a, t, classes)
        return diff.pow(2).sum() / (a.shape[1] if classes else a.shape[0])

    @staticmethod
    def masks(teacher_weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept fractions of samples and of classes (the reference's `np.percentile(·, 50)` thresholds,
        `torch.quantile`'s linear interpolation being the same)."""
        p = F.softmax(teacher_weak.float(), dim=1)
        confidence, per_class = p.max(1).values, p.sum(0)
        return ((confidence <= torch.quantile(confidence, 0.5)).float().mean(),
                (per_class <= torch.quantile(per_class, 0.5)).float().mean())

    def forward(self, s_w: torch.Tensor, t_w: torch.Tensor, s_s: torch.Tensor, t_s: torch.Tensor) -> torch.Tensor:
        temps = (self.temperature, *self.TEMPERATURES)
        t_w, t_s = t_w.detach(), t_s.detach()
        m, m_c = self.masks(t_w)
        total = sum(m * self.kd(s_w, t_w, t) + m_c * self.gram_distance(s_w, t_w, t, True)
                    + m * self.gram_distance(s_w, t_w, t, False) for t in temps)
        total = total + sum(self.kd(s_s, t_s, t) for t in temps[:3]) + sum(self.kd(s_w, t_w, t) for t in temps[3:])
        return total
