"""Which terms are active, with what weight, and which `--pair`s feed each: decided from the registry's
declarations alone (torch-free, like the registry)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from softcache.errors import SoftcacheError
from softcache.losses.registry import FEATURE_LOSSES, MAP_LOSSES, REGISTRY, TOKEN_LOSSES, VECTOR_LOSSES

PAIR_REDUCTIONS = ("sum", "mean")
_PAIR_KINDS = {"vector": "embeddings", "map": "feature maps", "attention": "attention maps", "tokens": "token features"}
# Why a term does not take a kind, where there is a reason beyond "another shape"
_WHY_NOT = {("tokens", "at"): "AT is the spatial energy of [C, H, W] channel maps, and tokens [N, D] have no channels "
                              "over a spatial grid",
            ("tokens", "nst"): "NST's samples are [C, H, W] channel maps over positions, which tokens [N, D] are not"}


def resolve_weights(terms: Sequence[str], *, alpha: float, beta: float, hint_weight: float,
                    overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Weight of every active term. `kd` brings Hinton's mix: kd weighted alpha, hard-label ce weighted 1 - alpha
    (`deit`, `deit-soft` likewise: on the distillation head, ce on the class head).

    Without kd, `ce` (if listed) has weight 1; `at` has beta, `fitnets` hint_weight, the relation terms their
    CRD-benchmark weights (the registry's `weight`); `overrides` win. The order is ce, kd, the terms weighted by
    an option (in the order of the options), then the rest as listed: the order the terms are routed, summed and
    logged in.
    """
    unknown = [t for t in terms if t not in REGISTRY]
    if unknown:
        raise SoftcacheError(f"unknown loss '{unknown[0]}'; valid: {', '.join(sorted(REGISTRY))}")
    weights: dict[str, float] = {}
    if any(REGISTRY[t].weight == "alpha" for t in terms):  # kd, deit: mixed with the hard labels
        weights["ce"] = 1.0 - alpha
        weights.update({"kd": alpha} if "kd" in terms else {})
    elif "ce" in terms:
        weights["ce"] = 1.0
    for option, value in {"alpha": alpha, "beta": beta, "hint_weight": hint_weight}.items():
        weights.update({t: value for t in terms if t not in weights and REGISTRY[t].weight == option})
    weights.update({t: float(REGISTRY[t].weight) for t in terms if t not in weights})
    for term, w in (overrides or {}).items():
        if term not in weights:
            raise SoftcacheError(f"--weight names '{term}', which is not an active term; active: {', '.join(weights)}")
        weights[term] = float(w)
    return weights


WHOLE_OPTIONS = {"warmup": 0, "init_epochs": 0, "k": 1}  # settings that count something: their least value


def resolve_options(weights: Mapping[str, float], items: Sequence[tuple[str, float]]) -> dict[str, dict[str, float]]:
    """`--loss-option TERM.KEY=VALUE` entries -> `{term: {key: value}}`, each naming an active term and one of the
    settings its registry entry declares (`LossSpec.options`)."""
    out: dict[str, dict[str, float]] = {}
    for name, value in items:
        term, _, key = name.partition(".")
        if term not in weights:
            raise SoftcacheError(f"--loss-option {name}={value:g} names '{term}', which is not an active term; "
                                 f"active: {', '.join(weights)}")
        known = REGISTRY[term].options
        if key not in known:
            offered = ", ".join(f"{term}.{k} (default {v:g})" for k, v in known.items()) or "none"
            raise SoftcacheError(f"--loss-option {name}={value:g}: {term} has no setting '{key}'; its settings: "
                                 f"{offered}")
        if key in WHOLE_OPTIONS and (value < WHOLE_OPTIONS[key] or value != int(value)):
            raise SoftcacheError(f"--loss-option {name}={value:g}: {key} must be a whole number >= "
                                 f"{WHOLE_OPTIONS[key]}")
        out.setdefault(term, {})[key] = float(value)
    return out


def split_pair(key: str) -> tuple[str | None, str]:
    """`--pair` student side `TERM:S_LAYER` or `S_LAYER` -> (term or None, student layer)."""
    term, sep, layer = key.partition(":")
    return (term, layer) if sep and term in REGISTRY else (None, key)


def route_pairs(terms: Sequence[str], pairs: Sequence[tuple[str, str]],
                kinds: Mapping[tuple[str, str], str]) -> dict[str, list[tuple[str, str]]]:
    """The (student layer, teacher layer) pairs each active pair-term uses.

    `pairs` are `--pair` entries `(S_LAYER or TERM:S_LAYER, T_LAYER)`; `kinds[(s, t)]` says what a pair holds
    (vector: embeddings; map: feature maps; attention: cached AT maps; tokens: ViT token features). A pair
    without a term serves every active
    term that declares its kind (`LossSpec.takes`: maps feed fitnets, at, sp, nst; embeddings rkd, pkt, crd);
    `TERM:` gives it to that term only. A pair no term uses, and a term left without a pair, are refused.
    """
    active = [t for t in terms if t in FEATURE_LOSSES]
    routes: dict[str, list[tuple[str, str]]] = {t: [] for t in active}
    for key, teacher in pairs:
        term, student = split_pair(key)
        kind = kinds[(student, teacher)]
        what = _PAIR_KINDS[kind]
        if term is not None:
            if term not in active:
                raise SoftcacheError(f"--pair {key}={teacher} names '{term}', which is not a pair loss in --loss "
                                     f"({', '.join(terms)})")
            if kind not in REGISTRY[term].takes:
                why = _WHY_NOT.get((kind, term))
                raise SoftcacheError(f"--pair {key}={teacher} pairs {what}, which {term} cannot use"
                                     + (f": {why}; token features serve {', '.join(TOKEN_LOSSES)}" if why else ""))
            routes[term].append((student, teacher))
            continue
        users = [t for t in active if kind in REGISTRY[t].takes]
        if not users:
            why = next((f" ({w})" for t in active if (w := _WHY_NOT.get((kind, t)))), "")
            raise SoftcacheError(f"--pair {key}={teacher} pairs {what}, which no loss in --loss ({', '.join(terms)}) "
                                 f"uses{why}; embeddings serve {', '.join(VECTOR_LOSSES)}, feature maps "
                                 f"{', '.join(MAP_LOSSES)}, token features {', '.join(TOKEN_LOSSES)}")
        for t in users:
            routes[t].append((student, teacher))
    for term, used in routes.items():
        if len(used) == 1 < REGISTRY[term].min_pairs:
            raise SoftcacheError(f"{term} relates consecutive stages, and has one --pair ({used[0][0]}={used[0][1]}); "
                                 f"give it two or more, shallow to deep (e.g. --pair {term}:layer1=layer1 "
                                 f"--pair {term}:layer2=layer2 --pair {term}:layer3=layer3)")
        if not used:
            vector = "vector" in REGISTRY[term].takes
            example = "embedding=embedding" if vector else "layer3=layer3"
            tokens = " or ViT token features (e.g. blocks.11=blocks.11)" if "tokens" in REGISTRY[term].takes else ""
            raise SoftcacheError(f"{term} needs a --pair of {'embeddings' if vector else 'feature maps'} "
                                 f"(e.g. --pair {example}){tokens}")
    return routes
