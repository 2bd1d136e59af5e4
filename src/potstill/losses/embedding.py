"""Embedding distillation: match the teacher's vectors `(B, D)` (or `(..., D)`), one row per leading position,
or (`embedding_similarity_kl`) the teacher's in-batch similarity distributions, one per row of a `(B, D)` batch.

`mask` (bool, shape `[...]`, True = counted) selects rows; "mean" averages over counted rows (0 when
none), "sum" sums them, "none" returns per-row values of shape `[...]` with 0 at masked rows. Computed in
float32, returned as float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import check_reduction, check_temperature, reduce_rows, resolve_mask, rowwise


def _check_dims(student_emb: Tensor, teacher_emb: Tensor) -> None:
    if student_emb.dim() and teacher_emb.dim() and student_emb.shape[-1] != teacher_emb.shape[-1]:
        raise ValueError(
            f"student embedding dimension {student_emb.shape[-1]} != teacher embedding dimension "
            f"{teacher_emb.shape[-1]} (student {tuple(student_emb.shape)}, teacher "
            f"{tuple(teacher_emb.shape)}); a projection is needed to map the student's embeddings to the "
            "teacher's dimension"
        )


def _difference_rows(op, normalize: bool):
    """Per row mean over the last axis of op(s − t) (both L2-normalised first when `normalize`)."""

    def rows(s: Tensor, t: Tensor) -> Tensor:
        s, t = s.float(), t.float()
        if normalize:
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        return op(s - t).mean(-1)

    return rows


def _mse_rows(normalize: bool):
    return _difference_rows(Tensor.square, normalize)


def _cosine_rows(s: Tensor, t: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(s.float(), t.float(), dim=-1)


def embedding_mse(
    student_emb: Tensor,
    teacher_emb: Tensor,
    *,
    normalize: bool = False,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Embedding MSE, per row (1/D) Σ (s − t)² (both L2-normalised first when `normalize`).

    Reimers & Gurevych 2020, "Making Monolingual Sentence Embeddings Multilingual using Knowledge
    Distillation". "mean" over rows equals `nn.MSELoss()` over all B·D entries (sentence-transformers'
    MSELoss). Different D for student and teacher is an error: add a projection.
    Defaults: normalize=False, reduction="mean".
    """
    _check_dims(student_emb, teacher_emb)
    return rowwise(
        _mse_rows(normalize), student_emb, teacher_emb, mask=mask, reduction=reduction, what="embeddings"
    )


def embedding_cosine(
    student_emb: Tensor,
    teacher_emb: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cosine embedding loss, per row 1 − cos(s, t), in [0, 2].

    The cosine embedding loss used by DistilBERT (Sanh et al. 2019, "DistilBERT, a distilled version of
    BERT: smaller, faster, cheaper and lighter") on hidden states. Different D is an error: add a projection.
    Defaults: reduction="mean".
    """
    _check_dims(student_emb, teacher_emb)
    return rowwise(_cosine_rows, student_emb, teacher_emb, mask=mask, reduction=reduction, what="embeddings")


def _similarity_kl_rows(
    s: Tensor, t: Tensor, student_temperature: float, teacher_temperature: float, exclude_diagonal: bool,
    cross: bool,
) -> Tensor:
    """KL(p_i ‖ q_i) for each of the `(n, ·)` rows, over the n in-batch columns (n − 1 without the diagonal)."""
    s, t = F.normalize(s.float(), dim=-1), F.normalize(t.float(), dim=-1)
    teacher_sim = t @ t.T
    student_sim = s @ (t if cross else s).T
    n = s.shape[0]
    if exclude_diagonal:
        if n < 2:  # no other row to compare with
            return s.sum(-1) * 0.0
        off = ~torch.eye(n, dtype=torch.bool, device=s.device)
        teacher_sim, student_sim = teacher_sim[off].view(n, n - 1), student_sim[off].view(n, n - 1)
    log_p = torch.log_softmax(teacher_sim / teacher_temperature, dim=-1)
    log_q = torch.log_softmax(student_sim / student_temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def embedding_similarity_kl(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 0.05,
    teacher_temperature: float | None = None,
    exclude_diagonal: bool = False,
    cross: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Relational embedding distillation: the student copies the teacher's in-batch similarity distribution.

    Fang et al. 2021, "SEED: Self-supervised Distillation for Visual Representation" (ICLR). For a batch of B
    vectors (`(B, D_s)` student, `(B, D_t)` teacher, each L2-normalised here), row i's teacher distribution is
    p_i = softmax_j(cos(t_i, t_j) / τ_t) and the student's is q_i = softmax_j(cos(s_i, s_j) / τ_s); the loss of
    row i is KL(p_i ‖ q_i). Both are B × B, so the two widths may differ (no projection needed).
    `cross=True` is SEED's own form, q_i = softmax_j(cos(s_i, t_j) / τ_s): the student's vector is scored
    against the teacher's vectors, which needs D_s == D_t (the embedding task adds a learned projection when
    the student is narrower; in the default form that projection is harmless, the B × B matrices being
    width-free).

    The diagonal (each row's similarity to itself, its largest entry; SEED's queue holds the instance itself)
    is a column by default; `exclude_diagonal=True` leaves it out (n − 1 columns; a batch of one counted row
    then gives 0). `mask` (bool `[B]`, True = counted) drops rows entirely: a masked row is neither a row nor a
    column of anyone's distribution. "mean" averages the counted rows' KL (0 when none), "sum" adds them,
    "none" gives `[B]` with 0 at masked rows. Float32 maths.

    Defaults: temperature (τ_s) = 0.05, teacher_temperature (τ_t) = None (= τ_s), exclude_diagonal=False,
    cross=False, reduction="mean". The official SEED code uses τ_s = 0.2 (0.07 in its model's default) and
    τ_t = 1e-4 over a 65 536-vector queue; a τ_t that small makes p_i one-hot on row i's own entry, so SEED's
    loss is in effect "find the teacher's own vector among the queue". Here the columns are only the B batch
    rows, and in the default (student–student) form the student's own diagonal is always cos = 1: a one-hot p_i
    would carry no teacher knowledge, only push the student's vectors apart. Equal, moderate temperatures keep
    the teacher's neighbour structure in p_i. To reproduce SEED, use cross=True, temperature=0.2,
    teacher_temperature=1e-4.
    """
    student_temperature = check_temperature(temperature)
    teacher_t = student_temperature if teacher_temperature is None else check_temperature(teacher_temperature)
    check_reduction(reduction)
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"embedding_similarity_kl needs (B, D) student and teacher embeddings, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must hold the same batch of rows, got {student.shape[0]} and {teacher.shape[0]}"
        )
    if cross and student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"cross=True scores the student's vectors against the teacher's, so the widths must match: student "
            f"{student.shape[-1]} != teacher {teacher.shape[-1]}; add a projection or use cross=False (the "
            "width-free student–student form)"
        )
    row_shape = student.shape[:1]
    row_mask = resolve_mask(row_shape, mask, None, student.device)
    idx = None
    if row_mask is not None and not bool(row_mask.all()):
        idx = row_mask.nonzero().squeeze(1)
        student, teacher = student.index_select(0, idx), teacher.index_select(0, idx.to(teacher.device))
    values = _similarity_kl_rows(
        student, teacher.to(student.device), student_temperature, teacher_t, exclude_diagonal, cross
    )
    return reduce_rows(values, idx, row_shape, reduction)
