"""Relation terms: each compares how the batch's samples relate to one another (so its value depends on the
whole batch), on embeddings `[B, D]` (RKD, PKT) or flattened feature maps (SP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1)


def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances `[B, B]` between the rows of `x [B, D]`, zero on the diagonal (finite gradients)."""
    sq = x.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(x), device=x.device, dtype=d.dtype))


class RKDLoss(nn.Module):
    """Park et al., "Relational Knowledge Distillation" (CVPR 2019): distance and angle potentials.

    On embeddings `s [B, Ds]`, `t [B, Dt]` (flattened; the dimensions may differ):
        psi_D(x)_ij  = ||x_i - x_j|| / mu,   mu = mean of ||x_i - x_j|| over the B (B - 1) pairs i != j
        psi_A(x)_ijk = <e_ij, e_kj>,         e_ij = (x_i - x_j) / ||x_i - x_j||   (the cosine of the angle at j)
        loss = w_d * huber(psi_D(s), psi_D(t)) + w_a * huber(psi_A(s), psi_A(t))
    with huber the smooth L1 (delta 1) averaged over all entries, w_d = 25 and w_a = 50 (RepDistiller's CIFAR
    benchmark; the term's own weight then defaults to 1). The value depends on the whole batch.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    @staticmethod
    def distance(x: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(x)
        return d / (d.sum() / max(1, len(x) * (len(x) - 1)))

    @staticmethod
    def angle(x: torch.Tensor) -> torch.Tensor:
        e = F.normalize(x[None, :, :] - x[:, None, :], dim=2)   # e[j, i] = unit(x_i - x_j)
        return torch.bmm(e, e.transpose(1, 2)).flatten()         # [j, i, k] -> <e_ij, e_kj>

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = _flat(student), _flat(teacher)
        with torch.no_grad():
            t_d, t_a = self.distance(t), self.angle(t)
        return (self.distance_weight * F.smooth_l1_loss(self.distance(s), t_d)
                + self.angle_weight * F.smooth_l1_loss(self.angle(s), t_a))


class PKTLoss(nn.Module):
    """Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV 2018).

    Cosine similarities of the L2-normalised embeddings, shifted to [0, 1] and normalised per row into
    conditional probabilities p_{j|i} = K_ij / sum_j K_ij, K_ij = (cos(x_i, x_j) + 1) / 2; the loss is the mean
    over all (i, j) of p^t_{j|i} log((p^t_{j|i} + eps) / (p^s_{j|i} + eps)), eps = 1e-7. Weight 30000 in the
    CRD benchmark. `forward(s [B, Ds], t [B, Dt]) -> []`; the value depends on the whole batch.
    """

    eps = 1e-7

    @classmethod
    def conditional(cls, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(_flat(x), dim=1, eps=cls.eps)
        k = (x @ x.t() + 1) / 2
        return k / k.sum(1, keepdim=True)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        p_s, p_t = self.conditional(student), self.conditional(teacher).detach()
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


class SPLoss(nn.Module):
    """Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019).

    G = normalize_rows(f f^T) for the batch's flattened feature maps f [B, C*H*W] (rows scaled to unit L2
    norm); the loss is ||G_s - G_t||_F^2 / B^2. Student and teacher maps may differ in every size but B.
    Weight 3000 in the CRD benchmark. `forward(s [B, ...], t [B, ...]) -> []`; depends on the whole batch.
    """

    @staticmethod
    def gram(f: torch.Tensor) -> torch.Tensor:
        f = _flat(f)
        return F.normalize(f @ f.t(), dim=1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        diff = self.gram(student) - self.gram(teacher).detach()
        return diff.pow(2).sum() / len(student) ** 2


class CCLoss(nn.Module):
    """Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019), as RepDistiller runs it (the
    authors' code, "restructured"): the student's and the teacher's embeddings each pass a trained linear map to
    128 dimensions (no normalisation); with δ_i = |e_s(i) − e_t(i)|, the loss is
        mean over i = 1 .. B − 1 of sum_d δ_{i−1, d} · δ_{i, d}
    (consecutive samples of the batch, not the paper's full kernel matrix). Weight 0.02 (RepDistiller `-b 0.02`);
    it depends on the batch's order. `forward(s [B, Ds], t [B, Dt]) -> []`.
    """

    def __init__(self, student_dim: int, teacher_dim: int, dim: int = 128):
        super().__init__()
        self.embed_s, self.embed_t = nn.Linear(student_dim, dim), nn.Linear(teacher_dim, dim)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        delta = (self.embed_s(_flat(student)) - self.embed_t(_flat(teacher).to(student.dtype))).abs()
        return (delta[:-1] * delta[1:]).sum(1).mean()
