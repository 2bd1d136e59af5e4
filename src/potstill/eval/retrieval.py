"""Retrieval and ranking metrics: pure functions, numpy arrays or torch tensors in, python floats out.

One input form for every metric: a `(Q, N)` score matrix (row = query, column = one of its candidates,
higher = better) and, for the quality metrics, a `(Q, N)` graded relevance matrix on the same candidates
(0 = not relevant; integers or floats ≥ 0).

- `mask` (bool `(Q, N)`, True = the candidate exists) marks padding when queries have fewer than N
  candidates: a masked candidate is ignored entirely (neither ranked nor counted as relevant).
- A score of `-inf` means "judged but not retrieved": the candidate is never ranked, but its relevance
  still counts in recall's denominator and nDCG's ideal ranking. This is how relevant documents missing
  from a retrieved list are given; `matrices_from_run` builds all three arrays from run / qrels dicts.
- Ties: equal scores are ranked in column order (earlier candidate first, a stable sort), so a metric is
  a deterministic function of its inputs. `matrices_from_run` puts a query's candidates in run order.
- Queries with no relevant candidate (for MRR and recall: none with relevance ≥ `min_relevance`; for
  nDCG: none with relevance > 0) are left out of the mean, as trec_eval and the MS MARCO script leave out
  queries without judgements. `per_query=True` returns the `(Q,)` values instead, NaN for those queries.

Teacher–student agreement: `kendall_tau`, `top_k_overlap` over the same `(Q, N)` candidates.
Ranking distillation reports: `rerank_metrics` (each query's candidates, the positive first) and
`retrieval_metrics` (the whole collection against a relevance matrix, e.g. from `relevance_matrix`).
Speed: queries per second is `potstill.eval.speed.measure_throughput(encode_fn, queries)` (items/s of
`encode_fn` on batches of queries); compare two encoders with `compare_throughput`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "kendall_tau",
    "matrices_from_run",
    "mrr_at_k",
    "ndcg_at_k",
    "recall_at_k",
    "relevance_matrix",
    "rerank_metrics",
    "retrieval_metrics",
    "top_k_overlap",
]

GAINS = ("exponential", "linear")


# --------------------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _scores(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (queries x candidates) array, got shape {a.shape}")
    if a.dtype.kind not in "iufb":
        raise ValueError(f"{name}: expected numbers, got dtype {a.dtype}")
    return a.astype(np.float64)


def _valid(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = _to_numpy(mask)
    if m.shape != shape:
        raise ValueError(f"mask must have the scores' shape {shape}, got {m.shape}")
    if m.dtype.kind not in "biu":
        raise ValueError(f"mask must be bool (or integer 0/1), got dtype {m.dtype}")
    return m.astype(bool)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return int(k)


def _inputs(scores: Any, relevance: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scores, relevance (0 where masked), which candidates exist, which are ranked."""
    s = _scores(scores, "scores")
    rel = _scores(relevance, "relevance")
    if rel.shape != s.shape:
        raise ValueError(f"relevance must have the scores' shape {s.shape}, got {rel.shape}")
    valid = _valid(mask, s.shape)
    if np.isnan(s[valid]).any():
        raise ValueError("scores contain NaN at valid candidates (use -inf for 'not retrieved')")
    if np.isnan(rel[valid]).any() or (rel[valid] < 0).any():
        raise ValueError("relevance must be >= 0 (and not NaN) at valid candidates")
    rel = np.where(valid, rel, 0.0)
    ranked = valid & (s > -np.inf)
    return s, rel, valid, ranked


