"""DCD's loss (potstill.losses.dcd) against values computed by hand on 2 × 2 scores."""

import math

import pytest
import torch

from potstill.losses import OBJECTIVES
from potstill.losses.dcd import dcd_loss, dcd_weights

LN3 = math.log(3.0)
TEACHER = torch.tensor([[0.0, 0.0], [LN3, 0.0]])  # row 0: p = (½, ½); row 1: p = (¾, ¼)
STUDENT = torch.tensor([[1.0, 0.0], [0.0, 0.0]])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def hand_terms() -> tuple[list[float], list[float], list[float], list[float]]:
    """(ê, w, per-row MSE, per-row BCE) of TEACHER / STUDENT written out."""
    e = [math.log(0.5), 0.75 * math.log(0.75) + 0.25 * math.log(0.25)]
    share = [x / sum(e) for x in e]
    raw = [math.exp((1 - x) ** 2) for x in share]
    w = [x / sum(raw) for x in raw]
    mse = [(0 - 1) ** 2 / 2, LN3**2 / 2]
    bce = [(softplus(1.0) - 1.0 + softplus(0.0)) / 2, (softplus(0.0) + softplus(0.0)) / 2]
    return share, w, mse, bce


def test_weights_match_hand_values():
    share, w, _, _ = hand_terms()
    got_share, got_w = dcd_weights(TEACHER)
    assert got_share.tolist() == pytest.approx(share, abs=1e-6)
    assert got_w.tolist() == pytest.approx(w, abs=1e-6)
    assert w[1] > w[0]  # the surer teacher row gets the larger distillation weight


def test_equal_entropy_rows_give_uniform_weights():
    teacher = torch.tensor([[2.0, 0.5, -1.0], [-1.0, 2.0, 0.5], [0.5, -1.0, 2.0], [2.0, -1.0, 0.5]])
    share, w = dcd_weights(teacher)
    assert share.tolist() == pytest.approx([0.25] * 4, abs=1e-6)
    assert w.tolist() == pytest.approx([0.25] * 4, abs=1e-6)


def test_loss_matches_hand_value_and_reductions():
    share, w, mse, bce = hand_terms()
    expected = 0.2 * (w[0] * mse[0] + w[1] * mse[1]) + 0.8 * (share[0] * bce[0] + share[1] * bce[1])
    assert float(dcd_loss(STUDENT, TEACHER)) == pytest.approx(expected, abs=1e-6)
    assert float(dcd_loss(STUDENT, TEACHER, reduction="sum")) == pytest.approx(2 * expected, abs=1e-6)
    rows = dcd_loss(STUDENT, TEACHER, reduction="none")
    assert rows.tolist() == pytest.approx([2 * (0.2 * w[i] * mse[i] + 0.8 * share[i] * bce[i]) for i in (0, 1)],
                                          abs=1e-6)


def test_uniform_ablation_and_alpha_ends():
    _, _, mse, bce = hand_terms()
    plain = dcd_loss(STUDENT, TEACHER, dynamic=False)
    assert float(plain) == pytest.approx(0.2 * sum(mse) / 2 + 0.8 * sum(bce) / 2, abs=1e-6)
    share, w, _, _ = hand_terms()
    assert float(dcd_loss(STUDENT, TEACHER, alpha=1.0)) == pytest.approx(w[0] * mse[0] + w[1] * mse[1], abs=1e-6)
    assert float(dcd_loss(STUDENT, TEACHER, alpha=0.0)) == pytest.approx(share[0] * bce[0] + share[1] * bce[1],
                                                                          abs=1e-6)


def test_temperature_cancels_in_the_score_regression():
    # T² · ((t − s) / T)² = (t − s)², and the weights come from the raw teacher scores
    assert float(dcd_loss(STUDENT, TEACHER, alpha=1.0, temperature=4.0)) == pytest.approx(
        float(dcd_loss(STUDENT, TEACHER, alpha=1.0)), abs=1e-6)


def test_gradient_reaches_only_the_student():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    dcd_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_mask_drops_rows_from_the_weights():
    teacher = torch.cat([TEACHER, torch.tensor([[5.0, -5.0]])])
    student = torch.cat([STUDENT, torch.tensor([[9.0, 9.0]])])
    masked = dcd_loss(student, teacher, mask=torch.tensor([True, True, False]))
    assert float(masked) == pytest.approx(float(dcd_loss(STUDENT, TEACHER)), abs=1e-6)
    share, w = dcd_weights(teacher, mask=torch.tensor([True, True, False]))
    assert float(share[2]) == 0.0 and float(w[2]) == 0.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="positive first"):
        dcd_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="same shape"):
        dcd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_catalogue_entry():
    info = OBJECTIVES["dcd_loss"]
    assert info.kind == "scores" and info.defaults["alpha"] == 0.2 and info.defaults["temperature"] == 1.0


def test_class_logits_keep_the_label_and_the_teachers_best_other_classes():
    from potstill.losses.dcd import dcd_logits

    teacher = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 4.0, 1.0]])
    student = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -1.0, 3.0]])
    labels = torch.tensor([2, 0])
    # row 0: [class 2, then classes 1 (3.0) and 3 (2.0)]; row 1: [class 0, then classes 2 (4.0) and 3 (1.0)]
    lists = torch.tensor([[2, 1, 3], [0, 2, 3]])
    expected = dcd_loss(student.gather(1, lists), teacher.gather(1, lists))
    got = dcd_logits(student, teacher, labels=labels, negatives=2)
    assert float(got) == pytest.approx(float(expected), abs=1e-6)
    unlabelled = dcd_logits(student, teacher, labels=torch.tensor([2, -100]), negatives=2)
    assert float(unlabelled) == pytest.approx(float(dcd_loss(student[:1].gather(1, lists[:1]),
                                                            teacher[:1].gather(1, lists[:1]))), abs=1e-6)
    with pytest.raises(ValueError, match="labels"):
        dcd_logits(student, teacher)
    assert dcd_logits.batch_fields == {"labels": "labels"}
    assert OBJECTIVES["dcd_logits"].kind == "logits" and OBJECTIVES["dcd_logits"].defaults["negatives"] == 7
