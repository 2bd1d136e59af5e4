"""Interpolation vs extrapolation splits (ReSTTest / ReSTrain style) on topic-clustered synthetic queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potstill.data.splits import (
    extrapolation_split,
    interpolation_extrapolation_splits,
    max_similarity_to_train,
    query_buckets,
    random_split,
    restrain_train_sets,
)


def clustered(n_topics: int = 5, per_topic: int = 30, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Queries around well-separated random directions: (embeddings, topic per row)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_topics, dim))
    truth = np.repeat(np.arange(n_topics), per_topic)
    return centres[truth] + rng.normal(size=(truth.size, dim)) * 0.25, truth


def check_partition(split, n: int) -> None:
    assert np.intersect1d(split.train, split.test).size == 0
    assert np.union1d(split.train, split.test).tolist() == list(range(n))
    assert split.train.dtype == np.int64 and split.test.dtype == np.int64


def test_extrapolation_test_set_is_farther_from_train_than_random():
    emb, truth = clustered()
    pair = interpolation_extrapolation_splits(emb, n_buckets=5, fold=0, seed=0)
    ex, ip = pair.extrapolation, pair.interpolation
    check_partition(ex, emb.shape[0])
    check_partition(ip, emb.shape[0])
    assert ex.test.size == ip.test.size == 30  # one whole topic held out, random split of the same size
    assert np.unique(truth[ex.test]).size == 1 and not np.isin(truth[ex.train], truth[ex.test]).any()
    assert ex.mean_max_similarity < ip.mean_max_similarity - 0.3
    assert pair.similarity_gap == pytest.approx(ip.mean_max_similarity - ex.mean_max_similarity)
    summary = pair.summary()
    assert summary["n_test"] == 30 and summary["n_train"] == 120
    assert ex.kind == "extrapolation" and ip.kind == "interpolation"


def test_every_fold_holds_out_a_different_bucket():
    emb, _ = clustered()
    tests = [extrapolation_split(emb, fold=k, seed=1).test for k in range(5)]
    assert np.sort(np.concatenate(tests)).tolist() == list(range(emb.shape[0]))


def test_max_similarity_matches_brute_force():
    emb, _ = clustered(n_topics=2, per_topic=6)
    train, test = np.arange(0, 12, 2), np.arange(1, 12, 2)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    want = np.array([max(float(unit[i] @ unit[j]) for j in train) for i in test])
    np.testing.assert_allclose(max_similarity_to_train(torch.tensor(emb), train, test), want, rtol=1e-10)


def test_deterministic_under_seed():
    emb, _ = clustered()
    a = interpolation_extrapolation_splits(emb, seed=3)
    b = interpolation_extrapolation_splits(emb, seed=3)
    for x, y in ((a.interpolation, b.interpolation), (a.extrapolation, b.extrapolation)):
        assert np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test)
        assert x.mean_max_similarity == y.mean_max_similarity
    assert not np.array_equal(random_split(emb, 30, seed=3).test, random_split(emb, 30, seed=4).test)
    assert np.array_equal(query_buckets(emb, seed=2), query_buckets(emb, seed=2))


def test_restrain_sets_are_size_matched_and_differ_in_similarity():
    emb, truth = clustered(n_topics=5, per_topic=40, seed=2)
    rng = np.random.default_rng(0)
    test = rng.choice(np.flatnonzero(truth == 0), size=10, replace=False)
    pool = np.setdiff1d(np.arange(emb.shape[0]), test)
    ip, ex = restrain_train_sets(emb, pool, test, n_neighbors=3, seed=0)
    assert ip.train.size == ex.train.size >= 3
    assert np.intersect1d(ip.train, ex.train).size == 0
    assert np.isin(ip.train, pool).all() and np.isin(ex.train, pool).all()
    assert np.array_equal(ip.test, np.sort(test)) and np.array_equal(ex.test, ip.test)
    assert ip.mean_max_similarity > ex.mean_max_similarity
    again = restrain_train_sets(emb, pool, test, n_neighbors=3, seed=0)[1]
    assert np.array_equal(again.train, ex.train)


def test_bad_inputs():
    emb, _ = clustered(n_topics=2, per_topic=4)
    with pytest.raises(ValueError, match="n_buckets"):
        extrapolation_split(emb, n_buckets=1)
    with pytest.raises(ValueError, match="exceeds"):
        query_buckets(emb, n_buckets=9)
    with pytest.raises(ValueError, match="fold"):
        extrapolation_split(emb, n_buckets=2, fold=2)
    with pytest.raises(ValueError, match="n_test"):
        random_split(emb, 8)
    with pytest.raises(ValueError, match="all zeros"):
        random_split(np.zeros((4, 3)), 1)
    with pytest.raises(ValueError, match="2-D"):
        random_split(np.ones(4), 1)
    with pytest.raises(ValueError, match="overlap"):
        restrain_train_sets(emb, [0, 1, 2], [2, 3])
    with pytest.raises(ValueError, match="outside"):
        max_similarity_to_train(emb, [0, 99], [1])
    with pytest.raises(ValueError, match="too few"):
        restrain_train_sets(emb, [0, 1, 2], [4, 5, 6], n_neighbors=2)
