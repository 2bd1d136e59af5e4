"""VQGraph's student losses against hand-computed values (potstill.losses.vqgraph)."""

import math

import pytest
import torch

from potstill.losses.vqgraph import soft_code_assignments, soft_code_kl, soft_label_loss

CODEBOOK = torch.tensor([[0.0, 0.0], [1.0, 0.0]])


def test_soft_code_assignments_are_a_softmax_of_negative_squared_distances():
    # h = (0, 0): squared distances 0 and 1 -> softmax(0, -1/τ); at τ = 1: (1, e^-1) / (1 + e^-1).
    r = soft_code_assignments(torch.tensor([[0.0, 0.0]]), CODEBOOK, temperature=1.0)
    first = 1 / (1 + math.exp(-1))
    assert r.tolist()[0] == pytest.approx([first, 1 - first], abs=1e-6)
    # h = (0, 2): squared distances 4 and 5 -> the same distribution (only the difference matters).
    r2 = soft_code_assignments(torch.tensor([[0.0, 2.0]]), CODEBOOK, temperature=1.0)
    assert r2.tolist()[0] == pytest.approx([first, 1 - first], abs=1e-6)


def test_soft_code_kl_hand_value_at_two_temperatures():
    teacher = torch.tensor([[0.0, 0.0]])
    student = torch.tensor([[1.0, 0.0]])
    # τ = 1: r_T = (σ(1), σ(-1)), r_S reversed; KL = (σ(1) - σ(-1)) · ln(σ(1)/σ(-1)) = (2σ(1) - 1) · 1.
    sig1 = 1 / (1 + math.exp(-1))
    assert soft_code_kl(student, teacher, CODEBOOK, temperature=1.0).item() == pytest.approx(2 * sig1 - 1, abs=1e-6)
    # τ = 2: logits differ by 0.5, KL = (2σ(0.5) - 1) · 0.5, times τ² = 4.
    sig_half = 1 / (1 + math.exp(-0.5))
    expected = 4 * (2 * sig_half - 1) * 0.5
    assert soft_code_kl(student, teacher, CODEBOOK, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)


def test_soft_code_kl_is_zero_when_the_student_equals_the_teacher_and_masks_rows():
    hidden = torch.tensor([[0.3, -0.2], [2.0, 1.0]])
    assert soft_code_kl(hidden, hidden, CODEBOOK).item() == pytest.approx(0.0, abs=1e-7)
    student = torch.tensor([[1.0, 0.0], [5.0, 5.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    per_node = soft_code_kl(student, teacher, CODEBOOK, temperature=1.0, reduction="none")
    masked = soft_code_kl(student, teacher, CODEBOOK, temperature=1.0, mask=torch.tensor([True, False]))
    sig1 = 1 / (1 + math.exp(-1))
    assert per_node[0].item() == pytest.approx(2 * sig1 - 1, abs=1e-6)
    assert masked.item() == pytest.approx(2 * sig1 - 1, abs=1e-6)
    summed = soft_code_kl(student, teacher, CODEBOOK, temperature=1.0, reduction="sum")
    assert summed.item() == pytest.approx(per_node.sum().item(), rel=1e-6)


def test_soft_code_kl_gradient_reaches_only_the_student():
    student = torch.tensor([[1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0]], requires_grad=True)
    codebook = CODEBOOK.clone().requires_grad_(True)
    soft_code_kl(student, teacher, codebook).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and codebook.grad is None


def test_soft_label_loss_hand_values():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # p_T = (1/4, 3/4)
    student = torch.tensor([[0.0, 0.0]])  # p_S = (1/2, 1/2)
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert soft_label_loss(student, teacher).item() == pytest.approx(kl, abs=1e-6)
    mixed = soft_label_loss(student, teacher, torch.tensor([1]), label_weight=0.5)
    assert mixed.item() == pytest.approx(0.5 * kl + 0.5 * math.log(2.0), abs=1e-6)
    # A label of -100 drops the CE term for that node.
    ignored = soft_label_loss(student, teacher, torch.tensor([-100]), label_weight=0.5)
    assert ignored.item() == pytest.approx(0.5 * kl, abs=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dimension"):
        soft_code_kl(torch.zeros(1, 3), torch.zeros(1, 3), CODEBOOK)
    with pytest.raises(ValueError, match="temperature"):
        soft_code_assignments(torch.zeros(1, 2), CODEBOOK, temperature=0.0)
    with pytest.raises(ValueError, match="needs labels"):
        soft_label_loss(torch.zeros(1, 2), torch.zeros(1, 2), label_weight=0.3)
