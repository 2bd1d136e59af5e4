"""Embedding distillation: match the teacher's vectors `(B, D)` (or `(..., D)`), one row per leading position.

`mask` (bool, shape `[...]`, True = counted) selects rows; "mean" averages over counted rows (0 when
none), "sum" sums them, "none" returns per-row values of shape `[...]` with 0 at masked rows. Computed in
float32, returned as float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._rows import rowwise


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
