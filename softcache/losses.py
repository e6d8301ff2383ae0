"""Distillation losses as small modules with explicit tensor contracts.

Each term returns an unweighted scalar; `DistillLoss` applies the weights and returns every weighted term by
name plus their sum under 'loss', so logs show each term.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softcache import distributed
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


class NSTLoss(nn.Module):
    """Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (2017).

    Each channel's map, flattened and L2-normalised over positions, is a sample of that network's neuron
    selectivity distribution; the loss is the squared MMD with the polynomial kernel k(a, b) = (a . b)^2:
        mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{j,i} k(s_j, t_i)
    per sample, averaged over the batch (channel counts may differ; the larger spatial size is average-pooled
    to the smaller). Weight 50 in the CRD benchmark. `forward(s [B, Cs, H, W], t [B, Ct, H', W']) -> []`.
    """

    @staticmethod
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2)   # [B, Ca, Cb]

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(student.float(), teacher.float())
        s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2).detach()
        return self.kernel(t, t).mean() + self.kernel(s, s).mean() - 2 * self.kernel(s, t).mean()


class CRDLoss(nn.Module):
    """Tian et al., "Contrastive Representation Distillation" (ICLR 2020), with its NCE estimate and memories.

    Heads: `g_s`, `g_t` = Linear(D -> 128) then L2 normalisation, for the student's and the teacher's embedding
    (both heads train with the student). Memories `M_s`, `M_t` `[N, 128]` hold one unit vector per training
    sample (initialised uniform in +-1/sqrt(128/3)). For anchor i with positive index i and K = 16384 negatives
    j_1..j_K drawn uniformly, with replacement, from the samples of other classes (CRD's 'exact' mode):
        h_t(i, j) = exp(<M_s[j], g_t(t_i)> / tau) / Z_t,   h_s(i, j) = exp(<M_t[j], g_s(s_i)> / tau) / Z_s
    tau = 0.07; each Z is fixed on the first batch to N times the mean of its exp terms; then, with P_n = 1/N,
        NCE(h) = -1/B sum_i [ log(h(i, i) / (h(i, i) + K P_n)) + sum_k log(K P_n / (h(i, j_k) + K P_n)) ]
        loss = NCE(h_s) + NCE(h_t)
    (eps 1e-7 in each denominator), after which each sample's memory rows move to normalize(m M[i] + (1 - m) g(.))
    with momentum m = 0.5. Weight 0.8 in the CRD benchmark.

    From a cache: the teacher's side is its cached embedding of the replayed view, the input the teacher head
    sees online (stored as float16: ~1e-3 relative rounding). Heads, memories and Z train and update exactly
    as online, in the same batch order. Where it differs from RepDistiller: the negatives are drawn by a
    generator seeded with (seed, step) instead of NumPy's global state in DataLoader workers (same
    distribution, and reproducible across resumes); the memories, Z and the step count live in this module's
    state (saved with the run's checkpoint). `forward(s [B, Ds], t [B, Dt], index [B], labels [B]) -> []`.
    """

    def __init__(self, student_dim: int, teacher_dim: int, labels: Sequence[int], *, dim: int = 128,
                 negatives: int = 16384, temperature: float = 0.07, momentum: float = 0.5, seed: int = 0):
        super().__init__()
        self.negatives, self.temperature, self.momentum, self.seed = negatives, temperature, momentum, seed
        self.head_s, self.head_t = nn.Linear(student_dim, dim), nn.Linear(teacher_dim, dim)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        n = len(labels)
        order = torch.argsort(labels, stable=True)              # samples grouped by class ...
        counts = torch.bincount(labels)
        self.register_buffer("by_class", order, persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        bound = 1.0 / math.sqrt(dim / 3)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("memory_s", (torch.rand(n, dim, generator=g) * 2 - 1) * bound)
        self.register_buffer("memory_t", (torch.rand(n, dim, generator=g) * 2 - 1) * bound)
        self.register_buffer("z", torch.full((2,), -1.0))      # Z_s, Z_t; negative until the first batch
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._step: int | None = None        # the step count as a Python int (no device sync per step)
        self._z_set = False

    def draw(self, labels: torch.Tensor) -> torch.Tensor:
        """K negatives per anchor `[B, K]`, uniform over the samples of the other classes (u in [0, N - n_c)
        skips class c's block of the class-sorted order), drawn on the labels' device from (seed, step)."""
        if self._step is None:  # once per process: the buffer carries the count across a resume
            self._step = int(self.step)
        g = torch.Generator(device=labels.device).manual_seed(self.seed * 1_000_003 + self._step)
        count, start = self.class_count[labels][:, None], self.class_start[labels][:, None]
        u = (torch.rand(len(labels), self.negatives, generator=g, device=labels.device)
             * (len(self.by_class) - count)).long()
        return self.by_class[torch.where(u >= start, u + count, u)]

    def nce(self, scores: torch.Tensor) -> torch.Tensor:
        n, eps = len(self.memory_s), 1e-7
        noise = self.negatives / n
        positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
        negative = torch.log(noise / (scores[:, 1:] + noise + eps))
        return -(positive.sum() + negative.sum()) / len(scores)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(student.device.type, enabled=False):
            v_s = F.normalize(self.head_s(_flat(student)), dim=1)
            v_t = F.normalize(self.head_t(_flat(teacher)), dim=1)
            index, labels = index.to(self.memory_s.device), labels.to(self.memory_s.device)
            rows = torch.cat([index[:, None], self.draw(labels)], dim=1)   # [B, 1 + K]: the positive first
            exp_t = torch.exp(torch.bmm(self.memory_s[rows], v_t[:, :, None])[:, :, 0] / self.temperature)
            exp_s = torch.exp(torch.bmm(self.memory_t[rows], v_s[:, :, None])[:, :, 0] / self.temperature)
            world = distributed.current()  # under torchrun: Z and the memories from the global batch
            if not self._z_set and not bool((self.z > 0).all()):  # fixed once, on the first batch, as the original
                n = len(self.memory_s)
                means = distributed.all_gather(torch.stack([exp_s.mean(), exp_t.mean()]).detach()[None], world)
                self.z.copy_(means.mean(0) * n)
            self._z_set = True
            loss = self.nce(exp_s / self.z[0]) + self.nce(exp_t / self.z[1])
            with torch.no_grad():
                m = self.momentum
                index = distributed.all_gather(index, world)
                v_s, v_t = distributed.all_gather(v_s.detach(), world), distributed.all_gather(v_t.detach(), world)
                self.memory_s[index] = F.normalize(self.memory_s[index] * m + v_s * (1 - m), dim=1)
                self.memory_t[index] = F.normalize(self.memory_t[index] * m + v_t * (1 - m), dim=1)
                self.step += 1
                self._step += 1
        return loss


LOSSES = {"ce": CELoss, "kd": KDLoss, "fitnets": FitNetsLoss, "at": ATLoss, "rkd": RKDLoss, "pkt": PKTLoss,
          "sp": SPLoss, "nst": NSTLoss, "crd": CRDLoss}
MAP_LOSSES = ("fitnets", "at", "sp", "nst")   # pair feature maps [B, C, H, W] (at also takes attention maps)
VECTOR_LOSSES = ("rkd", "pkt", "crd")         # pair embeddings [B, D]
FEATURE_LOSSES = MAP_LOSSES + VECTOR_LOSSES   # every term that needs --pair
TRAINED_HEADS = ("fitnets", "crd")            # terms with modules of their own, one per pair
DEFAULT_WEIGHTS = {"rkd": 1.0, "pkt": 30000.0, "sp": 3000.0, "nst": 50.0, "crd": 0.8}  # CRD benchmark


def resolve_weights(terms: Sequence[str], *, alpha: float, beta: float, hint_weight: float,
                    overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Weight of every active term. `kd` brings Hinton's mix: kd weighted alpha, hard-label ce weighted 1 - alpha.

    Without kd, `ce` (if listed) has weight 1; `at` has beta, `fitnets` hint_weight, the relation terms their
    CRD-benchmark weights (DEFAULT_WEIGHTS); `overrides` win.
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
    weights.update({t: DEFAULT_WEIGHTS[t] for t in terms if t in DEFAULT_WEIGHTS})
    for term, w in (overrides or {}).items():
        if term not in weights:
            raise SoftcacheError(f"--weight names '{term}', which is not an active term; active: {', '.join(weights)}")
        weights[term] = float(w)
    return weights


def split_pair(key: str) -> tuple[str | None, str]:
    """`--pair` student side `TERM:S_LAYER` or `S_LAYER` -> (term or None, student layer)."""
    term, sep, layer = key.partition(":")
    return (term, layer) if sep and term in LOSSES else (None, key)


def _fits(term: str, kind: str) -> bool:
    """Whether a pair of `kind` (vector: embeddings; map: feature maps; attention: cached AT maps) serves `term`."""
    if term in VECTOR_LOSSES:
        return kind == "vector"
    return kind == "map" or (term == "at" and kind == "attention")


def route_pairs(terms: Sequence[str], pairs: Sequence[tuple[str, str]],
                kinds: Mapping[tuple[str, str], str]) -> dict[str, list[tuple[str, str]]]:
    """The (student layer, teacher layer) pairs each active pair-term uses.

    `pairs` are `--pair` entries `(S_LAYER or TERM:S_LAYER, T_LAYER)`; `kinds[(s, t)]` says what a pair holds.
    A pair without a term serves every active term it fits (maps: fitnets, at, sp, nst; embeddings: rkd,
    pkt); `TERM:` gives it to that term only. A pair no term uses, and a term left without a pair, are refused.
    """
    active = [t for t in terms if t in FEATURE_LOSSES]
    routes: dict[str, list[tuple[str, str]]] = {t: [] for t in active}
    for key, teacher in pairs:
        term, student = split_pair(key)
        kind = kinds[(student, teacher)]
        what = {"vector": "embeddings", "map": "feature maps", "attention": "attention maps"}[kind]
        if term is not None:
            if term not in active:
                raise SoftcacheError(f"--pair {key}={teacher} names '{term}', which is not a pair loss in --loss "
                                     f"({', '.join(terms)})")
            if not _fits(term, kind):
                raise SoftcacheError(f"--pair {key}={teacher} pairs {what}, which {term} cannot use")
            routes[term].append((student, teacher))
            continue
        users = [t for t in active if _fits(t, kind)]
        if not users:
            raise SoftcacheError(f"--pair {key}={teacher} pairs {what}, which no loss in --loss ({', '.join(terms)}) "
                                 f"uses; embeddings serve {', '.join(VECTOR_LOSSES)}, feature maps "
                                 f"{', '.join(MAP_LOSSES)}")
        for t in users:
            routes[t].append((student, teacher))
    for term, used in routes.items():
        if not used:
            example = "embedding=embedding" if term in VECTOR_LOSSES else "layer3=layer3"
            need = "embeddings" if term in VECTOR_LOSSES else "feature maps"
            raise SoftcacheError(f"{term} needs a --pair of {need} (e.g. --pair {example})")
    return routes


PAIR_REDUCTIONS = ("sum", "mean")


class DistillLoss(nn.Module):
    """All active terms of a student's objective.

    `routes` maps each pair-term to its (student layer, teacher layer) pairs (`route_pairs`); a term over
    several pairs is their sum (`reduce='sum'`, as RepDistiller sums AT over layer groups) or their mean.
    `channels[(s, t)]` gives `(student C, teacher C)` per pair (FitNets sizes its regressors from them; they
    train with the student).
    `forward(logits [B, K], labels [B], student_features {s_layer: [B, C, H, W] or [B, D]}, teacher (a KD
    target, see KDLoss.from_target), teacher_features {t_layer: [B, C, H, W], [B, H, W] or [B, D]})
    -> {'loss', term: weighted value ...}`.
    """

    def __init__(self, weights: Mapping[str, float], *, temperature: float = 4.0,
                 routes: Mapping[str, Sequence[tuple[str, str]]] | None = None,
                 channels: Mapping[tuple[str, str], tuple[int, int]] | None = None, reduce: str = "sum",
                 labels: Sequence[int] | None = None, seed: int = 0):
        super().__init__()
        if reduce not in PAIR_REDUCTIONS:
            raise SoftcacheError(f"unknown pair reduction '{reduce}'; valid: {', '.join(PAIR_REDUCTIONS)}")
        self.weights, self.reduce = dict(weights), reduce
        self.routes = {term: list(pairs) for term, pairs in (routes or {}).items()}
        self.ce, self.kd = CELoss(), KDLoss(temperature)
        self.terms = nn.ModuleDict({t: LOSSES[t]() for t in self.routes if t not in TRAINED_HEADS})
        self.hints = nn.ModuleDict()     # fitnets: one regressor per pair, keyed by the student layer
        for s, t in self.routes.get("fitnets", []):
            key = s.replace(".", "__")
            if key in self.hints:
                raise SoftcacheError(f"fitnets pairs student layer '{s}' twice; give each student layer one hint")
            self.hints[key] = FitNetsLoss(*channels[(s, t)])
        self.contrast = nn.ModuleDict()  # crd: heads and memories per pair (the training set's labels draw negatives)
        for k, (s, t) in enumerate(self.routes.get("crd", [])):
            self.contrast[s.replace(".", "__")] = CRDLoss(*channels[(s, t)], labels, seed=seed + k)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, student_features: Mapping[str, torch.Tensor],
                teacher: Mapping[str, torch.Tensor] | None, teacher_features: Mapping[str, torch.Tensor],
                index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`index [B]`: the batch's sample indices (crd's positives and memory rows)."""
        terms: dict[str, torch.Tensor] = {}
        if "ce" in self.weights:
            terms["ce"] = self.ce(logits, labels)
        if "kd" in self.weights:
            terms["kd"] = self.kd.from_target(logits, teacher)
        for term, pairs in self.routes.items():
            def loss(s: str, t: str, term: str = term) -> torch.Tensor:
                if term == "fitnets":
                    return self.hints[s.replace(".", "__")](student_features[s], teacher_features[t])
                if term == "crd":
                    return self.contrast[s.replace(".", "__")](student_features[s], teacher_features[t], index, labels)
                return self.terms[term](student_features[s], teacher_features[t])
            values = [loss(s, t) for s, t in pairs]
            terms[term] = sum(values) / (len(values) if self.reduce == "mean" else 1)
        out = {name: self.weights[name] * value for name, value in terms.items()}
        out["loss"] = sum(out.values())
        return out
