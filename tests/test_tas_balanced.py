"""TopicBalancedSampler (TAS-Balanced): one cluster per batch, margin-bin balance, epochs, resume, errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from potstill.data.tas_balanced import TopicBalancedSampler, margin_bins


def topics(n_topics: int = 4, per_topic: int = 10, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian topics: (embeddings, true topic per row)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_topics, dim)) * 10
    truth = np.repeat(np.arange(n_topics), per_topic)
    return centres[truth] + rng.normal(size=(truth.size, dim)) * 0.1, truth


def skewed_pairs(n_queries: int, n_pairs: int = 60, seed: int = 1) -> list[list[tuple]]:
    """Pairs whose margins pile up near the low end (exponential); pos = pair index, so draws can be traced."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_queries):
        margins = rng.exponential(1.0, size=n_pairs)
        out.append([(j, f"neg{j}", float(m)) for j, m in enumerate(margins)])
    return out


def sampler(**kw) -> TopicBalancedSampler:
    emb, _ = topics()
    kw.setdefault("batch_size", 4)
    kw.setdefault("n_clusters", 4)
    return TopicBalancedSampler(emb, skewed_pairs(emb.shape[0]), **kw)


def test_margin_bins_match_equal_width_definition():
    m = np.array([0.0, 0.05, 0.1, 0.95, 1.0, 0.5])
    assert margin_bins(m, 10).tolist() == [0, 0, 1, 9, 9, 5]
    assert margin_bins(np.array([2.0, 2.0, 2.0]), 10).tolist() == [0, 0, 0]


def test_kmeans_recovers_topics_and_every_batch_has_one_cluster():
    emb, truth = topics()
    s = TopicBalancedSampler(emb, skewed_pairs(emb.shape[0]), batch_size=4, n_clusters=4, seed=3)
    assert s.n_clusters == 4
    for c in s.clusters:  # k-means on separated topics finds them exactly
        assert np.unique(truth[c]).size == 1
    for _ in range(5):
        for batch in s:
            qs = [q for q, _, _ in batch]
            assert len({int(s.cluster_of[q]) for q in qs}) == 1
            assert len({int(truth[q]) for q in qs}) == 1


def test_batches_mix_clusters_over_an_epoch():
    s = sampler(seed=0)
    order = [int(s.cluster_of[b[0][0]]) for b in s]
    assert len(set(order)) == 4
    assert order != sorted(order)  # chunks of all clusters are shuffled together


def test_each_query_once_per_epoch_and_len():
    s = sampler(seed=5)
    assert len(s) == 4 * 3  # 4 clusters of 10 queries, batch 4 -> 3 batches each (4, 4, 2)
    for epoch in range(3):
        batches = list(s)
        assert len(batches) == len(s)
        seen = Counter(q for b in batches for q, _, _ in b)
        assert sorted(seen) == list(range(40)) and set(seen.values()) == {1}
        assert s.epoch == epoch + 1 and s.position == 0
    assert sorted(len(b) for b in batches) == [2] * 4 + [4] * 8


def test_epochs_differ_and_same_seed_repeats():
    a, b = sampler(seed=7), sampler(seed=7)
    first, second = list(a), list(a)
    assert first != second
    assert list(b) == first
    assert list(sampler(seed=8)) != first


def test_bin_use_is_uniform_despite_skewed_margins():
    emb, _ = topics(n_topics=2, per_topic=5)
    pairs = skewed_pairs(emb.shape[0], n_pairs=80, seed=4)
    s = TopicBalancedSampler(emb, pairs, batch_size=5, n_clusters=2, seed=11)
    draws: dict[int, Counter] = {q: Counter() for q in range(10)}
    pair_share_low = []  # share of pairs in each query's lowest bin: what uniform pair sampling would give
    bin_of = {q: margin_bins(np.array([p[2] for p in pairs[q]]), 10) for q in range(10)}
    for _ in range(600):
        for batch in s:
            for q, pos, neg in batch:
                assert neg == f"neg{pos}"
                draws[q][int(bin_of[q][pos])] += 1
    stat = dof = 0.0
    for q in range(10):
        nonempty = sorted(set(bin_of[q].tolist()))
        counts = np.array([draws[q][b] for b in nonempty], dtype=float)
        assert set(draws[q]) == set(nonempty)  # empty bins never drawn
        stat += chisquare(counts).statistic
        dof += len(nonempty) - 1
        share = counts / counts.sum()
        assert np.abs(share - 1 / len(nonempty)).max() < 0.06
        pair_share_low.append(np.mean(bin_of[q] == 0))
    from scipy.stats import chi2

    assert chi2.sf(stat, dof) > 1e-3
    assert np.mean(pair_share_low) > 0.3  # the margins really are skewed: bin 0 holds many pairs ...
    low = np.mean([draws[q][0] / sum(draws[q].values()) for q in range(10)])
    assert low < 0.18  # ... yet it is drawn only about 1/#non-empty bins of the time


