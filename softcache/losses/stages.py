"""Terms over a network's stages (`LossSpec.joint`): each takes all of its `--pair`s at once, in the order given,
shallow to deep: FSP and KDSVD relate stage k to stage k + 1 in each network; ReviewKD fuses them deep to shallow;
AB and OFD weight the deeper stages more.
`forward(student_features [s_1, ..., s_n], teacher_features [t_1, ..., t_n]) -> []`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from softcache.losses.features import match_spatial


class FSPLoss(nn.Module):
    """Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer
    Learning" (CVPR 2017).

    The "flow of solution procedure" between stages k and k + 1 of each network: `G_k[i, j] = mean over positions
    of f_{k+1}[i] · f_k[j]` `[C_{k+1}, C_k]` (the larger map average-pooled to the smaller), and the loss is
    `sum_k mean((G_k^s − G_k^t)²)`. Student and teacher stages must have equal channel counts (RepDistiller
    refuses others too). RepDistiller trains it alone for 30 initialisation epochs, then the student trains on
    the task loss only (`init_epochs`, softcache.train).
    """

    @staticmethod
    def flows(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for bottom, top in pairwise(features):
            bottom, top = match_spatial(bottom.float(), top.float())
            out.append(torch.einsum("bjhw,bihw->bij", bottom, top) / (bottom.shape[-1] * bottom.shape[-2]))
        return out

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum((s - t.detach()).pow(2).mean() for s, t in zip(self.flows(student), self.flows(teacher)))


class KDSVDLoss(nn.Module):
    """Lee et al., "Self-supervised Knowledge Distillation Using Singular Value Decomposition" (ECCV 2018), as
    RepDistiller computes it.

    Each stage's map `[B, C, H, W]`, viewed as `[B, HW, C]`, is decomposed; its first right singular vectors
    (over channels; the teacher's first k, the student's first k + 3, each L2-normalised, non-finite values set
    to 0) are kept, each student set aligned to the teacher's (for each teacher vector, the student vector of
    largest |cosine|, sign-corrected) and both scaled by the teacher's normalised singular values. Between
    consecutive stages, `R_k = exp(−(v_{k+1}[:, :, None] − v_k[:, None, :])² / 8)` `[B, C_{k+1}, C_k, k]`, and
    the loss is `sum_k ‖R_k^s − R_k^t‖² / B` (non-finite entries set to 0). Student and teacher stages must have
    equal channel counts. Weight 1 (mdistiller).
    """

    def __init__(self, k: int = 1):
        super().__init__()
        self.k = int(k)

    @staticmethod
    def vectors(feature: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(singular values `[B, n]`, right singular vectors `[B, C, n]`), both normalised."""
        b, c, h, w = feature.shape
        x = feature.float().reshape(b, c, h * w).transpose(1, 2)
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # as the reference zeroes non-finite vectors
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.transpose(1, 2)
        s, v = (torch.where(torch.isfinite(a), a, torch.zeros_like(a)) for a in (s, v))
        return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)

    @staticmethod
    def align(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The student's vectors `[B, C, m]` picked and signed to match each teacher vector `[B, C, k]`."""
        cosine = student.transpose(1, 2) @ teacher                        # [B, m, k]
        best = cosine.abs().amax(1, keepdim=True)
        pick = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
        return student @ pick                                              # [B, C, k]

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        total, previous = 0.0, None
        for f_s, f_t in zip(student, teacher):
            s_t, v_t = self.vectors(f_t.detach(), self.k)
            _, v_s = self.vectors(f_s, self.k + 3)
            v_s = self.align(v_s, v_t)
            v_t, v_s = v_t * s_t[:, None], v_s * s_t[:, None]
            if previous is not None:
                r_s = torch.exp(-(v_s[:, :, None] - previous[0][:, None]).pow(2) / 8)
                r_t = torch.exp(-(v_t[:, :, None] - previous[1][:, None]).pow(2) / 8)
                d = (r_s - r_t.detach()).pow(2)
                total = total + torch.where(torch.isfinite(d), d, torch.zeros_like(d)).sum() / len(f_s)
            previous = (v_s, v_t)
        return total


def _as_map(feature: torch.Tensor) -> torch.Tensor:
    """An embedding `[B, D]` as a `[B, D, 1, 1]` map; maps unchanged."""
    return feature[:, :, None, None] if feature.dim() == 2 else feature


class AttentionFusion(nn.Module):
    """ReviewKD's ABF: a 1x1 conv + BN of this stage's student map, fused with the deeper stage's result by two
    attention maps (a 1x1 conv of both to 2 channels, sigmoid) unless it is the deepest, resized (nearest) to the
    teacher's size, then a 3x3 conv + BN to the teacher's width. `forward(x, deeper or None, out_size) ->
    (output [B, Ct, Ht, Wt], the fused map passed on)`."""

    def __init__(self, student_channels: int, mid: int, teacher_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(student_channels, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, teacher_channels, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(teacher_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None,
                out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        x = self.conv1(x)
        if self.att_conv is not None:
            deeper = F.interpolate(deeper, size, mode="nearest")
            z = self.att_conv(torch.cat([x, deeper], dim=1))
            x = x * z[:, :1] + deeper * z[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def hierarchical_context_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """ReviewKD's HCL on one level: the MSE, plus the MSEs of both maps average-pooled to 4x4, 2x2 and 1x1 (the
    sizes smaller than the map) weighted 1/2, 1/4, 1/8, the sum divided by the weights' sum."""
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= student.shape[-1]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


class ReviewKDLoss(nn.Module):
    """Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021), as mdistiller runs it.

    The pairs, shallow to deep, end with the embedding (e.g. layer1..3 = layer1..3.pre_relu, embedding =
    embedding): the student's stage outputs (after their ReLU) and pooled embedding; the teacher's stages before
    their final ReLU and its embedding (embeddings as 1x1 maps). Deepest first, each student level passes an
    `AttentionFusion` that fuses it with the deeper levels' result (the review), giving a map of the teacher's
    shape at that level; the loss is `sum over levels of hierarchical_context_loss(output, teacher)`. The fusion
    width is `min(512, the deepest student width)`. mdistiller's CIFAR-100 settings: CE weight 1, the term
    weighted 5 for ResNet-32x4 → 8x4 (ReviewKD's own 0.6 for ResNet-56 → 20; cfg default 1), ramped over 20
    warm-up epochs. The fusion modules train with the student. `forward([s_1..s_n], [t_1..t_n]) -> []`.
    """

    def __init__(self, channels: Sequence[tuple[int, int]], max_mid: float = 512):
        super().__init__()
        mid = min(int(max_mid), channels[-1][0])
        self.fusions = nn.ModuleList(AttentionFusion(cs, mid, ct, fuse=k < len(channels) - 1)
                                     for k, (cs, ct) in enumerate(channels))

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        student, teacher = [_as_map(f) for f in student], [_as_map(f).float() for f in teacher]
        deeper, total = None, 0.0
        for k in reversed(range(len(student))):
            out, deeper = self.fusions[k](student[k], deeper, teacher[k].shape[-2:])
            total = total + hierarchical_context_loss(out.float(), teacher[k])
        return total


class ABLoss(nn.Module):
    """Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons" (AAAI
    2019), as RepDistiller runs it.

    On pre-ReLU maps (`LAYER.pre_relu` on both sides), a connector per stage (identity where the widths match,
    else a 1x1 conv + BN to the teacher's; RepDistiller's strided convs for other sizes are average pooling
    here) and the alternative L2 of the activation boundaries, margin m = 1:
        d = (s + m)² · [s > −m and t ≤ 0] + (s − m)² · [s ≤ m and t > 0]
    summed over elements, divided by B, scaled by 3 / 1000 and by 2^(k − n + 1) for stage k of n (the deepest
    counts most). RepDistiller trains it alone for 30 initialisation epochs (the connectors and the student's
    layers), after which the student trains on the task loss only (`init_epochs`).
    """

    def __init__(self, channels: Sequence[tuple[int, int]], margin: float = 1.0):
        super().__init__()
        self.margin = margin
        self.connectors = nn.ModuleList(nn.Identity() if cs == ct else
                                        nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
                                        for cs, ct in channels)

    def boundary(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        m = self.margin
        return ((source + m).pow(2) * ((source > -m) & (target <= 0)) +
                (source - m).pow(2) * ((source <= m) & (target > 0))).sum()

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        n, total = len(student), 0.0
        for k, (connector, s, t) in enumerate(zip(self.connectors, student, teacher)):
            s, t = match_spatial(connector(s).float(), t.float())
            total = total + 2.0 ** (k - n + 1) * self.boundary(s, t) / len(s) * 3 / 1000
        return total


def ofd_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """OFD's margin per channel `[C]`: the mean of the negative responses of a Gaussian N(β, γ²) (the BatchNorm
    before the ReLU, γ its weight, β its bias), `β − |γ| φ(β / |γ|) / Φ(−β / |γ|)`, or −3|γ| where Φ(−β / |γ|)
    ≤ 0.001 (mdistiller's rule)."""
    out = []
    for g, b in zip(weight.double().tolist(), bias.double().tolist()):
        s = abs(g)
        cdf = 0.5 * (1 + math.erf(-b / s / math.sqrt(2))) if s > 0 else 0.0
        out.append(b - s * math.exp(-(b / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf if cdf > 0.001 else -3 * s)
    return torch.tensor(out, dtype=torch.float32)


class OFDLoss(nn.Module):
    """Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019), as mdistiller runs it.

    On pre-ReLU stages (`LAYER.pre_relu` on both sides, shallow to deep), a connector per stage (1x1 conv + BN
    to the teacher's width, conv weights N(0, 2 / Ct)) and the partial L2 with the teacher's margin m per channel
    (`ofd_margin` of the BatchNorm before the teacher's ReLU, stored once in the cache with the layer):
        d = (s − m)² · [s > m and t ≤ m] + (s − t)² · [s > t and m < t ≤ 0] + (s − t)² · [t > 0]
    averaged over the batch and summed over channels and positions, the teacher map average-pooled to the
    student's size, stage k of n weighted 1 / 2^(n − 1 − k). mdistiller's CIFAR-100 weight: 0.001 beside CE 1.
    (mdistiller leaves its teacher in train mode during OFD; the cache holds the eval-mode teacher's maps.)
    """

    def __init__(self, channels: Sequence[tuple[int, int]], margins: Sequence[torch.Tensor]):
        super().__init__()
        self.connectors = nn.ModuleList()
        for cs, ct in channels:
            conv = nn.Conv2d(cs, ct, 1, bias=False)
            nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / ct))
            self.connectors.append(nn.Sequential(conv, nn.BatchNorm2d(ct)))
        for k, margin in enumerate(margins):
            self.register_buffer(f"margin{k}", margin.float().view(1, -1, 1, 1))

    @staticmethod
    def partial_l2(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        d = ((s - m).pow(2) * ((s > m) & (t <= m)) + (s - t).pow(2) * ((s > t) & (t > m) & (t <= 0))
             + (s - t).pow(2) * (t > 0))
        return d.abs().mean(0).sum()

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        n, total = len(student), 0.0
        for k, (connector, s, t) in enumerate(zip(self.connectors, student, teacher)):
            s = connector(s).float()
            t = F.adaptive_avg_pool2d(t.float(), s.shape[-2:]).detach()
            total = total + self.partial_l2(s, t, getattr(self, f"margin{k}")) / 2 ** (n - 1 - k)
        return total
