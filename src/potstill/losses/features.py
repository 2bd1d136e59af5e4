"""Hidden-state distillation: match the teacher's intermediate representations token by token.

Inputs are `[..., D]` hidden states of one student layer and its mapped teacher layer (the student's already
projected to the teacher's width when they differ); every leading position (a token) is a row. `mask` (bool,
shape `[...]`, True = counted, e.g. the attention mask) selects the rows; `reduction` is "mean" (over counted
rows), "sum" or "none" as everywhere in `potstill.losses`. Computed in float32, returned as float32.

Which layers are compared, and the projections, are the business of the objective modules in
`potstill.losses.intermediate`; the functions here compare one pair of tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._rows import check_reduction, resolve_mask, rowwise
from .embedding import _check_dims, _cosine_rows, _difference_rows, _mse_rows


def _per_token(rows_fn, student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None,
               reduction: str) -> Tensor:
    _check_dims(student_hidden, teacher_hidden)
    return rowwise(rows_fn, student_hidden, teacher_hidden, mask=mask, reduction=reduction, what="hidden states")


def hidden_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Hidden-state MSE, per token (1/D) Σ_d (h_s − h_t)².

    The intermediate loss of TinyBERT (Jiao et al. 2020) and of the "hidden MSE" of TextBrewer / DistillKit:
    "mean" over counted tokens equals `nn.MSELoss()` over every counted entry. Defaults: reduction="mean".
    """
    return _per_token(_mse_rows(False), student_hidden, teacher_hidden, mask, reduction)


def hidden_cosine(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Hidden-state cosine loss, per token 1 − cos(h_s, h_t), in [0, 2].

    DistilBERT's cosine loss on hidden states (Sanh et al. 2019). Scale-invariant per token.
    Defaults: reduction="mean".
    """
    return _per_token(_cosine_rows, student_hidden, teacher_hidden, mask, reduction)


def squarehead(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: str = "second_moment",
    eps: float = 1e-8,
) -> Tensor:
    """SquareHead: hidden-state MSE normalised by the teacher's statistic of the same layer.

    Kurtic et al. 2023, "Sparse Finetuning for Inference Acceleration of Large Language Models" (code:
    IST-DASLab/SparseFinetuning). Per token: (1/D) Σ_d (h_s − h_t)² / (c_t + eps), where c_t is computed
    over the counted tokens of this call: `normalizer="second_moment"` c_t = mean(h_t²) (as the code does),
    `"variance"` c_t = the variance of the teacher's entries (as the paper writes it). "mean" over counted
    tokens is then mean((h_s − h_t)²) / c_t: invariant to scaling both states by the same factor, 0 for a
    copy of the teacher. The statistic is taken per call (per micro-batch), is a constant for the gradient,
    and the per-layer values are summed by the objective (SquareHead sums over layers, it does not average).
    Defaults: reduction="mean", normalizer="second_moment", eps=1e-8.
    """
    _check_dims(student_hidden, teacher_hidden)
    check_reduction(reduction)
    if normalizer not in ("second_moment", "variance"):
        raise ValueError(f"normalizer must be 'second_moment' or 'variance', got {normalizer!r}")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    rows = resolve_mask(teacher_hidden.shape[:-1], mask, None, teacher_hidden.device)
    with torch.no_grad():
        t = teacher_hidden.detach().float()
        counted = t if rows is None else t[rows]
        if counted.numel() == 0:
            stat = torch.ones((), device=t.device)
        elif normalizer == "second_moment":
            stat = counted.square().mean()
        else:
            stat = counted.var(unbiased=False)
    scale, mse = 1.0 / (stat + eps), _mse_rows(False)

    def normalized_mse(s: Tensor, t: Tensor) -> Tensor:
        return mse(s, t) * scale

    return _per_token(normalized_mse, student_hidden, teacher_hidden, mask, reduction)


def feature_l1(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    normalize: bool = True,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Feature alignment, per token (1/D) Σ_d |ℓ2n(h_s) − ℓ2n(h_t)| (ℓ2n = L2-normalised; raw with
    `normalize=False`).

    DMAE's alignment loss (Bai et al. 2023, "Masked Autoencoders Enable Efficient Knowledge Distillers"; code
    UCSC-VLAA/DMAE, `forward_distillation_loss_embedding`): the mean absolute difference between the
    normalised teacher feature and the (projected) student feature. Defaults: normalize=True, reduction="mean".
    """
    return _per_token(_difference_rows(Tensor.abs, normalize), student_hidden, teacher_hidden, mask, reduction)