def _order(s: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """Per row, the candidate columns from best to worst score, ties in column order, unranked last."""
    key = np.where(ranked, -s, np.inf)
    return np.argsort(key, axis=1, kind="stable")


def _top_k_relevance(rel: np.ndarray, s: np.ndarray, ranked: np.ndarray, k: int) -> np.ndarray:
    """`(Q, k')` relevance of each query's ranks 1..k' (k' = min(k, N)); 0 past its last ranked candidate."""
    order = _order(s, ranked)[:, :k]
    top = np.take_along_axis(rel, order, axis=1)
    positions = np.arange(top.shape[1])[None, :]
    return np.where(positions < ranked.sum(1, keepdims=True), top, 0.0)


def _finish(values: np.ndarray, counted: np.ndarray, per_query: bool, what: str) -> float | np.ndarray:
    out = np.where(counted, values, np.nan)
    if per_query:
        return out
    if not counted.any():
        raise ValueError(f"{what}: no query has a relevant candidate")
    return float(out[counted].mean())


# ------------------------------------------------------------------------------------------- quality
def mrr_at_k(
    scores: Any,
    relevance: Any,
    k: int = 10,
    *,
    mask: Any = None,
    min_relevance: float = 1,
    per_query: bool = False,
) -> float | np.ndarray:
    """Mean reciprocal rank at k: mean over queries of 1 / (rank of the first relevant candidate), 0 when it
    is not in the top k. Relevant = relevance ≥ `min_relevance` (1: MS MARCO; 2 for TREC DL's binary
    metrics). Ranks are 1-based. Defaults: k=10, min_relevance=1.
    """
    k = _check_k(k)
    s, rel, valid, ranked = _inputs(scores, relevance, mask)
    hit = _top_k_relevance(rel, s, ranked, k) >= min_relevance
    first = hit.argmax(axis=1) if hit.shape[1] else np.zeros(hit.shape[0], dtype=np.int64)
    values = np.where(hit.any(axis=1), 1.0 / (first + 1), 0.0)
    counted = (valid & (rel >= min_relevance)).any(axis=1)
    return _finish(values, counted, per_query, "mrr_at_k")


def ndcg_at_k(
    scores: Any,
    relevance: Any,
    k: int = 10,
    *,
    mask: Any = None,
    gain: str = "exponential",
    per_query: bool = False,
) -> float | np.ndarray:
    """Normalised discounted cumulative gain at k, DCG@k / IDCG@k per query, averaged over queries.

    DCG@k = Σ_{r=1..k} g(rel_r) / log2(r + 1) over the ranked candidates; IDCG@k is the DCG of the ideal
    order of all the query's valid candidates (unretrieved `-inf` ones included). Graded gain
    g(rel) = 2^rel − 1 (Burges et al. 2005, `gain="exponential"`, the default) or g(rel) = rel
    (`gain="linear"`, as trec_eval and `sklearn.metrics.ndcg_score`). Defaults: k=10, gain="exponential".
    """
    k = _check_k(k)
    if gain not in GAINS:
        raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")
    s, rel, valid, ranked = _inputs(scores, relevance, mask)
    g = np.exp2(rel) - 1.0 if gain == "exponential" else rel
    top = _top_k_relevance(g, s, ranked, k)
    discount = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    dcg = (top * discount).sum(axis=1)
    ideal = -np.sort(-g, axis=1)[:, :k]
    idcg = (ideal * discount[: ideal.shape[1]]).sum(axis=1)
    counted = idcg > 0
    values = np.divide(dcg, idcg, out=np.zeros_like(dcg), where=counted)
    return _finish(values, counted, per_query, "ndcg_at_k")


def recall_at_k(
    scores: Any,
    relevance: Any,
    k: int = 100,
    *,
    mask: Any = None,
    min_relevance: float = 1,
    per_query: bool = False,
) -> float | np.ndarray:
    """Recall at k: per query, relevant candidates in the top k / all its relevant candidates (unretrieved
    `-inf` ones included; not capped at k). Relevant = relevance ≥ `min_relevance`.
    Defaults: k=100, min_relevance=1.
    """
    k = _check_k(k)
    s, rel, valid, ranked = _inputs(scores, relevance, mask)
    hits = (_top_k_relevance(rel, s, ranked, k) >= min_relevance).sum(axis=1)
    total = (valid & (rel >= min_relevance)).sum(axis=1)
    counted = total > 0
    values = np.divide(hits, total, out=np.zeros(hits.shape, dtype=np.float64), where=counted)
    return _finish(values, counted, per_query, "recall_at_k")


# ----------------------------------------------------------------------------------------- agreement
def _pair(student_scores: Any, teacher_scores: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = _scores(student_scores, "student_scores")
    t = _scores(teacher_scores, "teacher_scores")
    if s.shape != t.shape:
        raise ValueError(f"student_scores has shape {s.shape} but teacher_scores has {t.shape}")
    valid = _valid(mask, s.shape)
    if np.isnan(s[valid]).any() or np.isnan(t[valid]).any():
        raise ValueError("scores contain NaN at valid candidates")
    return s, t, valid


def _mean_or_nan(values: np.ndarray, per_query: bool) -> float | np.ndarray:
    if per_query:
        return values
    defined = ~np.isnan(values)
    return float(values[defined].mean()) if defined.any() else float("nan")


def kendall_tau(
    student_scores: Any,
    teacher_scores: Any,
    *,
    mask: Any = None,
    per_query: bool = False,
) -> float | np.ndarray:
    """Kendall's τ-b between the student's and the teacher's scores of each query's valid candidates
    (`scipy.stats.kendalltau`, which accounts for ties), averaged over queries.

    A query with fewer than 2 valid candidates, or whose scores are all equal on one side, has no τ (NaN)
    and is left out of the mean; the mean is NaN when no query has one.
    """
    from scipy.stats import kendalltau

    s, t, valid = _pair(student_scores, teacher_scores, mask)
    values = np.full(s.shape[0], np.nan)
    for i in range(s.shape[0]):
        keep = valid[i]
        if keep.sum() >= 2:
            a, b = s[i, keep], t[i, keep]
            if np.ptp(a) > 0 and np.ptp(b) > 0:
                values[i] = float(kendalltau(a, b).statistic)
    return _mean_or_nan(values, per_query)


def top_k_overlap(
    student_scores: Any,
    teacher_scores: Any,
    k: int = 10,
    *,
    mask: Any = None,
    per_query: bool = False,
) -> float | np.ndarray:
    """|top-k(student) ∩ top-k(teacher)| / k per query, averaged over queries with a valid candidate.

    k is clamped per query to its number of valid candidates; ties are broken in column order (stable).
    The mean is NaN when no query has a valid candidate. Defaults: k=10.
    """
    k = _check_k(k)
    s, t, valid = _pair(student_scores, teacher_scores, mask)
    n_valid = valid.sum(axis=1)
    top_s = _order(s, valid)[:, :k]
    top_t = _order(t, valid)[:, :k]
    values = np.full(s.shape[0], np.nan)
    for i in range(s.shape[0]):
        kk = min(k, int(n_valid[i]))
        if kk:
            values[i] = len(set(top_s[i, :kk].tolist()) & set(top_t[i, :kk].tolist())) / kk
    return _mean_or_nan(values, per_query)


# ------------------------------------------------------------------------------------------ adapters
def matrices_from_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """`(scores, relevance, mask, query_ids)` for the metrics here from TREC-style dicts.

    `run[qid][docid]` = score of a retrieved document, `qrels[qid][docid]` = graded relevance. Rows are the
    queries of `qrels` (in its order; a query missing from `run` retrieves nothing and scores 0, like
    trec_eval -c); each row holds the query's retrieved documents in run order, then its judged documents
    that were not retrieved with score -inf, then padding (mask False). Unjudged documents have relevance 0.
    """
    qids = list(qrels)
    rows: list[tuple[list[float], list[float]]] = []
    for qid in qids:
        retrieved = run.get(qid, {})
        judged = qrels[qid]
        sc = [float(v) for v in retrieved.values()]
        rl = [float(judged.get(doc, 0.0)) for doc in retrieved]
        for doc, r in judged.items():
            if doc not in retrieved:
                sc.append(float("-inf"))
                rl.append(float(r))
        rows.append((sc, rl))
    width = max((len(sc) for sc, _ in rows), default=0)
    scores = np.full((len(qids), width), -np.inf)
    relevance = np.zeros((len(qids), width))
    mask = np.zeros((len(qids), width), dtype=bool)
    for i, (sc, rl) in enumerate(rows):
        scores[i, : len(sc)] = sc
        relevance[i, : len(rl)] = rl
        mask[i, : len(sc)] = True
    return scores, relevance, mask, qids


# ------------------------------------------------------------------------------- distillation reports
def rerank_metrics(scores: torch.Tensor, teacher: torch.Tensor | None = None) -> dict[str, float]:
    """Reranking each query's `(Q, 1 + N)` candidates, the positive in column 0: "rerank_mrr@10" and, with the
    teacher's scores of the same candidates, "teacher_kendall_tau" and "teacher_top1_agreement" (the share of
    queries whose top candidate is the teacher's)."""
    relevant = torch.zeros_like(scores)
    relevant[:, 0] = 1
    metrics = {"rerank_mrr@10": mrr_at_k(scores, relevant, k=10)}
    if teacher is not None:
        metrics.update({"teacher_kendall_tau": kendall_tau(scores, teacher),
                        "teacher_top1_agreement": float((scores.argmax(1) == teacher.argmax(1)).float().mean())})
    return metrics


def relevance_matrix(relevant: list[set[str]], collection: list[str]) -> torch.Tensor:
    """`(Q, P)` binary relevance of the `collection` passages to each query (`relevant[q]` = its passages)."""
    where = {p: i for i, p in enumerate(collection)}
    matrix = torch.zeros(len(relevant), len(collection))
    for i, passages in enumerate(relevant):
        matrix[i, [where[p] for p in passages]] = 1
    return matrix


def retrieval_metrics(scores: torch.Tensor, relevant: torch.Tensor,
                      teacher: torch.Tensor | None = None) -> dict[str, float]:
    """Retrieval over a whole collection, `(Q, P)` scores against `(Q, P)` relevance: "mrr@10", "ndcg@10",
    "recall@10" and, with the teacher's scores of the collection, "teacher_top10_overlap"."""
    metrics = {"mrr@10": mrr_at_k(scores, relevant, k=10), "ndcg@10": ndcg_at_k(scores, relevant, k=10),
               "recall@10": recall_at_k(scores, relevant, k=10)}
    if teacher is not None:
        metrics["teacher_top10_overlap"] = top_k_overlap(scores, teacher, k=10)
    return metrics
