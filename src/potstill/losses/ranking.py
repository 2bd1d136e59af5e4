"""Ranking distillation: match the teacher's relevance scores for (query, candidate) pairs.

Score losses (`margin_mse`, `in_batch_margin_mse`, `listwise_kl`, `pointwise_mse`) take student and teacher
scores of the same shape; the sparse-retriever regularisers (`flops`, `idf_flops`) take only the student's
term weights. All are computed in float32.
"""

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


# --------------------------------------------------------------------------------------------- helpers
def _check_bool_mask(mask: Tensor, what: str) -> None:
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{what} must be a bool (or integer 0/1) tensor, got {mask.dtype}")


def _reduce_queries(per_query: Tensor, counted: Tensor | None, reduction: str) -> Tensor:
    """Reduce `(B,)` per-query values over the counted queries (all when None); "none" keeps 0 elsewhere."""
    if counted is not None:
        per_query = torch.where(counted, per_query, per_query.new_zeros(()))
    if reduction == "none":
        return per_query
    total = per_query.sum()
    if reduction == "sum":
        return total
    n = per_query.numel() if counted is None else int(counted.sum())
    return total / n if n else total * 0


def _masked_row_mean(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over the last axis of `values` at `valid` entries, and which rows have any; NaN-free."""
    count = valid.sum(-1)
    total = values.masked_fill(~valid, 0.0).sum(-1)
    return total / count.clamp_min(1), count > 0


# -------------------------------------------------------------------------------------------- pointwise
def pointwise_mse(
    student_scores: Tensor,
    teacher_scores: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Pointwise score MSE, per query mean over its candidates of (s − t)².

    The plain regression baseline of ranking distillation (Hofstätter et al. 2020, "Improving Efficient
    Neural Ranking Models with Cross-Architecture Knowledge Distillation", compare it with margin_mse).
    Unlike Margin-MSE it needs the student to reproduce the teacher's score scale and offset. Scores are
    `(B,)` (one candidate per query) or `(B, N)`. `mask` is `(B, N)` (candidate validity; a query with no
    valid candidate is not counted) or `(B,)` (query validity). "mean" averages over counted queries, which
    without a mask equals `nn.MSELoss()` over all B·N entries. Computed in float32.
    Defaults: reduction="mean".
    """
    check_reduction(reduction)
    check_same_shape(student_scores, teacher_scores, "scores")
    if student_scores.dim() not in (1, 2):
        raise ValueError(f"scores must have shape (B,) or (B, N), got {tuple(student_scores.shape)}")
    diff = student_scores.float() - teacher_scores.float()
    if diff.dim() == 1:
        diff = diff.unsqueeze(-1)
    counted = None
    if mask is not None:
        _check_bool_mask(mask, "mask")
        valid = mask.to(device=diff.device, dtype=torch.bool)
        if mask.shape == student_scores.shape and student_scores.dim() == 2:
            per_query, counted = _masked_row_mean(diff.masked_fill(~valid, 0.0).square(), valid)
            return _reduce_queries(per_query, counted, reduction)
        if mask.shape != student_scores.shape[:1]:
            raise ValueError(
                f"mask must have shape (B, N) = {tuple(student_scores.shape)} (candidates) or (B,) = "
                f"({student_scores.shape[0]},) (queries), got {tuple(mask.shape)}"
            )
        counted = valid
        diff = diff.masked_fill(~valid.unsqueeze(-1), 0.0)
    return _reduce_queries(diff.square().mean(-1), counted, reduction)


# ------------------------------------------------------------------------------------------- in-batch
def in_batch_margin_mse(
    student_scores: Tensor,
    teacher_scores: Tensor,
    student_neg_scores: Tensor | None = None,
    teacher_neg_scores: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """In-batch Margin-MSE of TAS-Balanced: each query's own positive against the other queries' passages.

    Hofstätter et al. 2021, "Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware
    Sampling" (TAS-B). `student_scores[i, j]` = s(q_i, d_j⁺), the `(B, B)` scores of every query against
    every in-batch positive (for a dot-product student `q @ p.T`); `teacher_scores` the same from the
    in-batch teacher (ColBERT in the paper). The diagonal holds each query's own positive. Per query i:

        L_i = mean_{j≠i} ((s_ii − s_ij) − (t_ii − t_ij))²

    With the optional `(B, B)` negative matrices `student_neg_scores[i, j]` = s(q_i, d_j⁻) (and the
    teacher's), the loss is the official code's half/half mix, with the hard-negative diagonal left out
    (that pair belongs to the pairwise margin_mse term):

        L_i = ½·mean_{j≠i} ((s_ii − s_ij) − (t_ii − t_ij))² + ½·mean_{j≠i} ((s_ii − s⁻_ij) − (t_ii − t⁻_ij))²

    (matchmaker/train.py, in-batch block with in_batch_neg_loss "margin-mse"). TAS-B adds it to the pairwise
    Margin-MSE with weight α = 0.75 (config/train/modes/tas_balanced.yaml: in_batch_neg_lambda 0.75,
    in_batch_main_pair_lambda 1); give that as the objective's weight. `mask` is `(B, B)` (True = pair
    (i, j) counted, e.g. False where passage j is also relevant to query i; the diagonal is ignored) or
    `(B,)` (batch item validity: an invalid item's row and column leave the loss). "mean" averages over
    queries with at least one counted pair, which without a mask equals the official mean over all
    B·(B−1) terms. Invariant to adding a constant to all student or all teacher scores. Float32.
    Defaults: reduction="mean".
    """
    check_reduction(reduction)
    check_same_shape(student_scores, teacher_scores, "in-batch scores")
    if student_scores.dim() != 2 or student_scores.shape[0] != student_scores.shape[1]:
        raise ValueError(
            "in-batch scores must be a square (B, B) matrix of every query against every in-batch positive, "
            f"got {tuple(student_scores.shape)}"
        )
    if (student_neg_scores is None) != (teacher_neg_scores is None):
        raise ValueError("give both student_neg_scores and teacher_neg_scores, or neither")
    b = student_scores.shape[0]
    device = student_scores.device
    valid = ~torch.eye(b, dtype=torch.bool, device=device)
    if mask is not None:
        _check_bool_mask(mask, "mask")
        m = mask.to(device=device, dtype=torch.bool)
        if mask.shape == (b,):
            m = m.unsqueeze(0) & m.unsqueeze(1)
        elif mask.shape != (b, b):
            raise ValueError(f"mask must have shape (B, B) = ({b}, {b}) (pairs) or (B,) = ({b},) (batch items), "
                             f"got {tuple(mask.shape)}")
        valid = valid & m

    def half(s: Tensor, t: Tensor, s_own: Tensor, t_own: Tensor) -> tuple[Tensor, Tensor]:
        margins = (s_own.unsqueeze(-1) - s.float()) - (t_own.unsqueeze(-1) - t.float())
        return _masked_row_mean(margins.masked_fill(~valid, 0.0).square(), valid)

    s_own, t_own = student_scores.float().diagonal(), teacher_scores.float().diagonal()
    per_query, counted = half(student_scores, teacher_scores, s_own, t_own)
    if student_neg_scores is not None and teacher_neg_scores is not None:
        check_same_shape(student_neg_scores, teacher_neg_scores, "in-batch negative scores")
        if student_neg_scores.shape != student_scores.shape:
            raise ValueError(
                f"negative scores must have the positives' shape {tuple(student_scores.shape)}, "
                f"got {tuple(student_neg_scores.shape)}"
            )
        neg, _ = half(student_neg_scores, teacher_neg_scores, s_own, t_own)
        per_query = 0.5 * (per_query + neg)
    return _reduce_queries(per_query, counted, reduction)


# ----------------------------------------------------------------------------------------- sparsity
def _mean_abs_per_term(activations: Tensor, mask: Tensor | None) -> Tensor:
    """(1/n) Σ_i |w_ij| over the n counted rows of `[..., V]` activations, as a `(V,)` float32 tensor."""
    if activations.dim() < 2:
        raise ValueError(f"activations must have shape (N, V) or (..., V), got {tuple(activations.shape)}")
    w = activations.float().reshape(-1, activations.shape[-1])
    if mask is None:
        return w.abs().mean(0)
    if mask.shape != activations.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(activations.shape[:-1])}, got {tuple(mask.shape)}")
    _check_bool_mask(mask, "mask")
    valid = mask.to(device=w.device, dtype=torch.bool).reshape(-1, 1)
    n = int(valid.sum())
    return w.masked_fill(~valid, 0.0).abs().sum(0) / max(n, 1)


def flops(activations: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """FLOPS regulariser, Σ_j ((1/N) Σ_i |w_ij|)² over the vocabulary j of a batch of N sparse vectors.

    Paria et al. 2020, "Minimizing FLOPs to Learn Efficient Sparse Representations" (ICLR); used by SPLADE
    (Formal et al. 2021) on document (and query) term weights. It is a smooth proxy of the expected number
    of multiplications of a sparse dot product, so it favours an even spread of few active terms. Not a
    teacher–student loss: it regularises the student's own `[..., V]` activations (rows are leading
    positions); `mask` (shape `[...]`, True = counted) drops rows, N = counted rows (0 when none). Add it
    with a weight λ (SPLADE: a λ warm-up, λ(step) = λ·min(1, step/T)²). Float32 scalar.
    Defaults: none.
    """
    return _mean_abs_per_term(activations, mask).square().sum()


def idf_flops(activations: Tensor, idf: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """IDF-aware FLOPS on matching weights, Σ_j ((1/N) Σ_i |a_ij|)² / idf_j², terms with idf_j ≤ 0 left out.

    Geng et al. 2024, "Towards Competitive Search Relevance For Inference-Free Learned Sparse Retrievers"
    (arXiv 2411.04403). In the inference-free retriever the score is s(q, d) = Σ_{j∈q} ReLU(idf_j)·w_dj and
    FLOPS penalises the raw document weights w (official code: `flops_value` in scripts/train/trainer.py
    regularises the document weights only, IDF sits on the query side). Written on the weights that enter
    the score, a_ij = idf_j·w_ij, this is a per-term penalty weighted by 1/idf_j²: a frequent (low-IDF)
    term pays more per unit of score, so it is pruned first (arXiv v2 calls it an "IDF-aware penalty on the
    matching function"). `activations` are those matching weights `[..., V]`, `idf` the `(V,)` IDF vector;
    hence idf_flops(idf·w, idf) == flops(w) and, with idf = 1 everywhere, idf_flops == flops. A term
    with idf_j ≤ 0 never reaches a score (ReLU), so it adds nothing. `mask` as in flops. Float32 scalar.
    Defaults: none.
    """
    v = activations.shape[-1] if activations.dim() else 0
    if idf.shape != (v,):
        raise ValueError(f"idf must have shape (V,) = ({v},), one value per vocabulary term, got {tuple(idf.shape)}")
    idf = idf.to(device=activations.device, dtype=torch.float32)
    positive = idf > 0
    weight = torch.where(positive, 1.0 / torch.where(positive, idf, 1.0).square(), 0.0)
    return (_mean_abs_per_term(activations, mask).square() * weight).sum()


class SparseFlops(torch.nn.Module):
    """FLOPS regulariser of a sparse (SPLADE-like) student as a training objective, with SPLADE's λ warm-up.

    Takes the student's own term weights, no teacher signal: `passage_terms` (`(B·C, V)` weights of every
    candidate passage) and/or `query_terms` (`(B, V)`), as `side` says ("passage", "query" or "both"), and
    `queries` = B, the rows the loop counts. Value at optimizer step k: min(1, k/warmup_steps)² ·
    Σ_sides flops(terms) (Formal et al. 2021; Geng et al. 2024 regularise only the documents of an
    inference-free retriever, whose raw document weights make this the IDF-aware FLOPS, see `idf_flops`); the
    objective's weight is λ. With reduction="sum" (the loop's call) it returns the value × B, so that the loop's
    division by the counted rows gives the value back. Stateful: the warm-up step, a buffer. A task hands it
    the weights from its signal (the ranking task: `RankingScores.query_terms` / `.passage_terms`).
    Defaults: side="passage", warmup_steps=0 (no warm-up; the official demo config uses 200, the code 10,000).
    """

    unit = "rows"

    def __init__(self, side: str = "passage", warmup_steps: int = 0) -> None:
        super().__init__()
        if side not in ("passage", "query", "both"):
            raise ValueError(f"side must be 'passage', 'query' or 'both', got {side!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer ≥ 0, got {warmup_steps!r}")
        self.side, self.warmup_steps = side, warmup_steps
        self.step: Tensor
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))

    @property
    def factor(self) -> float:
        """λ(step)/λ = min(1, step / warmup_steps)²."""
        return 1.0 if self.warmup_steps == 0 else min(1.0, int(self.step) / self.warmup_steps) ** 2

    def log_values(self) -> dict[str, float]:
        return {"lambda_factor": self.factor}

    def forward(self, passage_terms: Tensor | None = None, query_terms: Tensor | None = None, *, queries: int,
                mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
        check_reduction(reduction)
        given = {"passage": passage_terms, "query": query_terms}
        chosen = [given[side] for side in (("passage", "query") if self.side == "both" else (self.side,))]
        terms = [t for t in chosen if t is not None]
        if len(terms) != len(chosen):
            raise ValueError(f"sparse_flops needs the student's {self.side} term weights; they exist for a "
                             f"ranking student of type splade (an inference-free student has no query weights "
                             f"to regularise)")
        value = self.factor * (flops(terms[0]) if len(terms) == 1 else flops(terms[0]) + flops(terms[1]))
        if reduction == "sum":
            return value * queries
        return value.expand(queries) if reduction == "none" else value

    def on_optimizer_step(self, loss: float, step: int, total_steps: int) -> None:
        self.step.fill_(int(step))
