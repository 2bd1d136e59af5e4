"""ULD and GOLD's hybrid against a top-k teacher (a cached cross-tokenizer teacher, `TopKTeacher`).

A cache keeps, per aligned span, the teacher's k most likely ids, their log-probs and the log of the mass left
outside them (the tail). These forms compare the student with the full teacher vector that this stands for:
the k probabilities at their ids and the tail mass shared evenly by the other V_t − k ids (`spread_tail`
builds it), so they equal `uld` / `gold` (`potstill.losses.uld`) on that vector, and on the live teacher when
k = V_t. They never build the V_t-wide vector: the even share is one number per row, so the sorted L1 needs the
k cached entries and at most as many copies of the share as the narrower side is wide, and the matched JSD
needs the share and the k entries placed among the M matched ids. A span merged from several teacher tokens
passes its log factor as `teacher_log_scale`, as in `uld`.

Temperature: the cached log-probs were taken at the cache's temperature, so `temperature` divides the student's
logits only (the caller checks that the cache's temperature is the objective's teacher temperature).

Arguments as `uld` / `gold`, except `teacher` (a `TopKTeacher` with rows `[...]`, log-probs normalised over
the full vocabulary) and `teacher_vocab` (V_t). Float32 throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import check_temperature, rowwise
from .sparse import TopKTeacher
from .uld import gold_settings, matched_jsd, sorted_l1

__all__ = ["check_topk_teacher", "gold_topk", "share_log", "spread_tail", "uld_topk"]


def share_log(tail: Tensor, k: int, vocab: int) -> Tensor:
    """The log of each of the other vocab − k ids' even share of the `tail` mass (−inf when k = vocab)."""
    return tail - math.log(vocab - k) if k < vocab else torch.full_like(tail, -math.inf)


def spread_tail(ids: Tensor, logprobs: Tensor, tail: Tensor, vocab: int) -> Tensor:
    """`[n, vocab]` log-probs from top-k rows (`ids`, `logprobs` `[n, k]`, log `tail` mass `[n]`): the k
    log-probs at their ids and the tail mass shared evenly by the other vocab − k ids."""
    dense = share_log(tail, ids.shape[-1], vocab)[:, None].expand(len(ids), vocab).contiguous()
    return dense.scatter_(1, ids, logprobs)


def _spread_top(kept: Tensor, n_kept: Tensor, share: Tensor, size: int, width: int) -> tuple[Tensor, Tensor]:
    """The `width` largest entries (descending) and the rest mass of a teacher vector of `size` entries: the
    `kept` probabilities `[n, k]` (0 where not part of it; `n_kept` per row are) and `size − n_kept` copies of
    `share` `[n]`. At most `width` copies can reach the top, so no more are built."""
    copies = min(size, width)
    present = torch.arange(copies, device=share.device)[None, :] < (size - n_kept)[:, None]
    candidates = torch.cat([kept, share[:, None] * present], dim=1)
    top = candidates.topk(width, dim=-1, sorted=True).values
    total = kept.sum(-1) + share * (size - n_kept)
    return top, (total - top.sum(-1)).clamp_min(0.0)


def _l1_to_spread(p_s: Tensor, kept: Tensor, n_kept: Tensor, share: Tensor, size: int) -> Tensor:
    """`sorted_l1(p_s, t)` where t is the spread teacher vector of `_spread_top`, per row."""
    width = min(p_s.shape[-1], size)
    t_top, t_rest = _spread_top(kept, n_kept, share, size, width)
    if p_s.shape[-1] == width:
        return (p_s.sort(dim=-1, descending=True).values - t_top).abs().sum(-1) + t_rest
    return sorted_l1(p_s, t_top) + t_rest  # the student is wider: its top `width` against t_top, plus its rest


def check_topk_teacher(student_logits: Tensor, teacher: TopKTeacher, teacher_vocab: int,
                       scales: dict[str, Tensor | None]) -> None:
    """A `TopKTeacher` with the student's row shape, k ≤ `teacher_vocab`, and each of `scales` of that shape."""
    if not isinstance(teacher, TopKTeacher):
        raise TypeError(f"teacher must be a TopKTeacher, got {type(teacher).__name__}")
    if teacher.shape != student_logits.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and the top-k teacher's rows "
                         f"{tuple(teacher.shape)} must have the same row shape")
    if not isinstance(teacher_vocab, int) or not teacher.k <= teacher_vocab:
        raise ValueError(f"teacher_vocab must be an int >= k = {teacher.k}, got {teacher_vocab!r}")
    for name, scale in scales.items():
        if scale is not None and scale.shape != teacher.shape:
            raise ValueError(f"{name} must have the row shape {tuple(teacher.shape)}, got {tuple(scale.shape)}")


