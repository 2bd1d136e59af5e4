"""Self-attention distillation: match the teacher's attention distributions and token relations.

A relation is a scaled dot product between the tokens of one sequence, split into heads:
`relation_logits(x, y, heads)` turns `[B, T, D]` projections (the heads concatenated, as a model's query /
key / value Linear layers output them) into `[B, heads, T, T]` logits x_a·y_aᵀ/√(D/heads). With x = queries
and y = keys these are a layer's attention scores (MiniLM's L_AT, TinyBERT's attention matrices); with
x = y = values, MiniLM's value relation; MiniLMv2 uses q-q, k-k and v-v with a chosen number of relation
heads, so teacher and student head counts may differ.

`mask` is the `[B, T]` attention mask (True / 1 = a real token): padded keys are left out of every softmax
and padded queries do not count. A row is one (example, head, query token); "mean" averages over counted
rows, i.e. over heads and real tokens, as MiniLM's 1/(A_h·|x|). Computed in float32, returned as float32.

Here: the relations and TinyBERT's `attention_mse` on them; MiniLM's and MiniLMv2's KL over relations is
`potstill.losses.minilm`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._rows import check_reduction, rowwise


def relation_logits(x: Tensor, y: Tensor | None = None, *, heads: int) -> Tensor:
    """`[B, heads, T, T]` scaled dot products x_a·y_aᵀ/√d_r of `[B, T, D]` inputs split into `heads` parts of
    d_r = D / heads (y = x when None). float32."""
    y = x if y is None else y
    if x.dim() != 3 or y.shape != x.shape:
        raise ValueError(f"relation inputs must both be [B, T, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or x.shape[-1] % heads:
        raise ValueError(f"heads must be a positive int dividing the width {x.shape[-1]}, got {heads!r}")
    b, t, d = x.shape
    xs = x.float().reshape(b, t, heads, d // heads).transpose(1, 2)
    ys = y.float().reshape(b, t, heads, d // heads).transpose(1, 2)
    return xs @ ys.transpose(-1, -2) / math.sqrt(d // heads)


def _check_relations(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor | None:
    if student.dim() != 4 or student.shape != teacher.shape or student.shape[-1] != student.shape[-2]:
        raise ValueError(f"relations must be [B, heads, T, T] of one shape, got student {tuple(student.shape)} "
                         f"and teacher {tuple(teacher.shape)}")
    if mask is None:
        return None
    b, _, t, _ = student.shape
    if mask.shape != (b, t):
        raise ValueError(f"mask must be the [B, T] = {(b, t)} attention mask, got {tuple(mask.shape)}")
    return mask.to(device=student.device, dtype=torch.bool)


def _masked_mse_rows(s: Tensor, parts: tuple[Tensor, ...]) -> Tensor:
    t, keys = parts
    diff = (s.float() - t.float()).masked_fill_(~keys, 0.0)
    return diff.square().sum(-1) / keys.sum(-1).clamp_min(1)


def attention_mse(
    student_scores: Tensor,
    teacher_scores: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """MSE between attention scores (pre-softmax logits `[B, H, T, T]`), per row the mean over real keys.

    TinyBERT's attention loss (Jiao et al. 2020, `task_distill.py`), which compares the unnormalised scores
    with the masked positions zeroed; here masked keys are left out of each row's mean and padded queries do
    not count, so padding does not dilute the loss. Needs equal head counts. Defaults: reduction="mean".
    """
    check_reduction(reduction)
    keep = _check_relations(student_scores, teacher_scores, mask)
    b, h, t, _ = student_scores.shape
    if keep is None:
        keep = torch.ones(b, t, dtype=torch.bool, device=student_scores.device)
    keys = keep[:, None, None, :].expand(b, h, t, t)
    rows = keep[:, None, :].expand(b, h, t)
    return rowwise(_masked_mse_rows, student_scores, (teacher_scores, keys), mask=rows, reduction=reduction,
                   what="attention scores")
