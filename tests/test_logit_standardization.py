"""Logit-standardised KD (Sun et al. 2024) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.losses import OBJECTIVES, forward_kl, js_divergence, logit_std_js, logit_std_kd, standardize_logits


def test_standardize_logits_hand_values():
    # [1, 2, 3]: mean 2, sample std 1; [0, 0, 3]: mean 1, sample std √((1 + 1 + 4) / 2) = √3
    out = standardize_logits(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]]))
    root3 = math.sqrt(3.0)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-1 / root3, -1 / root3, 2 / root3]])
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        standardize_logits(torch.ones(3, 1))


def test_only_the_class_relation_counts_not_the_logit_range():
    student, teacher = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 10.0]])
    # two classes: any increasing pair standardises to [−1/√2, 1/√2], so a 10-unit gap and a 1-unit gap match
    assert float(logit_std_kd(student, teacher)) == pytest.approx(0, abs=1e-6)
    # plain KD sees the gap: p_t = σ(10) = 0.99995, p_s = σ(1) = 0.73106, KL = 0.31281
    assert float(forward_kl(student, teacher)) == pytest.approx(0.31281, abs=1e-4)


def test_logit_std_kd_hand_values():
    # teacher [0, 10] → z = [−1/√2, 1/√2]; student [4, 3] → the mirror image. At T: p_t = σ(±√2/T) and
    # KL = (p − (1 − p))·ln(p / (1 − p)) = (2p − 1)·√2/T with p = σ(√2/T).
    student, teacher = torch.tensor([[4.0, 3.0]]), torch.tensor([[0.0, 10.0]])
    for temperature in (1.0, 2.0):
        p = 1 / (1 + math.exp(-math.sqrt(2) / temperature))
        kl = (2 * p - 1) * math.sqrt(2) / temperature  # T = 1: 0.86106; T = 2: 0.24008
        got = logit_std_kd(student, teacher, temperature=temperature)
        assert float(got) == pytest.approx(kl, rel=1e-5)
        scaled = logit_std_kd(student, teacher, temperature=temperature, scale_t2=True)
        assert float(scaled) == pytest.approx(kl * temperature**2, rel=1e-5)
    assert float(logit_std_kd(student, teacher, temperature=1.0)) == pytest.approx(0.86106, abs=1e-4)


def test_mask_and_catalogue_entry():
    student = torch.tensor([[4.0, 3.0], [1.0, 2.0]])
    teacher = torch.tensor([[0.0, 10.0], [0.0, 10.0]])
    both = logit_std_kd(student, teacher, temperature=1.0, reduction="none")
    assert both[1] == pytest.approx(0.0, abs=1e-6)
    masked = logit_std_kd(student, teacher, temperature=1.0, mask=torch.tensor([True, False]))
    assert float(masked) == pytest.approx(float(both[0]), rel=1e-6)
    info = OBJECTIVES["logit_std_kd"]
    assert info.kind == "logits" and info.defaults["temperature"] == 2.0 and "Sun et al. 2024" in info.paper


def test_logit_std_js_hand_values():
    # the mirrored pair above: p_t = [1 − p, p], p_s = [p, 1 − p] with p = σ(√2/T), so m = [½, ½] and
    # JS = ½·KL(p_t ‖ m) + ½·KL(p_s ‖ m) = ln 2 − H(p) = ln 2 + p·ln p + (1 − p)·ln(1 − p)
    student, teacher = torch.tensor([[4.0, 3.0]]), torch.tensor([[0.0, 10.0]])
    for temperature in (1.0, 2.0):
        p = 1 / (1 + math.exp(-math.sqrt(2) / temperature))
        js = math.log(2) + p * math.log(p) + (1 - p) * math.log(1 - p)  # T = 1: 0.19895; T = 2: 0.05880
        assert float(logit_std_js(student, teacher, temperature=temperature)) == pytest.approx(js, rel=1e-5)
        scaled = logit_std_js(student, teacher, temperature=temperature, scale_t2=True)
        assert float(scaled) == pytest.approx(js * temperature**2, rel=1e-5)
    assert float(logit_std_js(student, teacher, temperature=1.0)) == pytest.approx(0.19895, abs=1e-4)
    # a 1-unit gap matches a 10-unit gap after z-scoring; raw JS sees the difference
    same_order = torch.tensor([[3.0, 4.0]])
    assert float(logit_std_js(same_order, teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(js_divergence(same_order, teacher)) > 0.05
    info = OBJECTIVES["logit_std_js"]
    assert info.kind == "logits" and info.defaults["temperature"] == 2.0 and "Sun et al. 2024" in info.paper
