"""Loss formulas against hand computations."""
from __future__ import annotations

import math
from itertools import chain

import pytest
import torch

from softcache.errors import SoftcacheError
from softcache.models import DIST_LOGITS, INPUT_GRADIENT
from softcache.losses import (ATLoss, CRDLoss, DistillLoss, FitNetsLoss, KDLoss, NSTLoss, PKTLoss, RKDLoss, SPLoss,
                              attention_map, resolve_weights, route_pairs)
from softcache.losses.registry import DEFAULT_WEIGHTS, FEATURE_LOSSES, REGISTRY, TRAINED_HEADS


def test_kd_matches_hand_computation_with_t_squared():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    temperature = 4.0
    total = 0.0
    for row_s, row_t in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(x / temperature) for x in row_s)
        zt = sum(math.exp(x / temperature) for x in row_t)
        p_s = [math.exp(x / temperature) / zs for x in row_s]
        p_t = [math.exp(x / temperature) / zt for x in row_t]
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = total / 2 * temperature ** 2
    assert KDLoss(temperature)(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_kd_gradient_vanishes_when_student_equals_teacher():
    t = torch.randn(5, 10)
    s = t.clone().requires_grad_(True)
    loss = KDLoss(4.0)(s, t)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert s.grad.abs().max().item() < 1e-6
    # ... and does not vanish otherwise.
    s2 = (t + torch.randn(5, 10)).requires_grad_(True)
    KDLoss(4.0)(s2, t).backward()
    assert s2.grad.abs().max().item() > 1e-4


def test_attention_map_and_at_loss_match_the_formula():
    f_s = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2) / 10
    f_t = torch.ones(2, 5, 2, 2)
    f_t[:, :, 0, 0] = 3.0
    # by hand: a = mean_c(f^2) per position, divided by its L2 norm over positions
    a_s = (f_s ** 2).mean(1).view(2, 4)
    a_s = a_s / a_s.norm(dim=1, keepdim=True)
    a_t = torch.tensor([[9.0, 1.0, 1.0, 1.0]] * 2)
    a_t = a_t / a_t.norm(dim=1, keepdim=True)
    torch.testing.assert_close(attention_map(f_s), a_s)
    expected = ((a_s - a_t) ** 2).sum() / 8  # mean over batch (2) and positions (4)
    assert ATLoss()(f_s, f_t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert ATLoss()(f_t, f_t * 7).item() == pytest.approx(0.0, abs=1e-12)  # scale invariant


def test_at_pools_to_the_smaller_spatial_size():
    f_s, f_t = torch.rand(2, 4, 8, 8), torch.rand(2, 6, 4, 4)
    pooled = torch.nn.functional.avg_pool2d(f_s, 2)
    assert ATLoss()(f_s, f_t).item() == pytest.approx(ATLoss()(pooled, f_t).item(), rel=1e-6)


def test_fitnets_regressor_reduces_the_hint_loss():
    torch.manual_seed(0)
    f_s = torch.randn(16, 8, 4, 4)
    f_t = torch.relu(torch.einsum("bchw,dc->bdhw", f_s, torch.randn(12, 8)))  # reachable by a 1x1 map
    hint = FitNetsLoss(8, 12)
    opt = torch.optim.SGD(hint.parameters(), lr=0.1, momentum=0.9)
    first = hint(f_s, f_t).item()
    for _ in range(60):
        opt.zero_grad()
        loss = hint(f_s, f_t)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_weights_follow_hinton_and_overrides():
    assert resolve_weights(["kd"], alpha=0.9, beta=1000, hint_weight=100) == pytest.approx({"ce": 0.1, "kd": 0.9})
    assert resolve_weights(["ce", "at"], alpha=0.9, beta=1000, hint_weight=100) == {"ce": 1.0, "at": 1000}
    assert resolve_weights(["kd", "fitnets"], alpha=0.5, beta=1000, hint_weight=100,
                           overrides={"fitnets": 2.0}) == {"ce": 0.5, "kd": 0.5, "fitnets": 2.0}
    with pytest.raises(SoftcacheError, match="not an active term"):
        resolve_weights(["kd"], alpha=0.9, beta=1, hint_weight=1, overrides={"at": 1.0})


def test_distill_loss_sums_weighted_terms():
    torch.manual_seed(0)
    logits, t_logits, labels = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    f_s, f_t = torch.randn(4, 8, 4, 4), torch.randn(4, 16, 4, 4)
    weights = {"ce": 0.1, "kd": 0.9, "at": 1000.0}
    criterion = DistillLoss(weights, temperature=4.0, routes={"at": [("a", "b")]})
    out = criterion(logits, labels, {"a": f_s}, t_logits, {"b": f_t})
    assert out["ce"].item() == pytest.approx(0.1 * torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert out["kd"].item() == pytest.approx(0.9 * KDLoss(4.0)(logits, t_logits).item(), rel=1e-6)
    assert out["at"].item() == pytest.approx(1000 * ATLoss()(f_s, f_t).item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["kd"].item() + out["at"].item(), rel=1e-6)


# --- relation losses, each against its paper's formula written out with Python loops in float64

def _huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _flat(rows):
    """A channel's `[H][W]` values as one list, row by row."""
    return list(chain.from_iterable(rows))


def _rkd_by_hand(s: list, t: list, w_d: float = 25.0, w_a: float = 50.0) -> float:
    n = len(s)

    def dist(x):
        d = [[_norm([a - b for a, b in zip(x[i], x[j])]) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [d[i][j] / mu for i in range(n) for j in range(n)]

    def angle(x):
        out = []
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    e1 = [a - b for a, b in zip(x[i], x[j])]
                    e2 = [a - b for a, b in zip(x[k], x[j])]
                    n1, n2 = _norm(e1), _norm(e2)
                    out.append(0.0 if n1 == 0 or n2 == 0 else sum(a * b for a, b in zip(e1, e2)) / (n1 * n2))
        return out

    loss_d = sum(_huber(a, b) for a, b in zip(dist(s), dist(t))) / (n * n)
    loss_a = sum(_huber(a, b) for a, b in zip(angle(s), angle(t))) / (n ** 3)
    return w_d * loss_d + w_a * loss_a


def _pkt_by_hand(s: list, t: list, eps: float = 1e-7) -> float:
    def cond(x):
        unit = [[v / _norm(row) for v in row] for row in x]
        k = [[(sum(a * b for a, b in zip(u, w)) + 1) / 2 for w in unit] for u in unit]
        return [[v / sum(row) for v in row] for row in k]

    p_s, p_t = cond(s), cond(t)
    n = len(s)
    return sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(n) for j in range(n)) / n ** 2


def _sp_by_hand(s: list, t: list) -> float:
    def gram(x):
        g = [[sum(a * b for a, b in zip(u, w)) for w in x] for u in x]
        return [[v / _norm(row) for v in row] for row in g]

    g_s, g_t = gram(s), gram(t)
    n = len(s)
    return sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(n) for j in range(n)) / n ** 2


def _nst_by_hand(s: torch.Tensor, t: torch.Tensor) -> float:
    total = 0.0
    for fs, ft in zip(s.tolist(), t.tolist()):  # per sample: channels as L2-normalised vectors over positions
        a = [[v / _norm(_flat(ch)) for v in _flat(ch)] for ch in fs]
        b = [[v / _norm(_flat(ch)) for v in _flat(ch)] for ch in ft]

        def k(x, y):
            return sum(sum(p * q for p, q in zip(u, w)) ** 2 for u in x for w in y) / (len(x) * len(y))

        total += k(b, b) + k(a, a) - 2 * k(a, b)
    return total / len(s)


@pytest.fixture
def embeddings():
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)


def test_rkd_matches_distance_and_angle_written_out(embeddings):
    s, t = embeddings
    assert RKDLoss()(s, t).item() == pytest.approx(_rkd_by_hand(s.tolist(), t.tolist()), rel=1e-5)
    scaled = RKDLoss()(s, 3.0 * s[:, :4] + 1.0)  # distances and angles are invariant to scale and shift
    assert scaled.item() == pytest.approx(0.0, abs=1e-6)


def test_pkt_matches_conditional_probabilities_written_out(embeddings):
    s, t = embeddings
    assert PKTLoss()(s, t).item() == pytest.approx(_pkt_by_hand(s.tolist(), t.tolist()), rel=1e-6)
    assert PKTLoss()(s, 2.0 * s).item() == pytest.approx(0.0, abs=1e-9)  # cosines: invariant to scale


def test_sp_matches_the_normalised_batch_gram_written_out():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 5, 3, 3, generator=g)
    assert SPLoss()(s, t).item() == pytest.approx(_sp_by_hand(s.flatten(1).tolist(), t.flatten(1).tolist()), rel=1e-5)
    assert SPLoss()(s, s).item() == 0.0


