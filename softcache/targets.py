"""How teacher outputs are stored compactly, and read back as KD targets.

Logits formats (`--logits`):
    fp16, bf16, fp32   the full logits `[N, V, C]` (bf16 is stored as its uint16 bit pattern)
    topk:K             the K largest logits and their class ids, plus the log of the tail's softmax mass at
                       each temperature of TOPK_TEMPERATURES; the KD loss then compares the teacher and the
                       student over K + 1 buckets (the top K classes and the merged tail), which keeps the
                       tail's total probability exact and drops only how it spreads over the tail classes
    sampled:K[:TAU]    Sparse Logit Sampling (Anshumann et al., ACL 2025): K classes drawn with replacement
                       from q proportional to p_T^TAU (p_T the teacher's softmax at the dump's temperature),
                       stored with importance weights p_T / (K q) and log p_T, so that the KD loss is an
                       unbiased estimate of the full one (at that temperature only)

Feature targets (`--targets`): `features` stores `[N, V, C, H, W]` per layer; `attention` stores only the
AT map `normalize(mean_c(f^2))` `[N, V, H, W]`, C times smaller, enough for `at` but not for `fitnets`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from softcache.errors import SoftcacheError
from softcache.losses import attention_map
from softcache.names import TARGET_KINDS  # noqa: F401  (the stored forms feature_targets makes; --targets offers them)

TOPK_TEMPERATURES = (1.0, 2.0, 3.0, 4.0, 5.0, 8.0)


@dataclass(frozen=True)
class LogitsFormat:
    """A parsed `--logits` value."""

    kind: str                    # fp16 | bf16 | fp32 | topk | sampled
    k: int = 0                   # topk / sampled: entries per view
    tau: float = 1.0             # sampled: proposal exponent
    temperature: float = 4.0     # sampled: the temperature p_T is taken at

    @classmethod
    def parse(cls, text: str, temperature: float = 4.0) -> LogitsFormat:
        kind, _, rest = text.partition(":")
        if kind in ("fp16", "bf16", "fp32") and not rest:
            return cls(kind)
        try:
            if kind == "topk":
                return cls(kind, k=_positive(rest))
            if kind == "sampled":
                k, _, tau = rest.partition(":")
                if tau and not float(tau) > 0:
                    raise SoftcacheError(f"bad --logits '{text}': "
                                         "the proposal exponent TAU must be > 0 (e.g. sampled:5:1)")
                return cls(kind, k=_positive(k), tau=float(tau) if tau else 1.0, temperature=temperature)
        except ValueError:
            pass
        raise SoftcacheError(f"bad --logits '{text}'; valid: fp16, bf16, fp32, topk:K, sampled:K[:TAU] (e.g. topk:5)")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.kind}
        if self.kind == "topk":
            out.update(k=self.k, temperatures=list(TOPK_TEMPERATURES))
        if self.kind == "sampled":
            out.update(k=self.k, tau=self.tau, temperature=self.temperature)
        return out

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> LogitsFormat:
        return cls(value["format"], k=value.get("k", 0), tau=value.get("tau", 1.0),
                   temperature=value.get("temperature", 4.0))

    def arrays(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-view shape and dtype of each stored array, by suffix under the teacher's logits prefix."""
        ids = "int16" if num_classes <= np.iinfo(np.int16).max else "int32"
        if self.kind in ("fp16", "fp32"):
            return {"": ((num_classes,), "float16" if self.kind == "fp16" else "float32")}
        if self.kind == "bf16":
            return {"": ((num_classes,), "uint16")}
        if self.kind == "topk":
            if self.k > num_classes:
                raise SoftcacheError(f"--logits topk:{self.k} asks for more classes than the {num_classes} there are")
            return {"/topk_values": ((self.k,), "float16"), "/topk_indices": ((self.k,), ids),
                    "/tail_lse": ((len(TOPK_TEMPERATURES),), "float32")}
        return {"/sampled_ids": ((self.k,), ids), "/sampled_weights": ((self.k,), "float32"),
                "/sampled_logp": ((self.k,), "float32")}

    def encode(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
        """Teacher logits `[B, C]` (any float dtype) -> the arrays to store, by suffix, each `[B, ...]`."""
        z = logits.float().cpu()
        if self.kind == "fp16":
            return {"": z.half().numpy()}
        if self.kind == "fp32":
            return {"": z.numpy()}
        if self.kind == "bf16":
            return {"": z.bfloat16().view(torch.int16).numpy().view(np.uint16)}
        if self.kind == "topk":
            values, indices = z.topk(self.k, dim=1)
            tail = torch.ones_like(z, dtype=torch.bool).scatter_(1, indices, False)
            lse = torch.stack([torch.logsumexp((z / t).masked_fill(~tail, float("-inf")), dim=1)
                               for t in TOPK_TEMPERATURES], dim=1)
            return {"/topk_values": values.half().numpy(), "/topk_indices": indices.numpy().astype(self._ids(z)),
                    "/tail_lse": lse.numpy()}
        log_p = F.log_softmax(z / self.temperature, dim=1)
        log_q = F.log_softmax(log_p * self.tau, dim=1)
        ids = torch.multinomial(log_q.exp(), self.k, replacement=True, generator=generator)
        log_p_ids = log_p.gather(1, ids)
        weights = (log_p_ids - log_q.gather(1, ids)).exp() / self.k
        return {"/sampled_ids": ids.numpy().astype(self._ids(z)), "/sampled_weights": weights.numpy(),
                "/sampled_logp": log_p_ids.numpy()}

    @staticmethod
    def _ids(z: torch.Tensor) -> type:
        return np.int16 if z.shape[1] <= np.iinfo(np.int16).max else np.int32

    def decode(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored rows (tensors by suffix, `[B, ...]`; bf16 as 16-bit integers) -> the KD target
        `KDLoss.from_target` takes."""
        if self.kind == "bf16":
            return {"logits": t[""].view(torch.bfloat16).float()}
        if self.kind in ("fp16", "fp32"):
            return {"logits": t[""].float()}
        if self.kind == "topk":
            return {"topk_values": t["/topk_values"].float(), "topk_indices": t["/topk_indices"].long(),
                    "tail_lse": t["/tail_lse"].float()}
        return {"sampled_ids": t["/sampled_ids"].long(), "sampled_weights": t["/sampled_weights"].float(),
                "sampled_logp": t["/sampled_logp"].float()}


def _positive(text: str) -> int:
    k = int(text)
    if k < 1:
        raise ValueError(text)
    return k


POOLED_MAPS = (2, 4)  # --targets attention also stores the maps of the feature average-pooled by these factors


def feature_targets(kind: str, layer: str, feature: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything `--targets kind` stores for one tapped layer, by the name `feature_name` turns into an array:
    `{layer: feature_target(...)}`, plus, for attention maps, `{layer}@k`: the AT map of the feature average-
    pooled by k (k in POOLED_MAPS, where H and W divide by k). A student whose map is k times smaller than the
    teacher's gets exactly the AT of the pooled teacher feature, as it would from stored features; pooling the
    full-size map instead would not be the same."""
    out = {layer: feature_target(kind, feature)}
    if kind == "attention" and feature.dim() == 4:
        b, _, h, w = feature.shape
        for k in POOLED_MAPS:
            if h % k == 0 and w % k == 0 and h // k >= 1:
                pooled = torch.nn.functional.avg_pool2d(feature.float(), k)
                out[f"{layer}@{k}"] = attention_map(pooled).view(b, h // k, w // k).half()
    return out


def feature_target(kind: str, feature: torch.Tensor) -> torch.Tensor:
    """A teacher feature `[B, C, H, W]` -> what `--targets kind` stores, float16 on the feature's device:
    the feature itself, or its AT map `[B, H, W]` (computed where the feature is, so only the map is copied).
    An embedding `[B, D]` is stored as it is under either kind."""
    if kind == "attention" and feature.dim() == 4:
        b, _, h, w = feature.shape
        return attention_map(feature).view(b, h, w).half()
    return feature.half()
