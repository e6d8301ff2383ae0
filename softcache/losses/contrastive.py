"""Contrastive terms: the student's embedding against the teacher's, with negatives from other samples."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softcache import distributed


class CRDLoss(nn.Module):
    """Tian et al., "Contrastive Representation Distillation" (ICLR 2020), with its NCE estimate and memories.

    Heads: `g_s`, `g_t` = Linear(D -> 128) then L2 normalisation, for the student's and the teacher's embedding
    (both heads train with the student). Memories `M_s`, `M_t` `[N, 128]` hold one unit vector per training
    sample (initialised uniform in +-1/sqrt(128/3)). For anchor i with positive index i and K = 16384 negatives
    j_1..j_K drawn uniformly from the samples of other classes (CRD's 'exact' mode), all distinct as RepDistiller
    draws them when K <= N - n_c (`draw`):
        h_t(i, j) = exp(<M_s[j], g_t(t_i)> / tau) / Z_t,   h_s(i, j) = exp(<M_t[j], g_s(s_i)> / tau) / Z_s
    tau = 0.07; each Z is fixed on the first batch to N times the mean of its exp terms; then, with P_n = 1/N,
        NCE(h) = -1/B sum_i [ log(h(i, i) / (h(i, i) + K P_n)) + sum_k log(K P_n / (h(i, j_k) + K P_n)) ]
        loss = NCE(h_s) + NCE(h_t)
    (eps 1e-7 in each denominator), after which each sample's memory rows move to normalize(m M[i] + (1 - m) g(.))
    with momentum m = 0.5. Weight 0.8 in the CRD benchmark.

    From a cache: the teacher's side is its cached embedding of the replayed view, the input the teacher head
    sees online (stored as float16: ~1e-3 relative rounding). Heads, memories and Z train and update exactly
    as online, in the same batch order. Where it differs from RepDistiller: the negatives are drawn by a
    generator seeded with (seed, step) instead of NumPy's global state in DataLoader workers (the same
    distribution, a uniform K-subset of the other classes, and reproducible across resumes; with replacement
    beyond the dense bound, see `distinct`); the memories, Z and the step count live in this module's
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
        self.register_buffer("sample_labels", labels, persistent=False)
        self._distinct: bool | None = None
        bound = 1.0 / math.sqrt(dim / 3)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("memory_s", (torch.rand(n, dim, generator=g) * 2 - 1) * bound)
        self.register_buffer("memory_t", (torch.rand(n, dim, generator=g) * 2 - 1) * bound)
        self.register_buffer("z", torch.full((2,), -1.0))      # Z_s, Z_t; negative until the first batch
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._step: int | None = None        # the step count as a Python int (no device sync per step)
        self._z_set = False

    def distinct(self) -> bool:
        """Whether the K negatives of an anchor are distinct: RepDistiller's rule (without replacement when K is at
        most the other classes' N − n_c, for every class), where the memory is small enough for the [B, N] draw
        (`DISTINCT_FACTOR`; beyond it, e.g. ImageNet, with replacement: K = 16,384 of 1.28M repeats 0.6% of its
        draws)."""
        n = len(self.by_class)
        return (self.negatives <= n - int(self.class_count.max())
                and n <= self.DISTINCT_FACTOR * (1 + self.negatives))

    # Distinct draws key every sample ([B, N] uniform numbers and a top-K), against B x K numbers with
    # replacement: 29.5 ms against 8.9 ms per CIFAR-10 batch of 64 on the 2-core CPU (BENCHMARKS.md, "CRD").
    DISTINCT_FACTOR = 16

    def draw(self, labels: torch.Tensor) -> torch.Tensor:
        """K negatives per anchor `[B, K]`, uniform over the samples of the other classes, drawn on the labels'
        device from (seed, step): distinct (the K smallest of N uniform keys, the anchor's class keyed last) where
        `distinct()`, else with replacement (u in [0, N - n_c) skips class c's block of the class-sorted order)."""
        if self._step is None:  # once per process: the buffer carries the count across a resume
            self._step = int(self.step)
        g = torch.Generator(device=labels.device).manual_seed(self.seed * 1_000_003 + self._step)
        if self._distinct is None:
            self._distinct = self.distinct()
        if self._distinct:
            keys = torch.rand(len(labels), len(self.by_class), generator=g, device=labels.device)
            keys.masked_fill_(self.sample_labels[None, :] == labels[:, None], 2.0)
            return keys.topk(self.negatives, dim=1, largest=False, sorted=False).indices
        count, start = self.class_count[labels][:, None], self.class_start[labels][:, None]
        u = (torch.rand(len(labels), self.negatives, generator=g, device=labels.device)
             * (len(self.by_class) - count)).long()
        return self.by_class[torch.where(u >= start, u + count, u)]

    # Dense scores when the memory is at most this many times the rows drawn per anchor (CIFAR: 50,000 rows
    # against 16,385 drawn): one [B, N] product then a gather is 5-6x cheaper per step on CPU than gathering
    # B x (1 + K) memory rows ([64, 16385, 128] floats, 537 MB a memory) for a batched matrix-vector product,
    # which is what RepDistiller does; measured crossover about 40x (BENCHMARKS.md, "CRD").
    DENSE_FACTOR = 16

    def scores(self, memory: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`<memory[rows[b, k]], v[b]>` `[B, 1 + K]`; gradients flow to `v` only (the memory is a buffer)."""
        if len(memory) <= self.DENSE_FACTOR * rows.shape[1]:
            # the clone: autograd keeps the matrix for the backward, and the momentum update writes the memory
            return (v @ memory.clone().t()).gather(1, rows)
        picked = memory.index_select(0, rows.reshape(-1)).view(*rows.shape, memory.shape[1])
        return torch.bmm(picked, v[:, :, None])[:, :, 0]

    def nce(self, scores: torch.Tensor) -> torch.Tensor:
        n, eps = len(self.memory_s), 1e-7
        noise = self.negatives / n
        positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
        negative = torch.log(noise / (scores[:, 1:] + noise + eps))
        return -(positive.sum() + negative.sum()) / len(scores)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(student.device.type, enabled=False):
            v_s = F.normalize(self.head_s(student.float().flatten(1)), dim=1)
            v_t = F.normalize(self.head_t(teacher.float().flatten(1)), dim=1)
            index, labels = index.to(self.memory_s.device), labels.to(self.memory_s.device)
            rows = torch.cat([index[:, None], self.draw(labels)], dim=1)   # [B, 1 + K]: the positive first
            exp_t = torch.exp(self.scores(self.memory_s, v_t, rows) / self.temperature)
            exp_s = torch.exp(self.scores(self.memory_t, v_s, rows) / self.temperature)
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