def test_nst_matches_the_polynomial_mmd_written_out():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 6, 4, 4, generator=g)
    pooled = torch.nn.functional.adaptive_avg_pool2d(t, (2, 2))  # the larger map is pooled to the smaller
    assert NSTLoss()(s, t).item() == pytest.approx(_nst_by_hand(s, pooled), rel=1e-5)
    assert NSTLoss()(s, s).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss, shape_s, shape_t", [(RKDLoss(), (8, 4), (8, 6)), (PKTLoss(), (8, 4), (8, 6)),
                                                   (SPLoss(), (8, 3, 4, 4), (8, 5, 4, 4)),
                                                   (NSTLoss(), (8, 3, 4, 4), (8, 5, 2, 2))])
def test_relation_gradients_are_finite_even_with_a_repeated_sample(loss, shape_s, shape_t):
    s = torch.randn(shape_s)
    s[1] = s[0]  # two identical rows: zero distances, undefined angles
    s.requires_grad_(True)
    loss(s, torch.randn(shape_t)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_pairs_are_routed_to_the_terms_they_fit():
    kinds = {("layer3", "layer3"): "map", ("embedding", "embedding"): "vector", ("layer2", "layer2"): "map"}
    routes = route_pairs(["kd", "at", "sp", "rkd"], [("layer3", "layer3"), ("embedding", "embedding"),
                                                      ("at:layer2", "layer2")], kinds)
    assert routes == {"at": [("layer3", "layer3"), ("layer2", "layer2")], "sp": [("layer3", "layer3")],
                      "rkd": [("embedding", "embedding")]}
    with pytest.raises(SoftcacheError, match=r"pkt needs a --pair of embeddings \(e.g. --pair embedding=embedding\)"):
        route_pairs(["pkt", "at"], [("layer3", "layer3")], kinds)
    with pytest.raises(SoftcacheError, match=r"--pair embedding=embedding pairs embeddings, which no loss in --loss"):
        route_pairs(["at"], [("layer3", "layer3"), ("embedding", "embedding")], kinds)
    with pytest.raises(SoftcacheError, match=r"--pair rkd:layer3=layer3 pairs feature maps, which rkd cannot use"):
        route_pairs(["rkd", "at"], [("rkd:layer3", "layer3"), ("embedding", "embedding")], kinds)
    with pytest.raises(SoftcacheError, match=r"names 'sp', which is not a pair loss in --loss"):
        route_pairs(["at"], [("sp:layer3", "layer3")], kinds)


def test_a_term_over_several_pairs_is_their_sum_or_mean():
    f = {"a": torch.randn(4, 8, 4, 4), "b": torch.randn(4, 8, 2, 2)}
    t = {"a": torch.randn(4, 16, 4, 4), "b": torch.randn(4, 16, 2, 2)}
    logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    routes = {"at": [("a", "a"), ("b", "b")]}
    each = [ATLoss()(f[k], t[k]).item() for k in "ab"]
    total = DistillLoss({"at": 2.0}, routes=routes)(logits, labels, f, None, t)["at"].item()
    mean = DistillLoss({"at": 2.0}, routes=routes, reduce="mean")(logits, labels, f, None, t)["at"].item()
    assert total == pytest.approx(2.0 * sum(each), rel=1e-6) and mean == pytest.approx(sum(each), rel=1e-6)


def _crd_by_hand(crd: CRDLoss, s: torch.Tensor, t: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> float:
    """NCE of Tian et al. written out for one batch, with the memories and draws `rows [B, 1 + K]` given."""
    with torch.no_grad():
        return _crd_sum(crd, s, t, rows)


def _crd_sum(crd: CRDLoss, s: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> float:
    n, k, tau, eps = len(crd.memory_s), rows.shape[1] - 1, crd.temperature, 1e-7
    v_s = [torch.nn.functional.normalize(crd.head_s(s[i]), dim=0) for i in range(len(s))]
    v_t = [torch.nn.functional.normalize(crd.head_t(t[i]), dim=0) for i in range(len(t))]
    e_s = [[math.exp(float(crd.memory_t[j] @ v_s[i]) / tau) for j in rows[i]] for i in range(len(s))]
    e_t = [[math.exp(float(crd.memory_s[j] @ v_t[i]) / tau) for j in rows[i]] for i in range(len(t))]
    total = 0.0
    for scores in (e_s, e_t):
        z = sum(sum(r) for r in scores) / (len(scores) * (k + 1)) * n
        for r in scores:
            h = [x / z for x in r]
            total -= math.log(h[0] / (h[0] + k / n + eps)) + sum(math.log((k / n) / (x + k / n + eps)) for x in h[1:])
    return total / len(s)


@pytest.mark.parametrize("dense", [True, False])  # scores from one [B, N] product, or from gathered rows
def test_crd_matches_nce_written_out_and_updates_its_memories(monkeypatch, dense):
    monkeypatch.setattr(CRDLoss, "DENSE_FACTOR", 16 if dense else 0)
    torch.manual_seed(0)
    labels = torch.arange(40) % 4                      # 40 samples, 4 classes
    crd = CRDLoss(6, 8, labels.tolist(), dim=5, negatives=7, seed=3)
    s, t, index = torch.randn(3, 6), torch.randn(3, 8), torch.tensor([5, 17, 30])
    negatives = crd.draw(labels[index])
    crd._step = None                                   # draw again from the same (seed, step) inside forward
    assert negatives.shape == (3, 7) and (labels[negatives] != labels[index][:, None]).all()  # other classes only
    expected = _crd_by_hand(crd, s, t, index, torch.cat([index[:, None], negatives], dim=1))
    before = crd.memory_s[index].clone()
    loss = crd(s, t, index, labels[index])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    v_s = torch.nn.functional.normalize(crd.head_s(s), dim=1).detach()
    assert torch.allclose(crd.memory_s[index], torch.nn.functional.normalize(0.5 * before + 0.5 * v_s, dim=1))
    assert int(crd.step) == 1 and (crd.z > 0).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in crd.parameters())


def test_crd_dense_and_gathered_scores_give_the_same_loss_and_gradients(monkeypatch):
    torch.manual_seed(0)
    labels = (torch.arange(300) % 10).tolist()
    s, t, index = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 12), torch.arange(0, 80, 10)
    results = []
    for factor in (16, 0):
        monkeypatch.setattr(CRDLoss, "DENSE_FACTOR", factor)
        torch.manual_seed(1)
        crd = CRDLoss(16, 12, labels, negatives=50, seed=2)
        loss = crd(s.float(), t, index, torch.as_tensor(labels)[index])
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in crd.parameters()], crd.memory_s.clone()))
    (dense, dense_grads, dense_memory), (gathered, gathered_grads, gathered_memory) = results
    # the two sum the same float32 products in another order: a few 1e-6 of the largest value; wrong rows or a
    # wrong gradient would differ by the whole value
    assert dense == pytest.approx(gathered, rel=1e-4)
    assert all((a - b).abs().max() <= 1e-3 * b.abs().max() for a, b in zip(dense_grads, gathered_grads))
    assert torch.equal(dense_memory, gathered_memory)  # the memories move by the heads' outputs alone


