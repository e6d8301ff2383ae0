"""Mixup and CutMix per view, as timm's `Mixup` means them in its per-element mode, drawn from (seed, sample, view)
so a view's mix does not depend on the batch it lands in.

A view is mixed with probability `prob`; with both Mixup and CutMix on, CutMix is chosen with probability
`switch_prob`. λ ~ Beta(α, α) of the chosen method; the partner is a sample drawn uniformly from the whole set,
with one of its views. Mixup blends the two views' pixels, `λ·a + (1 − λ)·b` in float64 rounded half to even
to uint8; CutMix pastes the partner's pixels into a box of area (1 − λ)·S² (timm's `rand_bbox`, clipped to
the image, λ then corrected to the box's real area). The labels are mixed with the same λ:
`λ·y_i + (1 − λ)·y_partner`.

A mix is recorded per view as `views/mix [N, V, 6] int32` (partner sample, partner view, box top, left, height,
width; partner −1 for an unmixed view, a zero box for Mixup), `views/lam [N, V] float32` and the CRC-32 of
the view the teacher got, `views/mixed_crc [N, V] uint32`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softcache.errors import SoftcacheError

NO_MIX = (-1, 0, 0, 0, 0, 0)  # the record of an unmixed view


@dataclass(frozen=True)
class Mix:
    mixup: float | None = None   # Mixup's Beta(α, α); None: off
    cutmix: float | None = None  # CutMix's Beta(α, α); None: off
    prob: float = 1.0            # probability that a view is mixed at all
    switch_prob: float = 0.5     # with both on: probability of CutMix rather than Mixup

    def __post_init__(self) -> None:
        for flag, alpha in (("--mixup", self.mixup), ("--cutmix", self.cutmix)):
            if alpha is not None and not alpha > 0:
                raise SoftcacheError(f"{flag} is the Beta(α, α) parameter: it must be > 0, got {alpha:g} "
                                     f"(leave {flag} out to turn it off)")
        for flag, p in (("--mix-prob", self.prob), ("--mix-switch-prob", self.switch_prob)):
            if not 0 <= p <= 1:
                raise SoftcacheError(f"{flag} is a probability: it must be in [0, 1], got {p:g}")

    @property
    def active(self) -> bool:
        return self.mixup is not None or self.cutmix is not None

    def to_json(self) -> dict[str, Any]:
        return {"mixup": self.mixup, "cutmix": self.cutmix, "prob": self.prob, "switch_prob": self.switch_prob}

    def draw(self, rng: np.random.Generator, *, samples: int, views: int, size: int) -> tuple[tuple[int, ...], float]:
        """One view's mix from `rng`: `((partner, partner view, top, left, height, width), λ)` for views of
        `size x size` pixels, partners among `samples` samples of `views` views each."""
        if not self.active or rng.random() >= self.prob:
            return NO_MIX, 1.0
        cut = self.cutmix is not None and (self.mixup is None or rng.random() < self.switch_prob)
        lam = float(rng.beta(self.cutmix, self.cutmix) if cut else rng.beta(self.mixup, self.mixup))
        partner, partner_view = int(rng.integers(samples)), int(rng.integers(views))
        if not cut:
            return (partner, partner_view, 0, 0, 0, 0), float(np.float32(lam))
        ratio = math.sqrt(1 - lam)
        cut_h, cut_w = int(size * ratio), int(size * ratio)
        cy, cx = int(rng.integers(size)), int(rng.integers(size))
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, size)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, size)
        lam = 1 - (bottom - top) * (right - left) / (size * size)  # corrected to the box's area
        box = (int(top), int(left), int(bottom - top), int(right - left))
        return (partner, partner_view, *box), float(np.float32(lam))


def mix_pixels(view: torch.Tensor, partner: torch.Tensor, record: Any, lam: float) -> torch.Tensor:
    """The mixed view `[3, S, S] uint8` of `view` and `partner` (both `[3, S, S]` uint8) for one mix record."""
    top, left, height, width = (int(x) for x in record[2:6])
    if height and width:  # CutMix
        out = view.clone()
        out[:, top:top + height, left:left + width] = partner[:, top:top + height, left:left + width]
        return out
    lam = float(np.float32(lam))
    return (view.double() * lam + partner.double() * (1 - lam)).round_().to(torch.uint8)
