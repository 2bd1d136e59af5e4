"""benchmarks/self_judge.py's pieces that decide its numbers: problems, the true quality and the metrics."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("self_judge")


def test_problems_are_new_and_solved(bench):
    seen: set[str] = set()
    train = bench.problems(random.Random(0), 30, seen)
    test = bench.problems(random.Random(1), 30, seen)
    assert len(seen) == 60 and not {e for e, _ in train} & {e for e, _ in test}
    for expr, gold in train + test:
        a, op, b = expr.split()
        assert gold == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] and gold >= 0


def test_closeness_by_hand(bench):
    assert bench.closeness("12 + 30 = 42", 42) == (1.0, True)
    assert bench.closeness("12 + 30 = 40 and", 42) == pytest.approx((1 - 2 / 42, False))
    assert bench.closeness("12 + 30 = 100", 42) == (0.0, False)
    assert bench.closeness("12 + 30 = ?", 42) == (0.0, False)


def test_metrics_by_hand(bench):
    score = np.array([3.0, 1.0, 2.0, 0.0])
    quality = np.array([1.0, 0.2, 0.5, 0.0])
    correct = np.array([1.0, 0.0, 0.0, 0.0])
    m = bench.metrics(score, quality, correct, [0, 0, 1, 1])
    assert m["spearman"] == pytest.approx(1.0) and m["best_of_n_acc"] == 0.5 and m["selective_acc_50"] == 0.5
    flat = bench.metrics(np.zeros(4), quality, correct, [0, 0, 1, 1])
    assert flat["spearman"] == 0.0 and flat["best_of_n_acc"] == 0.5  # ties: the first reply of each question