def test_crd_negatives_are_uniform_over_the_other_classes():
    labels = torch.tensor([0] * 10 + [1] * 30 + [2] * 60)
    crd = CRDLoss(2, 2, labels.tolist(), dim=2, negatives=20000)
    drawn = crd.draw(torch.tensor([1]))[0]
    assert (labels[drawn] != 1).all()
    counts = torch.bincount(drawn, minlength=100).float()
    others = torch.cat([counts[:10], counts[40:]])
    assert others.min() > 0 and (others / others.mean() - 1).abs().max() < 0.2  # 286 per sample expected


# --- the registry: every name the CLI offers is an implemented term fed what its entry declares

_PAIR_INPUTS = {"map": (torch.randn(6, 4, 4, 4), torch.randn(6, 6, 2, 2), (4, 6)),
                "attention": (torch.randn(6, 4, 4, 4), torch.rand(6, 2, 2), (4, 6)),
                "vector": (torch.randn(6, 5), torch.randn(6, 7), (5, 7)),
                "tokens": (torch.randn(6, 17, 5), torch.randn(6, 5, 7), (5, 7))}  # 1 + 4x4 and 1 + 2x2 tokens


def test_the_registry_names_the_implementations_and_the_cli_offers_its_names():
    from torch import nn

    from softcache import names
    from softcache.losses import LOSSES
    assert names.LOSS_NAMES == tuple(REGISTRY) == tuple(LOSSES)
    for name, spec in REGISTRY.items():
        cls = spec.load()
        assert isinstance(cls, type) and issubclass(cls, nn.Module), name
        assert LOSSES[name] is cls and spec.impl == f"{cls.__module__}:{cls.__name__}", name
        assert spec.help and "\n" not in spec.help, name
        assert spec.takes in (("logits",), ("input",)) or set(spec.takes) <= set(_PAIR_INPUTS), name
    assert sorted(FEATURE_LOSSES) == sorted(n for n, s in REGISTRY.items() if s.paired)
    assert TRAINED_HEADS == ("fitnets", "cc", "vid", "reviewkd", "ab", "ft", "ofd", "crd")
    assert "ce" not in DEFAULT_WEIGHTS
    # every declared default weight resolves: a constant, or one of resolve_weights's options
    weights = resolve_weights(list(REGISTRY), alpha=0.25, beta=7.0, hint_weight=3.0)
    assert weights == {**DEFAULT_WEIGHTS, "ce": 0.75, "kd": 0.25, "deit": 0.25, "deit-soft": 0.25, "at": 7.0,
                       "fitnets": 3.0, "dkd": 1.0, "dist": 2.0, "mlkd": 0.25, "gat": 7.0}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_term_takes_what_its_registry_entry_declares(name):
    """Built and routed from its entry alone, each term gives a finite scalar on every kind it declares, owns
    parameters exactly when it declares `trained`, and is refused the pair kinds it does not declare."""
    spec = REGISTRY[name]
    torch.manual_seed(0)
    logits, index = torch.randn(6, 10), torch.arange(6)
    labels = index % 3                                      # the training set's labels are arange(12) % 3
    for kind in [k for k in spec.takes if k not in ("logits", "input")] or [None]:
        routes, s_feat, t_feat, channels = {}, {DIST_LOGITS: torch.randn(6, 10)}, {}, {}
        if spec.takes == ("input",):  # gat: the input-gradient maps, no pair
            s_feat[INPUT_GRADIENT], t_feat[INPUT_GRADIENT] = torch.rand(6, 8, 8), torch.rand(6, 8, 8)
        pairs = [("s", "t"), ("s2", "t2")] if spec.joint else [("s", "t")]  # joint terms relate two stages or more
        for s, t in pairs if kind is not None else ():
            s_feat[s], t_feat[t], channels[(s, t)] = _PAIR_INPUTS[kind]
            if spec.equal_channels:                 # a teacher map as wide as the student's
                t_feat[t], channels[(s, t)] = torch.randn(6, 4, 2, 2), (4, 4)
        if kind is not None:
            routes = route_pairs([name], pairs, dict.fromkeys(pairs, kind))
        stored = {f"bn/{t}/{key}": torch.rand(6) for _, t in pairs for key in ("weight", "bias")}  # ofd's margins
        criterion = DistillLoss({name: 1.0}, routes=routes, channels=channels, labels=(torch.arange(12) % 3).tolist(),
                                kinds=dict.fromkeys(pairs, kind), teacher_params=stored)
        strong = (torch.randn(6, 10), torch.randn(6, 10)) if name == "mlkd" else None  # its second view
        out = criterion(logits, labels, s_feat, torch.randn(6, 10), t_feat, index=index, strong=strong)
        assert set(out) == {name, "loss"} and out[name].dim() == 0 and torch.isfinite(out[name]), (name, kind)
        assert any(True for _ in criterion.parameters()) == spec.trained, (name, kind)
    for kind in set(_PAIR_INPUTS) - set(spec.takes) if spec.paired else ():
        with pytest.raises(SoftcacheError, match="cannot use"):
            route_pairs([name, "at", "rkd"], [(f"{name}:s", "t")], {("s", "t"): kind})


