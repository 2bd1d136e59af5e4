"""DistillNearest / DistillWeighted parts: H-score, probe score, similarity weights, the multi-source loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potstill.errors import UserError
from potstill.losses.divergences import forward_kl
from potstill.losses.multi_teacher import weighted_multi_teacher_kl
from potstill.teachers.zoo import ZooSource, h_score, nearest, probe_score, score_sources, similarity_weights


def test_h_score_matches_a_hand_computed_value():
    # 1-d features, two classes: f = [0, 2 | 4, 6]; mean 3, var(f) = (9+1+1+9)/4 = 5;
    # class means 1 and 5, so E[f|y] - 3 = ±2 and var(E[f|y]) = 4: H = 4 / 5
    f = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    assert h_score(f, [0, 0, 1, 1], ridge=0.0) == pytest.approx(0.8)
    # a feature that only carries noise scores ≈ 0; one that is the label scores 1 (all variance between classes)
    assert h_score(torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]), [0, 0, 1, 1], ridge=0.0) == pytest.approx(0.0)
    assert h_score(torch.tensor([[0.0], [0.0], [1.0], [1.0]]), [0, 0, 1, 1], ridge=0.0) == pytest.approx(1.0)


def test_h_score_two_dimensions_by_hand():
    # f columns: the label (0/1) and an independent ±1: cov(f) = diag(1/4, 1), cov(E[f|y]) = diag(1/4, 0): H = 1
    f = np.array([[0, 1], [0, -1], [1, 1], [1, -1]], dtype=float)
    assert h_score(f, [0, 0, 1, 1], ridge=0.0) == pytest.approx(1.0)


def test_probe_score_separates_informative_from_random_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    informative = torch.nn.functional.one_hot(y, 3).float() * 3 + torch.randn(60, 3, generator=g) * 0.3
    noise = torch.randn(60, 3, generator=g)
    assert probe_score(informative, y.numpy()) == pytest.approx(1.0)
    assert probe_score(noise, y.numpy()) < 0.6
    with pytest.raises(UserError, match="at least 2"):
        probe_score(noise[:4], [0, 1, 2, 2])


def test_similarity_weights_and_nearest():
    w = similarity_weights([0.9, 0.7, 0.7], temperature=0.1)
    e = np.exp(np.array([9.0, 7.0, 7.0]))
    assert torch.allclose(w, torch.tensor(e / e.sum(), dtype=torch.float32))
    assert nearest([0.2, 0.9, 0.9]) == 1
    with pytest.raises(UserError, match="temperature"):
        similarity_weights([1.0], temperature=0.0)


def test_weighted_multi_teacher_kl_is_the_weighted_sum_of_per_source_kls():
    g = torch.Generator().manual_seed(1)
    students = [torch.randn(5, 4, generator=g) for _ in range(2)]
    teachers = [torch.randn(5, 4, generator=g) for _ in range(2)]
    w = torch.tensor([0.25, 0.75])
    got = weighted_multi_teacher_kl(students, teachers, w, temperature=2.0)
    want = sum(wi * forward_kl(s, t, temperature=2.0) for wi, s, t in zip(w, students, teachers, strict=True))
    assert torch.allclose(got, want)
    # one source with weight 1 is plain KD (DistillNearest); equal logits give exactly 0
    assert torch.allclose(weighted_multi_teacher_kl(students[:1], teachers[:1], torch.ones(1)),
                          forward_kl(students[0], teachers[0]))
    assert weighted_multi_teacher_kl(teachers, teachers, w).item() == pytest.approx(0.0, abs=1e-7)
    assert weighted_multi_teacher_kl(students, teachers, w, reduction="none").shape == (2, 5)
    with pytest.raises(ValueError, match="equal in number"):
        weighted_multi_teacher_kl(students, teachers[:1], w)


def test_zoo_scores_rank_the_source_that_sees_the_classes_first():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(80) % 4
    x = torch.cat([torch.nn.functional.one_hot(y, 4).float() * 2, torch.randn(80, 4, generator=g)], dim=1)
    x = x + torch.randn(80, 8, generator=g) * 0.3
    sources = [ZooSource("noise-half", lambda v: v[:, 4:]), ZooSource("class-half", lambda v: v[:, :4])]
    for metric in ("probe", "h_score"):
        scores = score_sources(sources, x, y.tolist(), metric=metric)
        assert sources[nearest(scores)].name == "class-half"
    sources[1].fit_head(x, y.tolist())
    logits = sources[1].teacher_logits(x)
    assert logits.shape == (80, 4) and (logits.argmax(-1) == y).float().mean() > 0.95
    with pytest.raises(RuntimeError, match="fit_head"):
        sources[0].teacher_logits(x)
