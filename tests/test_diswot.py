"""DisWOT training-free score: 0 for identical models, hand-computed values on tiny features, both forms."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel

from potstill.eval.diswot import classifier_gradient, diswot_from_features, diswot_score

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hand_computed_score_on_tiny_features():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    # zero head: M = (1/C − Y)ᵀ F / B; teacher M = [[-.25, .25], [.25, -.25]], student M = 0
    assert torch.allclose(classifier_gradient(teacher, labels, 2), torch.tensor([[-.25, .25], [.25, -.25]]).double())
    s = diswot_from_features(teacher, student, labels, 2)
    # semantic: G_T = rows (±1/√2), G_S = 0 → ‖ΔG‖² = 2, / C = 1
    assert s.semantic == pytest.approx(1.0)
    # relation: G_T = I, G_S = all 1/√2 → ‖ΔG‖² = 2(1 − 1/√2)² + 2·½ = 4 − 2√2, / B² = 1 − √2/2
    assert s.relation == pytest.approx(1 - math.sqrt(2) / 2)
    assert s.score == pytest.approx(-(2 - math.sqrt(2) / 2))


def test_code_form_on_tiny_features():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    # M_S = 2 M_T; each row's outer product m mᵀ has entries ±1/16 for the teacher, ±4/16 for the student:
    # per class ‖Δ‖² = 4 · (3/16)² = 9/64; summed over 2 classes, / C = 9/64. Relation Grams are equal.
    s = diswot_from_features(teacher, student, labels, 2, form="code")
    assert s.semantic == pytest.approx(9 / 64) and s.relation == pytest.approx(0.0)
    # the Gram form is scale-free: this student scores the maximum
    assert diswot_from_features(teacher, student, labels, 2).score == pytest.approx(0.0)
    with pytest.raises(ValueError, match="equal widths"):
        diswot_from_features(teacher, torch.ones(2, 3), labels, 2, form="code")


def bert(width: int, layers: int, seed: int) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=40, hidden_size=width, num_attention_heads=2, intermediate_size=2 * width,
                                num_hidden_layers=layers, max_position_embeddings=16))


def test_identical_models_score_zero_and_others_score_below():
    batch = {"input_ids": torch.randint(0, 40, (8, 6), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(8, 6, dtype=torch.long)}
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    teacher = bert(16, 2, seed=0)
    same = diswot_score(teacher, bert(16, 2, seed=0), batch, labels, 3)
    assert same.score == 0.0 and same.semantic == 0.0 and same.relation == 0.0
    other = diswot_score(teacher, bert(8, 1, seed=1), batch, labels, 3)  # another width: the Gram form still works
    assert other.score < 0
    assert diswot_score(teacher, bert(16, 2, seed=0), batch, labels, 3, form="code").score == 0.0
