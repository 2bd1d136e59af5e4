"""PRD's losses against values worked out by hand on 2-D vectors."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.losses.prd import prd_relation_kl, prototype_loss, prototype_scores, supcon_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_supcon_by_hand():
    # z1 = (1, 0), z2 = (0, 1) share class 0; z3 = (−1, 0) is alone in class 1 (no positive: not an anchor).
    # Anchor 1: sims to 2, 3 = 0, −1 → −log(e^0 / (e^0 + e^−1)) = log(1 + e^−1).
    # Anchor 2: sims to 1, 3 = 0, 0 → log 2.
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # normalised inside
    labels = torch.tensor([0, 0, 1])
    one, two = math.log(1 + math.exp(-1)), math.log(2)
    per_anchor = supcon_loss(features, labels, temperature=1.0, reduction="none")
    assert per_anchor.tolist() == pytest.approx([one, two, 0.0], abs=1e-6)
    assert supcon_loss(features, labels, temperature=1.0).item() == pytest.approx((one + two) / 2, abs=1e-6)
    # τ = 0.5 doubles the similarities: anchor 1 gives log(1 + e^−2).
    assert supcon_loss(features, labels, temperature=0.5, reduction="none")[0].item() == \
        pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_supcon_pulls_same_class_together():
    features = torch.tensor([[1.0, 0.2], [0.2, 1.0], [-1.0, 0.1]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    loss = supcon_loss(features, labels)
    loss.backward()
    stepped = (features - 0.1 * features.grad).detach()
    assert supcon_loss(stepped, labels).item() < loss.item()
    assert torch.isfinite(features.grad).all()


def test_prototype_loss_by_hand_and_stops_the_feature_gradient():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    prototypes = torch.tensor([[3.0, 0.0], [1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    loss = prototype_loss(features, prototypes, labels)
    # cos(p0, h0) = 1; cos(p1, h1) = 2 / (√2 · 2) = 1/√2.
    assert loss.item() == pytest.approx((0.0 + 1 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    loss.backward()
    assert features.grad is None
    assert prototypes.grad is not None and prototypes.grad[1].abs().sum() > 0
    assert prototype_loss(features, prototypes, labels, reduction="sum").item() == pytest.approx(
        1 - 1 / math.sqrt(2), abs=1e-6)
    with pytest.raises(ValueError, match="class ids"):
        prototype_loss(features, prototypes, torch.tensor([0, 2]))


def test_prototype_scores_are_cosines_over_temperature():
    scores = prototype_scores(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]), temperature=0.5)
    assert scores[0].tolist() == pytest.approx([0.6 / 0.5, 0.8 / 0.5])


def test_relation_kl_by_hand_over_samples():
    # One old prototype (1, 0). Old features (1, 0), (0, 1): q_old = softmax(1, 0). The new model swapped them:
    # q_new = softmax(0, 1). KL = Σ q_old (log q_old − log q_new) = q_old(1)·1 + q_old(2)·(−1) = tanh(1/2).
    prototype = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    new = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    kl = prd_relation_kl(new, old, prototype, prototype, temperature=1.0)
    assert kl.item() == pytest.approx(math.tanh(0.5), abs=1e-6)
    # τ = 0.5 doubles the scores: KL = 2·tanh(1).
    assert prd_relation_kl(new, old, prototype, prototype, temperature=0.5).item() == \
        pytest.approx(2 * math.tanh(1.0), abs=1e-6)


def test_relation_kl_axes_differ_by_hand():
    # Two prototypes (1, 0) and (0, 1), one sample moving from (1, 0) to (1, 1)/√2 (the scale does not count).
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    old, new = torch.tensor([[1.0, 0.0]]), torch.tensor([[5.0, 5.0]])
    # Over samples, each prototype's softmax over a single sample is 1: nothing to distil.
    assert prd_relation_kl(new, old, prototypes, prototypes).item() == pytest.approx(0.0, abs=1e-7)
    # Over prototypes: q_old = softmax(1, 0), q_new = softmax(c, c) = (½, ½): KL = Σ q log(2q).
    q = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    expected = float((q * torch.log(2 * q)).sum())
    assert prd_relation_kl(new, old, prototypes, prototypes, axis="prototypes").item() == \
        pytest.approx(expected, abs=1e-6)
    per_sample = prd_relation_kl(new, old, prototypes, prototypes, axis="prototypes", reduction="none")
    assert per_sample.shape == (1,)


def test_relation_kl_is_zero_when_nothing_changed_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    features, prototypes = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    for axis in ("samples", "prototypes"):
        assert prd_relation_kl(features, features, prototypes, prototypes, axis=axis).item() == \
            pytest.approx(0.0, abs=1e-6)
        moved = features + 0.5 * torch.randn(6, 4, generator=g)
        assert prd_relation_kl(moved, features, prototypes, prototypes, axis=axis).item() > 1e-4


def test_relation_kl_gradient_reaches_new_features_and_prototypes_only():
    g = torch.Generator().manual_seed(1)
    old_features = torch.randn(5, 3, generator=g, requires_grad=True)
    old_prototypes = torch.randn(2, 3, generator=g, requires_grad=True)
    new_features = (old_features.detach() + 0.3 * torch.randn(5, 3, generator=g)).requires_grad_()
    new_prototypes = (old_prototypes.detach() + 0.3 * torch.randn(2, 3, generator=g)).requires_grad_()
    prd_relation_kl(new_features, old_features, new_prototypes, old_prototypes).backward()
    assert old_features.grad is None and old_prototypes.grad is None
    assert new_features.grad is not None and new_features.grad.abs().sum() > 0
    assert new_prototypes.grad is not None and new_prototypes.grad.abs().sum() > 0


def test_relation_kl_rejects_bad_input():
    x, p = torch.zeros(2, 3), torch.ones(1, 3)
    with pytest.raises(ValueError, match="axis"):
        prd_relation_kl(x, x, p, p, axis="classes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="features"):
        prd_relation_kl(x, torch.zeros(3, 3), p, p)
    with pytest.raises(ValueError, match="prototypes"):
        prd_relation_kl(x, x, p, torch.ones(2, 3))