def _topk_rows(per_row, student_logits: Tensor, teacher: TopKTeacher, teacher_vocab: int, *, temperature: float,
               student_log_scale: Tensor | None, teacher_log_scale: Tensor | None, mask: Tensor | None,
               labels: Tensor | None, reduction: str, chunk_size: int | None) -> Tensor:
    temperature = check_temperature(temperature)
    check_topk_teacher(student_logits, teacher, teacher_vocab,
                       {"student_log_scale": student_log_scale, "teacher_log_scale": teacher_log_scale})
    zeros = torch.zeros(teacher.shape, dtype=torch.float32, device=student_logits.device)
    t_scale = zeros if teacher_log_scale is None else teacher_log_scale.float()
    s_scale = zeros if student_log_scale is None else student_log_scale.float()
    tail_share = share_log(teacher.tail().float(), teacher.k, teacher_vocab)

    def rows(s: Tensor, packed: tuple[Tensor, ...]) -> Tensor:
        ids, logprobs, share_lp, t_sc, s_sc = packed
        p_s = (F.log_softmax(s.float() / temperature, dim=-1) + s_sc[:, None]).exp()
        return per_row(p_s, ids, (logprobs.float() + t_sc[:, None]).exp(), (share_lp + t_sc).exp())

    packed = (teacher.ids, teacher.logprobs, tail_share, t_scale, s_scale)
    return rowwise(rows, student_logits, packed, mask=mask, labels=labels, reduction=reduction,
                   chunk_size=chunk_size)


def uld_topk(
    student_logits: Tensor,
    teacher: TopKTeacher,
    *,
    teacher_vocab: int,
    temperature: float = 1.0,
    student_log_scale: Tensor | None = None,
    teacher_log_scale: Tensor | None = None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """`uld` against a top-k teacher: Σ_k |sort↓(p_s)_k − sort↓(p_t)_k| per row, p_t the k cached probabilities
    with the tail mass shared evenly by the other V_t − k ids. Boizard et al. 2024 (ULD).
    Defaults: temperature=1.0 (the student's), reduction="mean", chunk_size=None."""

    def per_row(p_s: Tensor, ids: Tensor, top: Tensor, share: Tensor) -> Tensor:
        n_kept = torch.full_like(share, float(top.shape[-1]))
        return _l1_to_spread(p_s, top, n_kept, share, teacher_vocab)

    return _topk_rows(per_row, student_logits, teacher, teacher_vocab, temperature=temperature,
                      student_log_scale=student_log_scale, teacher_log_scale=teacher_log_scale, mask=mask,
                      labels=labels, reduction=reduction, chunk_size=chunk_size)


def gold_topk(
    student_logits: Tensor,
    teacher: TopKTeacher,
    *,
    teacher_vocab: int,
    matched_ids: Tensor | None = None,
    beta: float = 0.5,
    matched_weight: float | None = None,
    temperature: float = 1.0,
    student_log_scale: Tensor | None = None,
    teacher_log_scale: Tensor | None = None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """`gold` against a top-k teacher: w·JSD_β on the matched ids + (1 − w)·sorted L1 on the rest of each
    vocabulary, the teacher vector being the k cached probabilities with the tail mass shared evenly by the
    other V_t − k ids. TRL `GOLDTrainer` (`uld_use_hybrid_loss=True`).
    Defaults: beta=0.5, matched_weight=None (M / V_t), temperature=1.0, reduction="mean", chunk_size=None."""
    v_s = student_logits.shape[-1]
    beta, matched_ids, w = gold_settings(beta, matched_weight, matched_ids, v_s, teacher_vocab)
    device = student_logits.device
    n_matched = len(matched_ids)
    s_matched = matched_ids[:, 1].to(device)
    where = torch.full((teacher_vocab,), n_matched, dtype=torch.long, device=device)  # teacher id → its pair
    where[matched_ids[:, 0].to(device)] = torch.arange(n_matched, device=device)
    s_rest = torch.ones(v_s, dtype=torch.bool, device=device).index_fill_(0, s_matched, False)
    t_rest_size = teacher_vocab - n_matched

    def per_row(p_s: Tensor, ids: Tensor, top: Tensor, share: Tensor) -> Tensor:
        pair = where[ids]  # n_matched for an unmatched id
        value = p_s.new_zeros(p_s.shape[0])
        if n_matched:
            t_matched = share[:, None].expand(len(share), n_matched + 1).clone()
            t_matched.scatter_(1, pair, top)  # column n_matched collects the unmatched ids, then is dropped
            value = value + w * matched_jsd(p_s[:, s_matched], t_matched[:, :n_matched], beta)
        if t_rest_size and bool(s_rest.any()):
            unmatched = pair == n_matched
            kept = top * unmatched
            value = value + (1 - w) * _l1_to_spread(p_s[:, s_rest], kept, unmatched.sum(-1).float(), share,
                                                    t_rest_size)
        return value

    return _topk_rows(per_row, student_logits, teacher, teacher_vocab, temperature=temperature,
                      student_log_scale=student_log_scale, teacher_log_scale=teacher_log_scale, mask=mask,
                      labels=labels, reduction=reduction, chunk_size=chunk_size)

