"""benchmarks/bialign_seeds.py: the paired statistics by hand, and the tables pairing a row with μ = 0 by seed."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bialign_seeds")


def test_paired_difference_interval_and_sign_test_by_hand(bench) -> None:
    # differences .1, .2, 0: mean .1, sample std .1; t = .1 / (.1/√3) = √3 on 2 degrees of freedom, whose
    # two-sided p is 1 − t/√(t² + 2); t_.975(2) = 4.302653; the sign test drops the tie: 2 wins of 2, p = 2·¼
    p = bench.paired([0.3, 0.5, 0.4], [0.2, 0.3, 0.4])
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert p["n"] == 3 and p["mean"] == pytest.approx(0.1)
    assert p["low"] == pytest.approx(0.1 - half, abs=1e-6) and p["high"] == pytest.approx(0.1 + half, abs=1e-6)
    assert p["t_p"] == pytest.approx(1 - math.sqrt(3) / math.sqrt(5), abs=1e-6)
    assert (p["wins"], p["losses"]) == (2, 0) and p["sign_p"] == pytest.approx(0.5)


def test_paired_without_spread_has_no_interval(bench) -> None:
    p = bench.paired([0.5, 0.5], [0.5, 0.5])
    assert p["mean"] == 0 and math.isnan(p["low"]) and p["sign_p"] == 1.0


def test_tables_pair_only_seeds_run_in_both_rows(bench) -> None:
    def run(mu: float, seed: int, acc: float) -> dict:
        return {"row": bench.row_key(mu, []), "seed": seed, "answer_accuracy": acc, "demo_set_tau": 0.5,
                "kl_to_teacher": 0.2}

    results = [run(0.0, 0, 0.25), run(0.0, 1, 0.5), run(0.1, 0, 0.375), run(0.1, 1, 0.5), run(0.1, 2, 0.9)]
    text = bench.tables(results, bench.row_key(0.0, []))
    assert "| seed | mu=0 | mu=0.1 |" in text and "| 2 | — | 0.900 |" in text
    # seeds 0 and 1 only: differences .125 and 0
    assert "| mu=0.1 | answer_accuracy | 2 | +0.0625 |" in text
    assert "| 1 / 0 | 1.000 |" in text
