"""Evaluation metrics and speed helpers, against hand-computed values."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from potstill.eval import (
    accuracy,
    classification_metrics,
    compare_throughput,
    count_parameters,
    embedding_metrics,
    linear_probe_accuracy,
    macro_f1,
    mean_cosine,
    measure_throughput,
    neighbour_recall_at_k,
    pair_spearman,
    similarity_spearman,
    top1_agreement,
)


# ------------------------------------------------------------------------------------- classification
def test_accuracy_known_vector():
    assert accuracy(torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)
    assert accuracy(np.array([3, 3]), np.array([3, 3])) == 1.0
    assert isinstance(accuracy([0], [1]), float)


def test_accuracy_accepts_logits():
    logits = torch.tensor([[2.0, 0.1], [0.0, 1.0], [5.0, -1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_macro_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, size=200))
    assert macro_f1(p, y) == pytest.approx(f1_score(y, p, average="macro"))
    assert macro_f1(torch.as_tensor(p), torch.as_tensor(y), num_classes=5) == pytest.approx(
        f1_score(y, p, average="macro")
    )


def test_macro_f1_hand_computed_and_classes_from_either_side():
    y = [0, 0, 1, 1]
    p = [0, 1, 1, 2]
    # class 0: tp=1 fp=0 fn=1 -> 2/3 ; class 1: tp=1 fp=1 fn=1 -> 1/2 ; class 2 (predicted only) -> 0
    expected = (2 / 3 + 0.5 + 0.0) / 3
    assert macro_f1(p, y) == pytest.approx(expected)
    assert macro_f1(p, y) == pytest.approx(f1_score(y, p, average="macro"))


def test_macro_f1_num_classes_check():
    with pytest.raises(ValueError):
        macro_f1([0, 3], [0, 1], num_classes=3)


def test_top1_agreement():
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0]])
    t = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0], [0.0, 5.0, 0.0]])
    assert top1_agreement(s, t) == pytest.approx(0.75)


def test_classification_metrics_keys():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert set(classification_metrics(logits)) == set()
    m = classification_metrics(logits, labels)
    assert set(m) == {"accuracy", "macro_f1"}
    assert m["accuracy"] == pytest.approx(2 / 3)
    m = classification_metrics(logits, labels, teacher_logits=logits.numpy())
    assert set(m) == {"accuracy", "macro_f1", "agreement"}
    assert m["agreement"] == 1.0
    assert set(classification_metrics(logits, teacher_logits=logits)) == {"agreement"}


# ------------------------------------------------------------------------------------------ embeddings
def _random_emb(n=120, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_mean_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [2.0, 0.0]])
    assert mean_cosine(a, b) == pytest.approx(0.5)
    assert mean_cosine(a, a.numpy()) == pytest.approx(1.0)


def test_neighbour_recall_identity_scale_rotation():
    t = _random_emb()
    assert neighbour_recall_at_k(t, t, k=10) == pytest.approx(1.0)
    assert neighbour_recall_at_k(t * 3.5, t, k=10) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    assert neighbour_recall_at_k(t @ q, t, k=10) == pytest.approx(1.0)
    assert neighbour_recall_at_k(t.double().numpy(), t.numpy(), k=5) == pytest.approx(1.0)


def test_neighbour_recall_random_student_is_low():
    t = _random_emb(seed=0)
    s = _random_emb(seed=1)
    r = neighbour_recall_at_k(s, t, k=10)
    assert 0.0 <= r < 0.5


def test_neighbour_recall_different_dims():
    t = _random_emb(d=32)
    # a student in 48 dims that embeds the teacher isometrically keeps all neighbourhoods
    s = torch.cat([t, torch.zeros(t.shape[0], 16)], dim=1)
    assert neighbour_recall_at_k(s, t, k=10) == pytest.approx(1.0)
    r = neighbour_recall_at_k(_random_emb(d=8, seed=3), t, k=10)
    assert 0.0 <= r < 0.5


def test_neighbour_recall_hand_computed():
    # teacher on a line: 0, 1 close; 2, 3 close (by angle). Student swaps the pairs' partners for row 0.
    t = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    assert neighbour_recall_at_k(t, t, k=1) == 1.0
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    # teacher NN: 0->1, 1->0, 2->3, 3->2 ; student NN: 0->2, 1->3, 2->0, 3->1 -> no overlap
    assert neighbour_recall_at_k(s, t, k=1) == 0.0


def test_neighbour_recall_k_clamped():
    t = _random_emb(n=5)
    s = _random_emb(n=5, seed=7)
    # k clamped to n - 1 = 4: every other row is a neighbour under both -> recall 1
    assert neighbour_recall_at_k(s, t, k=50) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        neighbour_recall_at_k(t[:1], t[:1])
    with pytest.raises(ValueError):
        neighbour_recall_at_k(t, t[:4])


def test_neighbour_recall_chunked(monkeypatch):
    import potstill.eval.metrics as m

    t = _random_emb(n=300, d=8)
    s = t + 0.3 * _random_emb(n=300, d=8, seed=5)
    full = neighbour_recall_at_k(s, t, k=7)
    monkeypatch.setattr(m, "_CHUNK", 64)
    assert neighbour_recall_at_k(s, t, k=7) == pytest.approx(full)
    assert 0.0 < full < 1.0


def test_embedding_metrics_keys():
    t = _random_emb()
    m = embedding_metrics(t, t, k=5)
    assert set(m) == {"cosine_to_teacher", "neighbour_recall@5"}
    assert m["cosine_to_teacher"] == pytest.approx(1.0)
    assert m["neighbour_recall@5"] == pytest.approx(1.0)
    m = embedding_metrics(_random_emb(d=8), t)
    assert "neighbour_recall@10" in m


def _blobs(n_per=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 6) * 10
    x = np.concatenate([c + rng.normal(size=(n_per, 6)) for c in centres])
    y = np.repeat(["sport", "tech", "politics"], n_per)
    return x, y


def test_linear_probe_separable_blobs():
    xtr, ytr = _blobs(seed=0)
    xte, yte = _blobs(seed=1)
    assert linear_probe_accuracy(xtr, ytr, xte, yte) >= 0.97
    # int labels and torch inputs
    yi = np.unique(ytr, return_inverse=True)[1]
    yti = np.unique(yte, return_inverse=True)[1]
    acc = linear_probe_accuracy(torch.as_tensor(xtr), torch.as_tensor(yi), torch.as_tensor(xte), yti, seed=3)
    assert acc >= 0.97


def test_linear_probe_standardize_recovers_small_differences_on_a_large_offset():
    """Class information 1e-3 the size of a shared offset: L2-normalised + C=1 cannot see it, z-scoring can."""
    xtr, ytr = _blobs(seed=0)
    xte, yte = _blobs(seed=1)
    offset = np.full(xtr.shape[1], 1e4)
    small_tr, small_te = offset + xtr, offset + xte
    assert linear_probe_accuracy(small_tr, ytr, small_te, yte) < 0.7
    assert linear_probe_accuracy(small_tr, ytr, small_te, yte, standardize=True) >= 0.97


def test_similarity_spearman_perfect_rank():
    # embeddings at angles; ratings are a monotone function of the cosine -> rho = 1
    angles = np.array([0.0, 0.3, 0.9, 1.4, 2.2])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    cos = emb @ emb.T
    ratings = np.exp(2 * cos)  # monotone increasing
    assert similarity_spearman(emb, ratings) == pytest.approx(1.0)
    assert similarity_spearman(emb, -ratings) == pytest.approx(-1.0)
    # the diagonal and lower triangle are ignored
    r2 = ratings.copy()
    r2[np.tril_indices(5)] = 0.0
    assert similarity_spearman(torch.as_tensor(emb), r2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        similarity_spearman(emb, ratings[:4, :4])


def test_pair_spearman():
    a = np.array([[1.0, 0.0]] * 4)
    angles = np.array([0.1, 0.5, 1.0, 2.0])
    b = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    scores = [5.0, 4.0, 2.5, 0.0]  # decreasing with angle == increasing with cosine
    assert pair_spearman(a, b, scores) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- speed
def test_count_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2
    model[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 3 + 3 * 2 + 2
    assert count_parameters(model) == 23


def test_measure_throughput_counts_items():
    seen: list = []
    grad_enabled: list[bool] = []

    def fn(batch):
        grad_enabled.append(torch.is_grad_enabled())
        seen.append(list(batch))
        time.sleep(0.01)

    items = list(range(10))
    rate = measure_throughput(fn, items, batch_size=4, warmup_batches=2, min_seconds=0.15)
    assert rate > 0
    # batch of 4 per >= 10 ms -> at most 400 items/s, and not wildly below (sleep overshoot is small)
    assert 50 < rate <= 400
    assert all(len(b) == 4 for b in seen)
    timed = seen[2:]
    # consecutive batches, cycling: the timed part starts at item 0 and covers every item
    flat = [x for b in timed for x in b]
    assert flat[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert set(flat) == set(items)
    assert not any(grad_enabled)


def test_measure_throughput_full_pass_even_when_fast():
    calls: list = []
    items = list(range(100))
    measure_throughput(calls.append, items, batch_size=8, warmup_batches=0, min_seconds=0.0)
    assert sum(len(b) for b in calls) >= 100
    assert len(calls) == 13  # ceil(100 / 8)
    calls.clear()
    measure_throughput(calls.append, items, batch_size=8, warmup_batches=0, min_seconds=0.0, max_items=20)
    assert len(calls) == 5 and max(x for b in calls for x in b) < 20  # 5 timed blocks of one batch each
    with pytest.raises(ValueError):
        measure_throughput(calls.append, [], min_seconds=0.0)


def test_compare_throughput_keys_and_ratio():
    def fast(batch):
        time.sleep(0.002)

    def slow(batch):
        time.sleep(0.008)

    out = compare_throughput(
        {"fast": fast, "slow": slow}, list(range(8)), batch_size=4, rounds=3, min_seconds=0.05
    )
    assert list(out) == ["fast", "slow"]
    assert all(v > 0 for v in out.values())
    assert out["fast"] > out["slow"]
