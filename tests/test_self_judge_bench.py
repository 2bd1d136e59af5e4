"""benchmarks/self_judge.py's pieces that decide its numbers: problems and the true quality (the metrics:
`potstill.eval.judge`, tests/test_judge_task.py)."""

from __future__ import annotations

import random

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