def test_weights_keep_the_order_terms_are_routed_summed_and_logged_in():
    weights = resolve_weights(["rkd", "fitnets", "nst", "at", "kd"], alpha=0.5, beta=1.0, hint_weight=1.0)
    assert list(weights) == ["ce", "kd", "at", "fitnets", "rkd", "nst"]


def test_the_registry_and_the_package_import_without_torch():
    import subprocess
    import sys
    probe = ("import sys\nimport softcache.names, softcache.losses, softcache.losses.routing\n"
             "softcache.losses.resolve_weights(['kd', 'at'], alpha=0.9, beta=1.0, hint_weight=1.0)\n"
             "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_crd_negatives_are_distinct_as_repdistiller_draws_them_unless_there_are_too_few():
    labels = torch.tensor([0] * 10 + [1] * 30 + [2] * 60)
    crd = CRDLoss(2, 2, labels.tolist(), dim=2, negatives=40)       # 40 <= 100 - 60: distinct for every class
    assert crd.distinct()
    anchors = torch.tensor([0, 1, 2, 2, 1])
    drawn = crd.draw(anchors)
    for row, c in zip(drawn, anchors.tolist()):
        assert len(set(row.tolist())) == 40 and (labels[row] != c).all()
    hits = torch.zeros(100)                                          # uniform over the other classes' samples
    for _ in range(200):
        crd._step += 1
        hits += torch.bincount(crd.draw(torch.tensor([2]))[0], minlength=100)
    assert hits[60:].sum() == 0 and hits[:40].min() > 0 and (hits[:40] / hits[:40].mean() - 1).abs().max() < 0.25
    assert not CRDLoss(2, 2, labels.tolist(), dim=2, negatives=41).distinct()  # more than class 2's 40 others
