"""DPO with the teacher as reference (potstill.losses.preference) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.losses import OBJECTIVES
from potstill.losses.preference import dpo_teacher_ref, preference_loss, sequence_logps

LN3 = math.log(3.0)


def _tiny_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pair, vocabulary 2, two positions: position 0 is the prompt (not counted, junk logits), position 1
    scores token 0 in the chosen row and token 1 in the rejected row.

    student: chosen p(0) = 3/4, rejected p(1) = 1/2; teacher: chosen p(0) = 1/2, rejected p(1) = 3/4, so
    r_w = ln(3/4) − ln(1/2) = ln 1.5 and r_l = ln(1/2) − ln(3/4) = −ln 1.5."""
    junk = [5.0, -2.0]
    student = torch.tensor([[junk, [LN3, 0.0]], [junk, [0.0, 0.0]]])
    teacher = torch.tensor([[junk, [0.0, 0.0]], [junk, [0.0, LN3]]])
    labels = torch.tensor([[-100, 0], [-100, 1]])
    return student, teacher, labels


def test_sequence_logps_sums_counted_tokens_only() -> None:
    student, _, labels = _tiny_pair()
    got = sequence_logps(student, labels)
    assert torch.allclose(got, torch.tensor([math.log(0.75), math.log(0.5)]), atol=1e-6)
    mask = torch.tensor([[True, False], [True, True]])
    assert torch.allclose(sequence_logps(student, labels, mask=mask), torch.tensor([0.0, math.log(0.5)]), atol=1e-6)


def test_sigmoid_hand_computed() -> None:
    student, teacher, labels = _tiny_pair()
    # β = 0.5: β (r_w − r_l) = ln 1.5, σ(ln 1.5) = 0.6, L = −ln 0.6 = ln(5/3)
    loss = dpo_teacher_ref(student, teacher, labels=labels, beta=0.5)
    assert loss.item() == pytest.approx(math.log(5 / 3), abs=1e-6)


def test_kto_pair_hand_computed() -> None:
    student, teacher, labels = _tiny_pair()
    # one pair: KL_w = max(0, ln 1.5), KL_l = max(0, −ln 1.5) = 0
    # ½ [1 − σ(0.5 ln 1.5)] + ½ [1 − σ(0.5 (ln 1.5 + ln 1.5))] = ½ [1 / (1 + √1.5)] + ½ · 0.4
    expected = 0.5 / (1 + math.sqrt(1.5)) + 0.5 * 0.4
    loss = dpo_teacher_ref(student, teacher, labels=labels, beta=0.5, loss_type="kto_pair")
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("loss_type", "value"), [("sigmoid", math.log(2.0)), ("kto_pair", 0.5)])
def test_student_equal_to_teacher(loss_type: str, value: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 7)
    labels = torch.randint(0, 7, (6, 5))
    labels[:, :2] = -100
    loss = dpo_teacher_ref(logits.clone(), logits, labels=labels, loss_type=loss_type)
    assert loss.item() == pytest.approx(value, abs=1e-6)
    per_pair = dpo_teacher_ref(logits.clone(), logits, labels=labels, loss_type=loss_type, reduction="none")
    assert per_pair.shape == (3,)
    assert dpo_teacher_ref(logits.clone(), logits, labels=labels, loss_type=loss_type,
                           reduction="sum").item() == pytest.approx(3 * value, abs=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto_pair"])
def test_gradient_step_raises_chosen_over_rejected(loss_type: str) -> None:
    torch.manual_seed(1)
    teacher = torch.randn(4, 3, 5)
    labels = torch.randint(0, 5, (4, 3))
    student = teacher.clone().requires_grad_(True)
    dpo_teacher_ref(student, teacher, labels=labels, loss_type=loss_type).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = student - 1.0 * student.grad
        before = sequence_logps(teacher, labels)
        after = sequence_logps(stepped, labels)
    margin_before = before[:2] - before[2:]
    margin_after = after[:2] - after[2:]
    assert bool((margin_after > margin_before).all())


def test_teacher_gets_no_gradient() -> None:
    student, teacher, labels = _tiny_pair()
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    dpo_teacher_ref(student, teacher, labels=labels).backward()
    assert teacher.grad is None


def test_bad_inputs() -> None:
    student, teacher, labels = _tiny_pair()
    with pytest.raises(ValueError, match="loss_type"):
        dpo_teacher_ref(student, teacher, labels=labels, loss_type="ipo")
    with pytest.raises(ValueError, match="even number"):
        dpo_teacher_ref(student[:1], teacher[:1], labels=labels[:1])
    with pytest.raises(ValueError, match="differ in shape"):
        dpo_teacher_ref(student, teacher[:, :1], labels=labels)
    with pytest.raises(ValueError, match="reduction"):
        preference_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), reduction="avg")


def test_catalogue_entry() -> None:
    info = OBJECTIVES["dpo_teacher_ref"]
    assert info.kind == "preference"
    assert info.defaults == {"beta": 0.1, "loss_type": "sigmoid", "reduction": "mean"}
    assert "LLaVA-MoD" in info.paper
