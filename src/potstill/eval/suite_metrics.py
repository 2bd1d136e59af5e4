"""The general suite's metrics, one per MTEB task type, on embeddings (numpy arrays) in, python floats out.

Definitions follow MTEB (Muennighoff et al. 2023):
- classification: a logistic-regression probe (sklearn, max_iter=100, seed 0) fitted on the raw train
  embeddings; test accuracy.
- clustering: k-means (sklearn, k = number of gold labels, n_init=10, seed 0) on the embeddings;
  V-measure (Rosenberg & Hirschberg 2007) between clusters and gold labels.
- pair classification: average precision of the cosine similarity, positives = label 1 (MTEB's
  `cosine_ap`).
- reranking: mean over queries of the average precision of the candidates ranked by cosine (MAP).
- retrieval: nDCG@10 (binary relevance) and MRR@10 of the corpus ranked by cosine
  (`potstill.eval.retrieval`).
- STS: Spearman correlation between cosine similarity and the gold scores.
Cosine is used throughout, so an encoder may return raw or L2-normalised vectors.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from potstill.eval.metrics import _rowwise_cosine as rowwise_cosine
from potstill.eval.metrics import pair_spearman
from potstill.eval.retrieval import mrr_at_k, ndcg_at_k

__all__ = [
    "average_precision",
    "cosine_ap",
    "cosine_matrix",
    "mean_average_precision",
    "probe_accuracy",
    "retrieval_scores",
    "sts_spearman",
    "v_measure",
]

SEED = 0


def _unit(x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D array (rows x dims), got shape {a.shape}")
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def cosine_matrix(a: Any, b: Any) -> np.ndarray:
    """(len(a), len(b)) cosine similarities."""
    return _unit(a) @ _unit(b).T


def probe_accuracy(train_emb: Any, train_labels: Sequence[Any], test_emb: Any,
                   test_labels: Sequence[Any]) -> float:
    """Test accuracy of sklearn's LogisticRegression(max_iter=100) fitted on the raw train embeddings."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    xtr, xte = np.asarray(train_emb, dtype=np.float64), np.asarray(test_emb, dtype=np.float64)
    if len(train_labels) != len(xtr) or len(test_labels) != len(xte) or len(xte) == 0:
        raise ValueError("each embedding array needs one label per row, and the test set may not be empty")
    clf = LogisticRegression(max_iter=100, random_state=SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xtr, np.asarray(train_labels))
    return float(np.mean(clf.predict(xte) == np.asarray(test_labels)))


def v_measure(emb: Any, labels: Sequence[Any]) -> float:
    """V-measure of k-means clusters (k = number of distinct labels) against the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import v_measure_score

    x = np.asarray(emb, dtype=np.float64)
    k = len(set(labels))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=SEED).fit_predict(x)
    return float(v_measure_score(list(labels), clusters))


def average_precision(scores: Any, relevant: Any) -> float:
    """Average precision of one ranking: mean over the relevant items of precision at their rank.

    Items are ranked by score, best first, ties in input order (a stable sort). Equals sklearn's
    `average_precision_score` when no scores tie. NaN when nothing is relevant.
    """
    s = np.asarray(scores, dtype=np.float64)
    rel = np.asarray(relevant, dtype=bool)
    if s.shape != rel.shape:
        raise ValueError(f"{s.shape[0]} scores but {rel.shape[0]} relevance flags")
    if not rel.any():
        return float("nan")
    hits = rel[np.argsort(-s, kind="stable")]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def cosine_ap(emb1: Any, emb2: Any, labels: Sequence[int]) -> float:
    """Average precision of cos(emb1[i], emb2[i]) as a score for label 1 (MTEB pair classification)."""
    from sklearn.metrics import average_precision_score

    cosines = rowwise_cosine(np.asarray(emb1, dtype=np.float64), np.asarray(emb2, dtype=np.float64)).numpy()
    return float(average_precision_score(np.asarray(labels), cosines))


def mean_average_precision(query_emb: Any, candidate_embs: Sequence[Any],
                           relevant: Sequence[Sequence[int]]) -> float:
    """MAP: each query's candidates ranked by cosine, AP per query, mean over queries (MTEB reranking)."""
    q = _unit(query_emb)
    aps = []
    for i, cands in enumerate(candidate_embs):
        scores = _unit(cands) @ q[i]
        flags = np.zeros(len(scores), dtype=bool)
        flags[list(relevant[i])] = True
        aps.append(average_precision(scores, flags))
    return float(np.nanmean(aps))


def retrieval_scores(query_emb: Any, corpus_emb: Any, relevant: Sequence[Sequence[int]],
                     k: int = 10) -> dict[str, float]:
    """nDCG@k and MRR@k of the whole corpus ranked by cosine for each query (relevance 1 for `relevant`)."""
    scores = cosine_matrix(query_emb, corpus_emb)
    rel = np.zeros_like(scores)
    for i, docs in enumerate(relevant):
        rel[i, list(docs)] = 1.0
    return {f"ndcg@{k}": float(ndcg_at_k(scores, rel, k, gain="linear")),
            f"mrr@{k}": float(mrr_at_k(scores, rel, k))}


def sts_spearman(emb1: Any, emb2: Any, gold: Sequence[float]) -> float:
    """Spearman correlation between cos(emb1[i], emb2[i]) and gold[i] (`potstill.eval.metrics.pair_spearman`)."""
    return pair_spearman(np.asarray(emb1, dtype=np.float64), np.asarray(emb2, dtype=np.float64), gold)
