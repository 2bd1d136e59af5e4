"""The ranking task's objectives: which part of `RankingScores` each loss of `potstill.losses` reads.

- Score losses (`margin_mse`, `listwise_kl`, `pointwise_mse`) compare the (B, 1 + N) candidate scores, the
  positive first (`margin_mse`: the positive against every negative, `margin_mse_over_candidates`);
  `in_batch_margin_mse` compares the (B, B) in-batch matrices under the student's in-batch mask.
- `sparse_flops` regularises the student's own term weights (`query_terms`, `passage_terms`).
- The hard-label loss is contrastive cross-entropy with the positive as the class (`contrastive_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from potstill.losses import margin_mse
from potstill.losses.ranking import SparseFlops
from potstill.signals import RankingScores


def margin_mse_over_candidates(student_scores: Tensor, teacher_scores: Tensor, *,
                               reduction: str = "mean") -> Tensor:
    """`margin_mse` on (B, 1 + N) candidate scores whose first column is the positive."""
    if student_scores.dim() != 2 or student_scores.shape[1] < 2:
        raise ValueError(f"candidate scores must have shape (B, 1 + N) with N ≥ 1, got {tuple(student_scores.shape)}")
    return margin_mse(student_scores[:, 0], student_scores[:, 1:], teacher_scores[:, 0], teacher_scores[:, 1:],
                      reduction=reduction)


class ScoresObjective:
    """A score loss of `potstill.losses` applied to one part of `RankingScores`: the candidates, or (for
    `in_batch_margin_mse`) the in-batch matrix with its mask."""

    def __init__(self, name: str, fn: Callable[..., Tensor]) -> None:
        self.name, self.in_batch = name, name == "in_batch_margin_mse"
        self.fn = margin_mse_over_candidates if name == "margin_mse" else fn

    def __call__(self, student: RankingScores, teacher: RankingScores, **kwargs: Any) -> Tensor:
        if self.in_batch:
            if student.in_batch is None or teacher.in_batch is None:
                raise RuntimeError("in_batch_margin_mse got no in-batch scores; the ranking task computes them "
                                   "when the recipe lists this objective")
            return self.fn(student.in_batch, teacher.in_batch, mask=student.in_batch_mask, **kwargs)
        return self.fn(student.candidates, teacher.candidates, **kwargs)


class RankingSparseFlops(SparseFlops):
    """`sparse_flops` on the ranking signal: the student's term weights, B = its number of queries."""

    def forward(self, student: RankingScores, teacher: RankingScores | None = None, *,  # type: ignore[override]
                mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
        return super().forward(student.passage_terms, student.query_terms, queries=student.candidates.shape[0],
                               reduction=reduction)


def adapt_ranking_objective(name: str, fn: Any) -> Any:
    """The loss the loop calls for objective `name` on the ranking task's signals. A stateful objective (a
    class the loop instantiates) is returned as is, `SparseFlops` as `RankingSparseFlops`."""
    if isinstance(fn, type):
        return RankingSparseFlops if issubclass(fn, SparseFlops) else fn
    return ScoresObjective(name, fn)


def contrastive_loss(scores: RankingScores, *, scale: float, in_batch_negatives: bool) -> Tensor:
    """Summed cross-entropy of scale × the candidate scores, the positive (column 0) as the class; with
    `in_batch_negatives`, the other queries' positives of the batch (those the in-batch mask keeps) join the
    candidates."""
    logits = scores.candidates.float()
    if in_batch_negatives:
        others = scores.in_batch_mask & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        logits = torch.cat([logits, scores.in_batch.float().masked_fill(~others, float("-inf"))], dim=1)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return nn.functional.cross_entropy(logits * scale, target, reduction="sum")
