"""DistillWeighted's multi-source loss: a weighted sum of per-source KL terms, one student head per source.

Borup, Phoo & Hariharan 2023, "Distilling from Similar Tasks for Transfer Learning on a Budget" (ICCV):

    L = Σ_s w_s · KL(p_t^s ‖ p_s^s),   p^s = softmax(z^s / T)

where z_t^s are source s's target-head logits h_s(φ_s(x)), z_s^s the student's head s, and w the similarity
weights (softmax of the sources' task-similarity scores, `potstill.teachers.zoo.similarity_weights`; they
sum to 1). With one weight of 1 it is DistillNearest's KD term. Defaults: temperature=1.0, reduction="mean"
(each KL averaged over rows before weighting).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from potstill.losses.divergences import forward_kl


def weighted_multi_teacher_kl(student_logits: Sequence[Tensor] | Tensor, teacher_logits: Sequence[Tensor] | Tensor,
                              weights: Tensor, *, temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Σ_s w_s · KL(teacher_s ‖ student_s) over S sources; logits per source are (N, C_s) tensors (a list, or
    one (S, N, C) tensor when all sources share C). `reduction` as in `forward_kl` ("none" gives (S, N))."""
    students, teachers = list(student_logits), list(teacher_logits)
    if len(students) != len(teachers) or len(students) != weights.numel():
        raise ValueError(f"weighted_multi_teacher_kl: {len(students)} student heads, {len(teachers)} teachers and "
                         f"{weights.numel()} weights must be equal in number")
    pairs = zip(students, teachers, strict=True)
    terms = [forward_kl(s, t, temperature=temperature, reduction=reduction) for s, t in pairs]
    w = weights.to(torch.float32)
    if reduction == "none":
        return torch.stack(terms) * w[:, None]
    return (torch.stack(terms) * w).sum()
