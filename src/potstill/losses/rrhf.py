"""Ranking alignment losses on a policy's own sequence log-probs: RRHF, and PRO as the listwise option.

RRHF: Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback". PRO: Song et al.
2024, "Preference Ranking Optimization for Human Alignment". CycleAlign (Hong et al. 2023, arXiv 2310.16271) trains
its white-box model with either of them on the ranking both models agree on (`potstill.data.cyclealign`).

For one prompt x with n sampled responses y_1 … y_n, the policy's score of a response is its length-normalised
log-prob (the mean over the response's tokens):

    p_i = (1 / |y_i|) · Σ_t log π(y_i,t | x, y_i,<t)

The ranking comes as `rank_scores` r_i (higher = preferred; only their order matters, so ranks, rewards or
n − position all work), and `mask` leaves out responses that are not ranked (e.g. outside the agreement).

    RRHF:  L = Σ_{i,j: r_i > r_j} max(0, p_j − p_i)  −  λ · p_best
    PRO:   L = − Σ_{k=1}^{m−1} log [ exp(p_(k) / τ) / Σ_{i=k}^{m} exp(p_(i) / τ) ]  −  λ · p_best

where p_(1) … p_(m) are the m counted responses sorted by r (best first; ties keep their index order in PRO and
give no pair in RRHF), and p_best = p_(1). The λ term is the SFT cross-entropy on the best response, in its
length-normalised form (the mean token negative log-likelihood, as in RRHF's code). A prompt with fewer than two
counted responses contributes only its SFT term; one with none contributes 0 and is not counted in the mean.

Defaults: λ (`sft_weight`) = 1 (RRHF weighs both terms 1), τ = 1 (PRO's paper scales its terms by reward gaps;
here a constant temperature). `reduction="mean"` averages over prompts with at least one counted response. The
ranking is data, not a model output: gradients reach only the log-probs. Computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._rows import check_reduction, check_temperature
from .preference import sequence_logps

RANKING_LOSSES = ("rrhf", "pro")


def mean_token_logps(logits: Tensor, labels: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """p = Σ log π(token) / number of counted tokens, per row: `[N, T, V]` logits, `[N, T]` labels (-100 = not
    counted, the next token already aligned with the logits). A row with no counted token gets 0. Shape `[N]`."""
    total = sequence_logps(logits, labels, mask=mask)
    counted = labels != -100
    if mask is not None:
        counted = counted & mask.bool()
    return total / counted.sum(-1).clamp_min(1)


def _check(logps: Tensor, rank_scores: Tensor, mask: Tensor | None, sft_weight: float,
           reduction: str) -> Tensor:
    check_reduction(reduction)
    if logps.dim() != 2 or rank_scores.shape != logps.shape:
        raise ValueError(f"expected logps and rank_scores of shape [B, n], got {tuple(logps.shape)} and "
                         f"{tuple(rank_scores.shape)}")
    if not sft_weight >= 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    if mask is None:
        return torch.ones_like(logps, dtype=torch.bool)
    if mask.shape != logps.shape:
        raise ValueError(f"mask must have shape {tuple(logps.shape)}, got {tuple(mask.shape)}")
    return mask.bool()


def _best_logp(logps: Tensor, rank_scores: Tensor, counted: Tensor) -> Tensor:
    """p of the highest-ranked counted response per row (0 where none is counted); the first index on a tie."""
    scores = rank_scores.float().masked_fill(~counted, float("-inf"))
    best = scores.argmax(-1, keepdim=True)
    return logps.gather(-1, best).squeeze(-1) * counted.any(-1)


def _reduce(per_row: Tensor, counted: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    rows = counted.any(-1)
    return per_row.sum() / rows.sum().clamp_min(1)


def rrhf_loss(logps: Tensor, rank_scores: Tensor, *, mask: Tensor | None = None, sft_weight: float = 1.0,
              reduction: str = "mean") -> Tensor:
    """RRHF's pairwise hinge on length-normalised log-probs `[B, n]` plus λ·SFT on the best response (module
    docstring). `reduction`: "mean" over prompts with a counted response, "sum", or "none" (`[B]`)."""
    counted = _check(logps, rank_scores, mask, sft_weight, reduction)
    p = logps.float()
    r = rank_scores.detach().float()
    # pair (i, j) counts when response i is ranked above response j and both are counted
    above = (r.unsqueeze(-1) > r.unsqueeze(-2)) & counted.unsqueeze(-1) & counted.unsqueeze(-2)
    hinge = (p.unsqueeze(-2) - p.unsqueeze(-1)).clamp_min(0)  # [b, i, j] = max(0, p_j − p_i)
    per_row = (hinge * above).sum((-1, -2)) - sft_weight * _best_logp(p, r, counted)
    return _reduce(per_row, counted, reduction)


def pro_loss(logps: Tensor, rank_scores: Tensor, *, mask: Tensor | None = None, sft_weight: float = 1.0,
             temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """PRO's listwise loss (a Plackett-Luce likelihood of the ranking) plus λ·SFT on the best response (module
    docstring). `reduction` as in `rrhf_loss`."""
    counted = _check(logps, rank_scores, mask, sft_weight, reduction)
    tau = check_temperature(temperature)
    p = logps.float()
    r = rank_scores.detach().float().masked_fill(~counted, float("-inf"))
    order = torch.sort(r, dim=-1, descending=True, stable=True).indices
    valid = counted.gather(-1, order)
    # a large finite fill keeps the suffix log-sum-exp exact (exp underflows to 0) and its gradient finite
    sorted_p = torch.where(valid, p.gather(-1, order) / tau, torch.full_like(p, -1e9))
    suffix = sorted_p.flip(-1).logcumsumexp(-1).flip(-1)
    has_worse = torch.zeros_like(valid)
    has_worse[..., :-1] = valid[..., 1:]
    terms = torch.where(valid & has_worse, suffix - sorted_p, torch.zeros_like(p))
    per_row = terms.sum(-1) - sft_weight * _best_logp(p, r, counted)
    return _reduce(per_row, counted, reduction)


def ranking_alignment_loss(logps: Tensor, rank_scores: Tensor, *, loss_type: str = "rrhf",
                           mask: Tensor | None = None, sft_weight: float = 1.0,
                           reduction: str = "mean") -> Tensor:
    """`rrhf_loss` or `pro_loss` by name (`loss_type`: "rrhf" or "pro")."""
    if loss_type == "rrhf":
        return rrhf_loss(logps, rank_scores, mask=mask, sft_weight=sft_weight, reduction=reduction)
    if loss_type == "pro":
        return pro_loss(logps, rank_scores, mask=mask, sft_weight=sft_weight, reduction=reduction)
    raise ValueError(f"loss_type must be one of {', '.join(RANKING_LOSSES)}, got {loss_type!r}")
