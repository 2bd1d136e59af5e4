"""RRHF and PRO ranking losses (potstill.losses.rrhf) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.losses.rrhf import mean_token_logps, pro_loss, ranking_alignment_loss, rrhf_loss


def test_mean_token_logps_divides_by_counted_tokens() -> None:
    # row 0 scores two tokens with p = 1/2 each, row 1 one token with p = 3/4, then padding
    ln3 = math.log(3.0)
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[ln3, 0.0], [7.0, 1.0]]])
    labels = torch.tensor([[0, 1], [0, -100]])
    got = mean_token_logps(logits, labels)
    assert torch.allclose(got, torch.tensor([math.log(0.5), math.log(0.75)]), atol=1e-6)
    assert mean_token_logps(logits, torch.full((2, 2), -100)).tolist() == [0.0, 0.0]


def test_rrhf_zero_when_logps_follow_the_ranking() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.2, -4.0]])
    ranks = torch.tensor([[3.0, 2.0, 1.0], [2.0, 3.0, 1.0]])
    assert rrhf_loss(logps, ranks, sft_weight=0.0).item() == 0.0
    # the SFT term alone: mean of −p_best = (1 + 0.2) / 2
    assert rrhf_loss(logps, ranks).item() == pytest.approx(0.6)


def test_rrhf_hand_computed_reversed_ranking() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    ranks = torch.tensor([[1.0, 2.0, 3.0]])  # response 2 (p = −3) is best, then 1, then 0
    # pairs: 2≻1: max(0, −2 + 3) = 1; 2≻0: max(0, −1 + 3) = 2; 1≻0: max(0, −1 + 2) = 1 → 4; SFT: −(−3) = 3
    assert rrhf_loss(logps, ranks, sft_weight=0.0).item() == pytest.approx(4.0)
    assert rrhf_loss(logps, ranks, sft_weight=0.5).item() == pytest.approx(5.5)


def test_rrhf_mask_and_ties() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-2.0, -1.0, -3.0]])
    ranks = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, False, True], [True, True, True]])
    per_row = rrhf_loss(logps, ranks, mask=mask, reduction="none")
    # row 0 without response 1: only 2≻0, max(0, −1 + 3) = 2, SFT 3; row 1: the tie 0 = 1 gives no pair, both
    # beat 2 with a higher p (hinges 0), SFT on the first of the tied best (p = −2)
    assert per_row.tolist() == pytest.approx([5.0, 2.0])
    assert rrhf_loss(logps, ranks, mask=mask, reduction="sum").item() == pytest.approx(7.0)


def test_empty_rows_are_left_out_of_the_mean() -> None:
    logps = torch.tensor([[-1.0, -2.0], [-5.0, -6.0]])
    ranks = torch.tensor([[2.0, 1.0], [2.0, 1.0]])
    mask = torch.tensor([[True, True], [False, False]])
    assert rrhf_loss(logps, ranks, mask=mask).item() == pytest.approx(1.0)
    assert pro_loss(logps, ranks, mask=mask, sft_weight=0.0, reduction="none").tolist()[1] == 0.0


def test_pro_hand_computed() -> None:
    # equal scores: −log(1/3) − log(1/2) = ln 6
    logps = torch.zeros(1, 3)
    assert pro_loss(logps, torch.tensor([[3.0, 2.0, 1.0]])).item() == pytest.approx(math.log(6.0))
    # p = (ln 2, 0), 0 ≻ 1: −log(2 / 3) = ln 1.5, SFT −ln 2
    logps = torch.tensor([[math.log(2.0), 0.0]])
    assert pro_loss(logps, torch.tensor([[2.0, 1.0]]), sft_weight=0.0).item() == pytest.approx(math.log(1.5))
    assert pro_loss(logps, torch.tensor([[2.0, 1.0]])).item() == pytest.approx(math.log(1.5) - math.log(2.0))
    # temperature 2 halves the scores: −log(√2 / (√2 + 1))
    got = pro_loss(logps, torch.tensor([[2.0, 1.0]]), sft_weight=0.0, temperature=2.0).item()
    assert got == pytest.approx(-math.log(math.sqrt(2) / (math.sqrt(2) + 1)))


def test_pro_mask_drops_a_response() -> None:
    logps = torch.tensor([[0.0, 5.0, 0.0]])
    ranks = torch.tensor([[3.0, 2.0, 1.0]])
    mask = torch.tensor([[True, False, True]])
    # only 0 ≻ 2 remains: −log(1/2) = ln 2
    assert pro_loss(logps, ranks, mask=mask, sft_weight=0.0).item() == pytest.approx(math.log(2.0))


def test_gradient_reaches_only_the_policy() -> None:
    logits = torch.randn(3, 4, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, -100], [3, 0, 4, -100], [2, 2, 2, 2]])
    ranks = torch.tensor([[0.0, 2.0, 1.0]], requires_grad=True)
    for kind in ("rrhf", "pro"):
        logits.grad = None
        logps = mean_token_logps(logits, labels).unsqueeze(0)
        ranking_alignment_loss(logps, ranks, loss_type=kind).backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0
        assert ranks.grad is None


def test_bad_arguments() -> None:
    logps = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        rrhf_loss(logps, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="loss_type"):
        ranking_alignment_loss(logps, logps, loss_type="dpo")
    with pytest.raises(ValueError, match="sft_weight"):
        pro_loss(logps, logps, sft_weight=-1.0)
