"""The general evaluation suite: metrics against hand-computed values, and the runner with fake encoders."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from potstill.data import suite_tasks
from potstill.data.suite_tasks import TASK_TYPES, TASKS, SuiteTask, task_texts
from potstill.errors import UserError
from potstill.eval import suite_metrics as M
from potstill.eval.suite import cached_encoder, run_suite


# ------------------------------------------------------------------------------------------------- metrics
def test_average_precision_by_hand():
    # relevant items at ranks 1 and 3: (1/1 + 2/3) / 2
    assert M.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(M.average_precision([0.1, 0.2], [0, 0]))


def test_cosine_ap_by_hand():
    emb1 = np.array([[1.0, 0.0]] * 4)
    emb2 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])  # cosines 1, 0, 0.71, -1
    # ranked: pos, neg, neg, pos -> precision 1/1 at rank 1 and 2/4 at rank 4
    assert M.cosine_ap(emb1, emb2, [1, 0, 0, 1]) == pytest.approx((1 + 0.5) / 2)


def test_mean_average_precision_by_hand():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    candidates = [np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]), np.array([[0.0, 2.0], [1.0, 0.0]])]
    # query 1: its relevant candidate (cosine 0) is ranked 3rd -> AP 1/3; query 2: ranked 1st -> AP 1
    assert M.mean_average_precision(queries, candidates, [[1], [0]]) == pytest.approx((1 / 3 + 1) / 2)


def test_retrieval_ndcg_and_mrr_at_10_by_hand():
    corpus = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    out = M.retrieval_scores(queries, corpus, [[1], [2]], k=10)
    # query 1 finds its document at rank 2, query 2 at rank 1
    assert out["mrr@10"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)


def test_sts_spearman_by_hand():
    emb1 = np.array([[1.0, 0.0]] * 4)
    angles = np.radians([0, 30, 60, 90])
    emb2 = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # cosines 1, .87, .5, 0
    # rank differences 0, 0, 1, 1 -> rho = 1 - 6 * 2 / (4 * (16 - 1))
    assert M.sts_spearman(emb1, emb2, [4.0, 3.0, 1.0, 2.0]) == pytest.approx(0.8)


def _entropy(counts: list[int]) -> float:
    n = sum(counts)
    return -sum(c / n * math.log(c / n) for c in counts if c)


def test_v_measure_by_hand():
    emb = np.array([[0.0, 0.0], [0.0, 0.1], [10.0, 10.0], [10.0, 10.1]])  # k-means: {0, 1}, {2, 3}
    labels = ["a", "b", "b", "b"]
    h = 1 - (0.5 * _entropy([1, 1]) + 0.5 * _entropy([2])) / _entropy([1, 3])  # homogeneity
    c = 1 - (0.25 * _entropy([1]) + 0.75 * _entropy([1, 2])) / _entropy([2, 2])  # completeness
    assert M.v_measure(emb, labels) == pytest.approx(2 * h * c / (h + c))
    assert M.v_measure(emb, ["x", "x", "y", "y"]) == pytest.approx(1.0)


def test_probe_accuracy_on_separable_data():
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(-3, 0.5, (20, 4)), rng.normal(3, 0.5, (20, 4))])
    test = np.concatenate([rng.normal(-3, 0.5, (10, 4)), rng.normal(3, 0.5, (10, 4))])
    assert M.probe_accuracy(train, ["n"] * 20 + ["p"] * 20, test, ["n"] * 10 + ["p"] * 10) == 1.0


# -------------------------------------------------------------------------------------------------- tasks
def test_tasks_cover_every_type_with_documented_sources():
    assert len(TASKS) >= 8
    assert {t.type for t in TASKS.values()} == set(TASK_TYPES)
    sources = {t.source.split(",")[0].split("(")[0].strip() for t in TASKS.values()}
    assert len(sources) >= 5
    for task in TASKS.values():
        assert task.source and task.size and task.licence and task.main_metric


# ------------------------------------------------------------------------------------------------- runner
_VECTORS = {"q1": [1.0, 0.0], "q2": [0.0, 1.0], "d0": [1.0, 0.0], "d1": [0.8, 0.6], "d2": [0.0, 1.0],
            "c0": [1.0, 0.0], "c1": [0.0, 1.0], "c2": [0.7, 0.7]}


def _lookup(texts: list[str]) -> np.ndarray:
    return np.array([_VECTORS[t] for t in texts])


@pytest.fixture
def tiny_tasks(monkeypatch):
    tiny = {
        "tiny-retrieval": SuiteTask("tiny-retrieval", "retrieval", "ndcg@10", "hand-made", "2 queries", "CC0",
                                    lambda: {"queries": ["q1", "q2"], "corpus": ["d0", "d1", "d2"],
                                             "relevant": [[1], [2]]}),
        "tiny-reranking": SuiteTask("tiny-reranking", "reranking", "map", "hand-made", "1 query", "CC0",
                                    lambda: {"queries": ["q1"], "candidates": [["c0", "c1", "c2"]],
                                             "relevant": [[1]]}),
    }
    for name, task in tiny.items():
        monkeypatch.setitem(suite_tasks.TASKS, name, task)
    return list(tiny)


def test_run_suite_on_tiny_tasks_matches_hand_values(tiny_tasks):
    calls: list[int] = []

    def encode(texts):
        calls.append(len(texts))
        return _lookup(texts)

    result = run_suite(encode, tasks=tiny_tasks, progress=False)
    assert sum(calls) == 8  # each distinct text encoded once
    assert result.per_task["tiny-retrieval"]["score"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert result.per_task["tiny-retrieval"]["mrr@10"] == pytest.approx(0.75)
    assert result.per_task["tiny-reranking"]["score"] == pytest.approx(1 / 3)
    assert result.per_task["tiny-reranking"]["n"] == 1
    assert result.per_type == pytest.approx({"reranking": 1 / 3, "retrieval": result.per_task["tiny-retrieval"]
                                             ["score"]})
    assert result.average == pytest.approx(np.mean([r["score"] for r in result.per_task.values()]))
    assert result.fidelity == {"cosine_to_teacher": None, "neighbour_recall@10": None}
    data = json.loads(result.to_json())
    assert data["average_is"] == "mean over tasks (MTEB)" and set(data["per_task"]) == set(tiny_tasks)
    assert "tiny-reranking" in result.table()


def _bag_of_words(texts: list[str], dims: int = 1024) -> np.ndarray:
    out = np.zeros((len(texts), dims))
    for i, text in enumerate(texts):
        for word in text.lower().split():
            out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % dims] += 1.0
    return out + 1e-3


def test_run_suite_with_bag_of_words_on_real_tasks():
    names = ["polarity-classification", "analogy-clustering", "analogy-pairclassification",
             "newsgroups-reranking", "newsgroups-retrieval", "wordsim-sts"]
    teacher = cached_encoder(_bag_of_words)
    result = run_suite(_bag_of_words, teacher_encode=teacher, tasks=names, progress=False)
    assert list(result.per_task) == names
    assert set(result.per_type) == set(TASK_TYPES)
    for row in result.per_task.values():
        assert -1.0 <= row["score"] <= 1.0 and row["n"] > 0
    # the retrieval task's subject lines share words with their posts: bag-of-words finds some of them
    assert result.per_task["newsgroups-retrieval"]["score"] > 0.1
    assert result.average_over_types == pytest.approx(np.mean(list(result.per_type.values())))
    assert result.fidelity["cosine_to_teacher"] == pytest.approx(1.0, abs=1e-5)
    assert result.fidelity["neighbour_recall@10"] == pytest.approx(1.0, abs=0.05)


def test_run_suite_rejects_unknown_task_and_bad_encoder():
    with pytest.raises(UserError, match="unknown suite task"):
        run_suite(_bag_of_words, tasks=["no-such-task"], progress=False)
    with pytest.raises(UserError, match="encode returned shape"):
        run_suite(lambda texts: np.zeros((1, 3)), tasks=["wordsim-sts"], progress=False)


def test_task_texts_lists_every_side():
    data = {"queries": ["a"], "corpus": ["b"], "candidates": [["c", "d"]], "texts1": ["e"], "texts2": ["f"]}
    assert sorted(task_texts(data)) == list("abcdef")


def test_eval_command_suite_option_checks_its_input(tmp_path, capsys):
    from potstill.cli import main

    assert main(["eval", str(tmp_path), "--suite", "general"]) == 2
    assert "not a finished embedding run" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--suite", "mteb"]) == 2
    assert "--suite: expected general" in capsys.readouterr().err