def test_state_dict_resume_gives_identical_remaining_batches():
    ref = sampler(seed=2)
    expected = list(ref) + list(ref)  # two epochs uninterrupted
    for cut in (0, 1, 5, len(ref) - 1, len(ref), len(ref) + 3):
        run = sampler(seed=2)
        got, it = [], iter(run)
        for _ in range(cut):
            try:
                got.append(next(it))
            except StopIteration:
                it = iter(run)
                got.append(next(it))
        state = json.loads(json.dumps(run.state_dict()))  # survives a JSON round trip
        resumed = sampler(seed=99)  # the saved seed wins
        resumed.load_state_dict(state)
        while len(got) < len(expected):
            got.extend(resumed)
        assert got == expected, cut


def test_set_epoch_restarts_an_epoch():
    s = sampler(seed=4)
    e0, e1 = list(s), list(s)
    s.set_epoch(0)
    assert list(s) == e0
    s.set_epoch(1)
    assert next(iter(s)) == e1[0]
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)


def test_small_clusters_keep_and_fill():
    emb, truth = topics(n_topics=3, per_topic=1)
    emb = np.concatenate([emb, topics(n_topics=1, per_topic=7, seed=9)[0]])
    clusters = [0, 1, 2] + [3] * 7
    pairs = skewed_pairs(10, n_pairs=5)
    keep = TopicBalancedSampler(emb, pairs, batch_size=4, clusters=clusters, seed=0)
    assert len(keep) == 1 + 1 + 1 + 2
    sizes = sorted(len(b) for b in keep)
    assert sizes == [1, 1, 1, 3, 4]
    fill = TopicBalancedSampler(emb, pairs, batch_size=4, clusters=clusters, seed=0, short_batches="fill")
    assert len(fill) == 5
    batches = list(fill)
    assert all(len(b) == 4 for b in batches)
    for b in batches:
        assert len({clusters[q] for q, _, _ in b}) == 1
    assert {q for b in batches for q, _, _ in b} == set(range(10))


def test_n_clusters_capped_and_queries_without_pairs_left_out():
    emb, _ = topics(n_topics=1, per_topic=6)
    pairs = skewed_pairs(6, n_pairs=3)
    pairs[2] = []
    s = TopicBalancedSampler(torch.tensor(emb), pairs, batch_size=2)  # default k=2000 capped at 5 queries
    assert s.n_clusters == 5 and s.cluster_of[2] == -1
    assert 2 not in {q for b in s for q, _, _ in b}
    few = TopicBalancedSampler(emb, pairs, batch_size=2, min_pairs=3, clusters=[0] * 6)
    assert few.queries.tolist() == [0, 1, 3, 4, 5]
    with pytest.raises(ValueError, match="min_pairs=4"):
        TopicBalancedSampler(emb, pairs, batch_size=2, min_pairs=4)


def test_state_from_other_data_is_refused():
    a = sampler(seed=1)
    b = sampler(seed=1, batch_size=5)
    with pytest.raises(ValueError, match="fingerprint"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        a.load_state_dict({"seed": 1})
    bad = a.state_dict() | {"position": len(a) + 1}
    with pytest.raises(ValueError, match="past"):
        a.load_state_dict(bad)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 0}, "batch_size"),
    ({"n_bins": 0}, "n_bins"),
    ({"n_clusters": 0}, "n_clusters"),
    ({"seed": -1}, "seed"),
    ({"short_batches": "pad"}, "short_batches"),
    ({"clusters": [0, 1]}, "one cluster id per query"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampler(**kwargs)


def test_bad_inputs():
    emb, _ = topics(n_topics=1, per_topic=3)
    good = skewed_pairs(3, n_pairs=2)
    with pytest.raises(ValueError, match="2-D"):
        TopicBalancedSampler(emb[0], good)
    with pytest.raises(ValueError, match="NaN"):
        TopicBalancedSampler(np.full((3, 2), np.nan), good)
    with pytest.raises(ValueError, match="3 rows"):
        TopicBalancedSampler(emb, good[:2])
    with pytest.raises(ValueError, match=r"pairs\[1\]\[0\]"):
        TopicBalancedSampler(emb, [good[0], [("p", "n")], good[2]])
    with pytest.raises(ValueError, match="must be a number"):
        TopicBalancedSampler(emb, [good[0], [("p", "n", "high")], good[2]])
    with pytest.raises(ValueError, match="finite"):
        TopicBalancedSampler(emb, [good[0], [("p", "n", float("inf"))], good[2]])
    with pytest.raises(ValueError, match="no query"):
        TopicBalancedSampler(emb, [[], [], []])


def test_epoch_batches_equal_iteration_and_leave_position_alone():
    ref = sampler(seed=3)
    first, second = list(ref), list(ref)
    probe = sampler(seed=3)
    next(iter(probe))
    assert probe.epoch_batches(1) == second and probe.epoch_batches(0) == first
    assert (probe.epoch, probe.position) == (0, 1)
    with pytest.raises(ValueError, match="epoch"):
        probe.epoch_batches(-1)
