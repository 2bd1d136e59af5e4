"""Ranking distillation: match the teacher's relevance scores for (query, candidate) pairs."""

from __future__ import annotations

import torch
from torch import Tensor

from ._rows import check_reduction, check_same_shape
from .divergences import forward_kl


def margin_mse(
    student_pos: Tensor,
    student_neg: Tensor,
    teacher_pos: Tensor,
    teacher_neg: Tensor,
    *,
    reduction: str = "mean",
) -> Tensor:
    """Margin-MSE, mean over negatives of ((s⁺ − s⁻) − (t⁺ − t⁻))², per query.

    Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
    Distillation". Positives are `(B,)`, negatives `(B,)` or `(B, N)` (the positive is broadcast over the
    N negatives). "mean" averages over queries, which equals the mean over all B·N terms (as in
    sentence-transformers' MarginMSELoss); "sum" and "none" are over / per query. Computed in float32.
    Defaults: reduction="mean".
    """
    check_reduction(reduction)
    check_same_shape(student_pos, teacher_pos, "positive scores")
    check_same_shape(student_neg, teacher_neg, "negative scores")
    if student_pos.dim() != 1:
        raise ValueError(f"positive scores must have shape (B,), got {tuple(student_pos.shape)}")
    if student_neg.dim() not in (1, 2) or student_neg.shape[0] != student_pos.shape[0]:
        raise ValueError(
            f"negative scores must have shape (B,) or (B, N) with B = {student_pos.shape[0]}, "
            f"got {tuple(student_neg.shape)}"
        )
    s_pos, t_pos = student_pos.float(), teacher_pos.float()
    if student_neg.dim() == 2:
        s_pos, t_pos = s_pos.unsqueeze(-1), t_pos.unsqueeze(-1)
    sq = ((s_pos - student_neg.float()) - (t_pos - teacher_neg.float())).square()
    per_query = sq.mean(-1) if sq.dim() == 2 else sq
    if reduction == "none":
        return per_query
    if reduction == "sum":
        return per_query.sum()
    return per_query.mean() if per_query.numel() else per_query.sum() * 0


def listwise_kl(
    student_scores: Tensor,
    teacher_scores: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
) -> Tensor:
    """Listwise KL over each query's candidates, KL(softmax(t/T) ‖ softmax(s/T)).

    RocketQAv2 (Ren et al. 2021, "RocketQAv2: A Joint Training Method for Dense Passage Retrieval and
    Passage Re-ranking") / sentence-transformers' DistillKLDivLoss. Scores are `(B, N)` (N candidates per
    query). `mask` is either `(B, N)` (candidate validity: invalid candidates leave both softmaxes; a
    query with no valid candidate is not counted) or `(B,)` (query validity). "mean" averages over counted
    queries. sentence-transformers always multiplies by T²; here only with `scale_t2=True`.
    Defaults: temperature=1.0, reduction="mean", scale_t2=False.
    """
    check_same_shape(student_scores, teacher_scores, "scores")
    row_mask = mask
    if mask is not None and student_scores.dim() > 0 and mask.shape == student_scores.shape:
        if mask.is_floating_point():
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        valid = mask.to(device=student_scores.device, dtype=torch.bool)
        student_scores = student_scores.masked_fill(~valid, float("-inf"))
        teacher_scores = teacher_scores.masked_fill(~valid, float("-inf"))
        row_mask = valid.any(-1)
    return forward_kl(
        student_scores,
        teacher_scores,
        temperature=temperature,
        mask=row_mask,
        reduction=reduction,
        scale_t2=scale_t2,
    )
