"""Loss formulas against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from softcache.errors import SoftcacheError
from softcache.losses import ATLoss, DistillLoss, FitNetsLoss, KDLoss, attention_map, resolve_weights


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
    out = DistillLoss(weights, temperature=4.0, pairs={"a": "b"})(logits, labels, {"a": f_s}, t_logits, {"b": f_t})
    assert out["ce"].item() == pytest.approx(0.1 * torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert out["kd"].item() == pytest.approx(0.9 * KDLoss(4.0)(logits, t_logits).item(), rel=1e-6)
    assert out["at"].item() == pytest.approx(1000 * ATLoss()(f_s, f_t).item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["kd"].item() + out["at"].item(), rel=1e-6)
