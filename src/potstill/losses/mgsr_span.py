"""MGSR's span-level objective: probability-correlation matching within spans.

Paper: Liu et al. 2024, "Multi-Granularity Semantic Revision for Large Language Model Distillation" (MGSR,
arXiv 2407.10068), the span level of its three. No official code; this is our reading of the method.

Token-level losses treat each position alone. Within a span (a word, a phrase, a fixed chunk) the positions
predict related tokens, and how the teacher's next-token distributions relate to each other is itself
knowledge. For a span of n counted positions with teacher probability vectors p_1..p_n and student vectors
q_1..q_n (softmax(z / T) over the vocabulary), the two n × n correlation matrices G^T_ij = p_i·p_j and
G^S_ij = q_i·q_j are compared by squared L2. Per counted row i of a span of size n:

    value_i = (1/n) Σ_j (q_i·q_j − p_i·p_j)²,   so a span adds (1/n)·‖G^S − G^T‖²_F over its rows

and reduction "mean" divides the sum by the number of counted rows (the loop's convention), "none" gives the
per-row values (0 at rows not counted). The loss is 0 when the student's distributions equal the teacher's.

Spans: `span_ids` (`[B, T]` integers, equal ids in a sequence = one span, negative = in no span) when given,
e.g. words from `potstill.data.mgsr_scrg.word_span_ids`; otherwise consecutive chunks of `span_length`
counted positions of each sequence (the last one shorter). MGSR weighs it into L = L_DAC-KL + λ·L_span
(+ an LM loss); the weight λ is the objective's `weight` in a recipe. Defaults (ours): span_length 8,
temperature 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._rows import check_reduction, check_temperature, resolve_mask


def fixed_span_ids(keep: Tensor, span_length: int) -> Tensor:
    """`[B, T]` span ids: the counted positions (`keep`, bool) of each sequence cut into consecutive chunks of
    `span_length`; -1 where not counted."""
    rank = keep.long().cumsum(-1) - 1
    return torch.where(keep, torch.div(rank, span_length, rounding_mode="floor"), torch.full_like(rank, -1))


def span_correlation(student_logits: Tensor, teacher_logits: Tensor, *, span_length: int = 8,
                     temperature: float = 1.0, span_ids: Tensor | None = None, mask: Tensor | None = None,
                     labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """MGSR's span correlation loss on `[B, T, V]` logits (see the module docstring), float32 inside."""
    check_reduction(reduction)
    temperature = check_temperature(temperature)
    if isinstance(span_length, bool) or not isinstance(span_length, int) or span_length < 1:
        raise ValueError(f"span_length must be an int >= 1, got {span_length!r}")
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"span_correlation needs [B, T, V] student and teacher logits of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    rows = student_logits.shape[:-1]
    keep = resolve_mask(rows, mask, labels, student_logits.device)
    keep = torch.ones(rows, dtype=torch.bool, device=student_logits.device) if keep is None else keep
    if span_ids is None:
        spans = fixed_span_ids(keep, span_length)
    else:
        if span_ids.shape != rows:
            raise ValueError(f"span_ids must have shape {tuple(rows)}, got {tuple(span_ids.shape)}")
        spans = torch.where(keep, span_ids.to(keep.device).long(), torch.full_like(span_ids.long(), -1))
    b_idx, t_idx = (spans >= 0).nonzero(as_tuple=True)
    values = student_logits.new_zeros(rows, dtype=torch.float32)
    if b_idx.numel():
        # one key per (sequence, span); positions grouped by key into a padded [S, L] index
        key = b_idx * (int(spans.max()) + 1) + spans[b_idx, t_idx]
        _, group = torch.unique(key, return_inverse=True)
        order = torch.argsort(group * rows[1] + t_idx)
        group, b_idx, t_idx = group[order], b_idx[order], t_idx[order]
        sizes = torch.bincount(group)
        starts = torch.cumsum(sizes, 0) - sizes
        slot = torch.arange(group.numel(), device=group.device) - starts[group]
        width = int(sizes.max())
        p = torch.softmax(teacher_logits[b_idx, t_idx].float() / temperature, -1)
        q = torch.softmax(student_logits[b_idx, t_idx].float() / temperature, -1)
        padded_p = p.new_zeros(sizes.numel(), width, p.shape[-1]).index_put((group, slot), p)
        padded_q = q.new_zeros(sizes.numel(), width, q.shape[-1]).index_put((group, slot), q)
        gram_diff = padded_q @ padded_q.transpose(1, 2) - padded_p @ padded_p.transpose(1, 2)
        per_row = (gram_diff ** 2).sum(-1)[group, slot] / sizes[group].float()
        values = values.index_put((b_idx, t_idx), per_row)
    if reduction == "none":
        return values
    total = values.sum()
    return total if reduction == "sum" else total / keep.sum().clamp(min=1)
