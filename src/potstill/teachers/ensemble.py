"""Ensembles of teachers: combine the signals of several teachers into one target.

Pure torch; nothing here imports the rest of potstill.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["minmax_ensemble", "minmax_normalize", "source_scales", "weighted_concatenation"]


def minmax_normalize(scores: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Per-query min–max normalisation of `[..., N]` scores to [0, 1]: (S − min) / (max − min) per row.

    The min and max are taken over each row's valid candidates only (`mask`, same shape, True = valid);
    invalid candidates come out as 0. A row whose valid scores are all equal (or that has no valid
    candidate) comes out as 0 everywhere, without NaN. Float32.
    """
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension (the candidate axis), got a scalar")
    s = scores.float()
    if mask is None:
        valid = torch.ones_like(s, dtype=torch.bool)
    else:
        if mask.shape != scores.shape:
            raise ValueError(f"mask must have the scores' shape {tuple(scores.shape)}, got {tuple(mask.shape)}")
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"mask must be a bool (or integer 0/1) tensor, got {mask.dtype}")
        valid = mask.to(device=s.device, dtype=torch.bool)
    if s.shape[-1] == 0:
        return s.clone()
    s = s.masked_fill(~valid, 0.0)  # whatever padding held (±inf, NaN) leaves values and gradients alone
    lo = s.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    hi = s.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    span = hi - lo
    spread = valid.any(-1, keepdim=True) & (span > 0)
    out = (s - torch.where(spread, lo, 0.0)) / torch.where(spread, span, 1.0)
    return torch.where(valid & spread, out, 0.0)


def minmax_ensemble(
    scores_list: Sequence[Tensor],
    *,
    mask: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Heterogeneous teacher ensemble: scale · mean_k minmax(S_k), each teacher normalised per query first.

    Geng et al. 2024, "Towards Competitive Search Relevance For Inference-Free Learned Sparse Retrievers"
    (arXiv 2411.04403): dense and sparse siamese teachers score on different scales, so each teacher's
    `(B, N)` (or `[..., N]`) scores are min–max normalised over each query's candidates,
    Ŝ_k = (S_k − min_row) / (max_row − min_row), and the Ŝ_k are averaged. The result is invariant to any
    positive affine change a·S_k + b (a > 0) of one teacher's scores for one query. With scale = 1 it lies
    in [0, 1]; the official code multiplies by a score scale (30 in its KD demo) before a softmax-KL loss
    (scripts/train/bi_encoder_wrapper.py, `get_scores_batch`). `mask` (same shape, True = valid) keeps
    invalid candidates out of every min and max and sets them to 0. Δcode: the official code divides by
    (max − min + 1e-6); here the division is exact and a constant row gives 0 (the official value), so the
    affine invariance is exact. Float32.
    Defaults: scale=1.0.
    """
    teachers = list(scores_list)
    if not teachers:
        raise ValueError("minmax_ensemble needs the scores of at least one teacher")
    shape = teachers[0].shape
    for k, s in enumerate(teachers):
        if s.shape != shape:
            raise ValueError(
                f"every teacher's scores must have the same shape; teacher 0 has {tuple(shape)}, "
                f"teacher {k} has {tuple(s.shape)}"
            )
    total = sum(minmax_normalize(s, mask=mask) for s in teachers)
    return total * (float(scale) / len(teachers))


def weighted_concatenation(vectors: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor:
    """DistillWeighted's target for embedding teachers (Borup, Phoo & Hariharan 2023): the S sources' vectors
    t_s (n, d_s), each row scaled to unit length and then by √w_s, side by side in one (n, D) tensor, D = Σ d_s,
    w normalised to sum to 1. Every row of the result has unit length.

    Why this is the multi-source loss: with one student head P_s (d_s × d) per source, stacked as the rows of
    P = [P_1; …; P_S] (one learned projection, what `ProjectedLoss` learns),
        ‖P e − T‖² = Σ_s w_s · ‖P'_s e − t̂_s‖²,   P'_s = P_s / √w_s,   t̂_s = t_s / ‖t_s‖,
    the weighted sum of each source's squared error through its own head (the mean over the D columns divides
    it by the constant D). Unit rows first, so that the weights, not the sources' vector norms, set each
    source's share. Float32.
    """
    if len(vectors) == 0:
        raise ValueError("weighted_concatenation needs at least one source")
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() != len(vectors):
        raise ValueError(f"{len(vectors)} sources but {w.numel()} weights")
    if bool((w <= 0).any()):
        raise ValueError(f"source weights must be positive, got {w.tolist()}")
    rows = {int(v.shape[0]) for v in vectors}
    if len(rows) != 1 or any(v.dim() != 2 for v in vectors):
        raise ValueError(f"every source needs a (n, d_s) matrix over the same n rows, got shapes "
                         f"{[tuple(v.shape) for v in vectors]}")
    unit = [torch.nn.functional.normalize(v.float(), dim=1) for v in vectors]
    return torch.cat([u * scale for u, scale in zip(unit, source_scales(w.tolist()), strict=True)], dim=1)


def source_scales(weights: Sequence[float]) -> list[float]:
    """√(w_s / Σ w): the scale of each source's unit vectors in `weighted_concatenation`."""
    total = float(sum(weights))
    return [float(w / total) ** 0.5 for w in weights]
