"""Retrieval metrics against hand-computed values, sklearn.metrics.ndcg_score and scipy's Kendall τ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau
from sklearn.metrics import ndcg_score

from potstill.eval.retrieval import (
    kendall_tau,
    matrices_from_run,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    top_k_overlap,
)

# one query, 4 candidates ranked in column order (scores decreasing); relevant at ranks 2 and 4
SCORES = np.array([[0.9, 0.8, 0.7, 0.1]])
REL = np.array([[0, 1, 0, 1]])


def _no_ties(q, n, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(q)]).astype(np.float64) + rng.random((q, n)) * 0.1


# ------------------------------------------------------------------------------------------------ MRR
def test_mrr_hand_values():
    assert mrr_at_k(SCORES, REL) == pytest.approx(0.5)
    assert mrr_at_k(SCORES, REL, k=1) == 0.0
    assert mrr_at_k(SCORES, REL, k=2) == pytest.approx(0.5)
    scores = np.array([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.5, 0.4, 0.3]])
    rel = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]])  # ranks 1 and 3; the third query has no relevant
    assert mrr_at_k(scores, rel) == pytest.approx((1 + 1 / 3) / 2)
    per = mrr_at_k(scores, rel, per_query=True)
    np.testing.assert_allclose(per[:2], [1.0, 1 / 3])
    assert math.isnan(per[2])
    assert isinstance(mrr_at_k(torch.tensor(SCORES), torch.tensor(REL)), float)


def test_mrr_graded_relevance_threshold():
    rel = np.array([[1, 1, 2, 0]])
    assert mrr_at_k(SCORES, rel) == 1.0
    assert mrr_at_k(SCORES, rel, min_relevance=2) == pytest.approx(1 / 3)


def test_ties_are_broken_in_column_order():
    tied = np.array([[1.0, 1.0, 1.0]])
    assert mrr_at_k(tied, np.array([[0, 0, 1]])) == pytest.approx(1 / 3)
    assert mrr_at_k(tied, np.array([[1, 0, 0]])) == 1.0
    assert recall_at_k(tied, np.array([[0, 1, 1]]), k=1) == 0.0
    assert recall_at_k(tied, np.array([[1, 0, 1]]), k=1) == pytest.approx(0.5)
    # a tie behind a strictly better candidate keeps the column order too
    assert mrr_at_k(np.array([[0.5, 0.5, 0.9]]), np.array([[0, 1, 0]])) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------- nDCG
def test_ndcg_hand_value_binary_and_graded():
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert ndcg_at_k(SCORES, REL) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(SCORES, REL, k=1) == 0.0
    rel = np.array([[3, 0, 1, 2]])
    dcg = 7 + 1 / math.log2(4) + 3 / math.log2(5)
    idcg = 7 + 3 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(SCORES, rel) == pytest.approx(dcg / idcg)
    dcg_lin = 3 + 1 / math.log2(4) + 2 / math.log2(5)
    idcg_lin = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(SCORES, rel, gain="linear") == pytest.approx(dcg_lin / idcg_lin)
    assert ndcg_at_k(np.array([[0.1, 0.9, 0.2, 0.3]]), rel) < ndcg_at_k(SCORES[:, [0, 3, 2, 1]], rel)
    assert ndcg_at_k(np.array([[4.0, 1.0, 2.0, 3.0]]), rel) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_ndcg_matches_sklearn(k):
    rng = np.random.default_rng(k)
    scores = _no_ties(6, 8, seed=k)
    rel = rng.integers(0, 4, size=(6, 8))
    rel[:, 0] = np.maximum(rel[:, 0], 1)  # every query has a relevant candidate (sklearn scores 0 otherwise)
    # sklearn's gain is linear: 2^rel − 1 as its y_true gives the exponential gain
    assert ndcg_at_k(scores, rel, k) == pytest.approx(ndcg_score(2.0**rel - 1, scores, k=k))
    assert ndcg_at_k(scores, rel, k, gain="linear") == pytest.approx(ndcg_score(rel, scores, k=k))
    per = ndcg_at_k(scores, rel, k, per_query=True)
    for i in range(6):
        assert per[i] == pytest.approx(ndcg_score(2.0 ** rel[i : i + 1] - 1, scores[i : i + 1], k=k))


# --------------------------------------------------------------------------------------------- recall
def test_recall_hand_values():
    assert recall_at_k(SCORES, REL, k=1) == 0.0
    assert recall_at_k(SCORES, REL, k=2) == pytest.approx(0.5)
    assert recall_at_k(SCORES, REL, k=3) == pytest.approx(0.5)
    assert recall_at_k(SCORES, REL, k=4) == 1.0
    assert recall_at_k(SCORES, REL) == 1.0  # k = 100 > N


def test_unretrieved_relevant_candidates_count_in_recall_and_ideal_dcg():
    scores = np.array([[0.9, 0.8, -np.inf]])
    rel = np.array([[1, 0, 1]])
    assert recall_at_k(scores, rel, k=10) == pytest.approx(0.5)
    assert ndcg_at_k(scores, rel, k=10) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert mrr_at_k(scores, np.array([[0, 0, 1]])) == 0.0  # never ranked, even with k ≥ N
    assert ndcg_at_k(scores, np.array([[0, 0, 1]])) == 0.0


def test_masked_candidates_are_ignored_entirely():
    scores = np.array([[5.0, 0.9, 0.8, 0.7]])
    rel = np.array([[1, 0, 1, 0]])
    mask = np.array([[False, True, True, True]])
    assert mrr_at_k(scores, rel, mask=mask) == pytest.approx(0.5)
    assert recall_at_k(scores, rel, k=1, mask=mask) == 0.0
    assert recall_at_k(scores, rel, k=2, mask=mask) == 1.0
    assert ndcg_at_k(scores, rel, mask=mask) == pytest.approx(1 / math.log2(3))
    # without the mask the padded column would count
    assert mrr_at_k(scores, rel) == 1.0
    # padding may hold anything, NaN included
    bad = scores.copy()
    bad[0, 0] = np.nan
    assert mrr_at_k(torch.tensor(bad), torch.tensor(rel), mask=torch.tensor(mask)) == pytest.approx(0.5)


def test_queries_without_relevant_candidates():
    scores = np.array([[0.2, 0.1], [0.3, 0.4]])
    rel = np.array([[0, 0], [1, 0]])
    for metric in (mrr_at_k, ndcg_at_k, recall_at_k):
        assert metric(scores, rel, k=2) == pytest.approx(metric(scores[1:], rel[1:], k=2))
        with pytest.raises(ValueError, match="no query has a relevant"):
            metric(scores, np.zeros((2, 2)))


def test_quality_metric_errors():
    with pytest.raises(ValueError, match="k must be"):
        mrr_at_k(SCORES, REL, k=0)
    with pytest.raises(ValueError, match="relevance must have"):
        ndcg_at_k(SCORES, REL[:, :3])
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(SCORES[0], REL[0])
    with pytest.raises(ValueError, match="NaN"):
        mrr_at_k(np.array([[np.nan, 1.0]]), np.array([[1, 0]]))
    with pytest.raises(ValueError, match=">= 0"):
        ndcg_at_k(SCORES, -REL)
    with pytest.raises(ValueError, match="gain"):
        ndcg_at_k(SCORES, REL, gain="exp")
    with pytest.raises(ValueError, match="mask"):
        mrr_at_k(SCORES, REL, mask=np.ones((1, 3), dtype=bool))


# ---------------------------------------------------------------------------------------- run / qrels
def test_matrices_from_run():
    run = {"q1": {"d1": 3.0, "d2": 2.0, "d3": 1.0}, "q2": {"d9": 0.5}, "qx": {"d1": 1.0}}
    qrels = {"q1": {"d2": 1, "d7": 2}, "q2": {"d9": 1}, "q3": {"d5": 1}}
    scores, rel, mask, qids = matrices_from_run(run, qrels)
    assert qids == ["q1", "q2", "q3"]
    np.testing.assert_array_equal(scores[0], [3.0, 2.0, 1.0, -np.inf])
    np.testing.assert_array_equal(rel, [[0, 1, 0, 2], [1, 0, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(mask.sum(1), [4, 1, 1])
    # q1: first relevant at rank 2, 1 of 2 relevant retrieved; q2: perfect; q3: not retrieved at all
    np.testing.assert_allclose(mrr_at_k(scores, rel, mask=mask, per_query=True), [0.5, 1.0, 0.0])
    np.testing.assert_allclose(recall_at_k(scores, rel, mask=mask, per_query=True), [0.5, 1.0, 0.0])
    idcg = 3 + 1 / math.log2(3)
    np.testing.assert_allclose(ndcg_at_k(scores, rel, mask=mask, per_query=True),
                               [(1 / math.log2(3)) / idcg, 1.0, 0.0])


# ------------------------------------------------------------------------------------------ agreement
def test_kendall_tau_against_scipy_per_query():
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    t[:, 3] = t[:, 2]  # ties: τ-b
    expected = np.mean([kendalltau(s[i], t[i]).statistic for i in range(5)])
    assert kendall_tau(s, t) == pytest.approx(expected)
    assert kendall_tau(torch.tensor(s), torch.tensor(t)) == pytest.approx(expected)
    assert kendall_tau(s, 10 * s + 3) == pytest.approx(1.0)
    assert kendall_tau(s, -s) == pytest.approx(-1.0)


def test_kendall_tau_mask_and_undefined_queries():
    s = np.array([[1.0, 2.0, 3.0, 9.0], [1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 0.0]])
    t = np.array([[1.0, 2.0, 3.0, -9.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    mask = np.array([[True, True, True, False], [True] * 4, [True, False, False, False]])
    # row 0: perfect on its 3 valid candidates; row 1: constant student (no τ); row 2: a single candidate
    assert kendall_tau(s, t, mask=mask) == pytest.approx(1.0)
    per = kendall_tau(s, t, mask=mask, per_query=True)
    assert per[0] == pytest.approx(1.0) and np.isnan(per[1:]).all()
    assert kendall_tau(s, t) != pytest.approx(1.0)
    assert math.isnan(kendall_tau(s[1:2], t[1:2]))


def test_top_k_overlap():
    s = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    t = np.array([[5.0, 1.0, 4.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    # row 0: student top-2 {0, 1}, teacher top-2 {0, 2} -> 1/2; row 1 identical -> 1
    assert top_k_overlap(s, t, k=2) == pytest.approx(0.75)
    np.testing.assert_allclose(top_k_overlap(s, t, k=2, per_query=True), [0.5, 1.0])
    assert top_k_overlap(s, t, k=5) == 1.0
    assert top_k_overlap(s, t, k=1) == 1.0
    mask = np.array([[False, True, True, True, True], [True] * 5])
    # row 0 without column 0: student top-1 {1}, teacher top-1 {2}
    np.testing.assert_allclose(top_k_overlap(s, t, k=1, mask=mask, per_query=True), [0.0, 1.0])
    # k clamps to the number of valid candidates
    np.testing.assert_allclose(top_k_overlap(s, t, k=10, mask=mask, per_query=True), [1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        top_k_overlap(s, t[:, :4])
    with pytest.raises(ValueError, match="k must be"):
        top_k_overlap(s, t, k=0)
