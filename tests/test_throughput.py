"""Trap 15: throughput is measured in warmed-up, interleaved blocks that each last a minimum time, reported as the
median block rate with its spread; the "student (before)" row carries no copy of the after row's speed."""

from __future__ import annotations

import pytest

from potstill.eval.speed import Throughput, compare_throughput_stats, measure_throughput_stats


class FakeClock:
    """A clock that moves only when a fake model runs: `cost[name]` time units per batch."""

    def __init__(self, cost: dict[str, float]) -> None:
        self.now, self.cost, self.calls = 0.0, cost, []

    def __call__(self) -> float:
        return self.now

    def model(self, name: str):
        def run(batch: list) -> None:
            self.calls.append((name, tuple(batch)))
            self.now += self.cost[name]

        return run


def test_blocks_last_the_minimum_time_and_interleave():
    clock = FakeClock({"a": 1, "b": 4})
    stats = compare_throughput_stats({"a": clock.model("a"), "b": clock.model("b")}, list(range(8)), batch_size=4,
                                     repeats=3, block_seconds=10, warmup_batches=2, warmup_seconds=0, clock=clock)
    timed = [name for name, _ in clock.calls[4:]]  # after 2 warm-up batches each
    # a block of a: 10 batches (10 units); of b: 3 batches (12 units ≥ 10); the order flips every round
    assert timed == ["a"] * 10 + ["b"] * 3 + ["b"] * 3 + ["a"] * 10 + ["a"] * 10 + ["b"] * 3
    assert stats["a"].rates == (4.0, 4.0, 4.0)  # 10 batches × 4 items / 10 units
    assert stats["b"].rates == (1.0, 1.0, 1.0)  # 3 × 4 / 12
    assert stats["a"].seconds == 30 and stats["b"].seconds == 36  # ≥ repeats × block_seconds each
    assert stats["a"].items == 120 and stats["b"].items == 36


def test_warm_up_runs_untimed_and_timing_starts_at_item_0():
    clock = FakeClock({"a": 1})
    stats = compare_throughput_stats({"a": clock.model("a")}, list(range(6)), batch_size=2, repeats=1,
                                     block_seconds=3, warmup_batches=0, warmup_seconds=2, clock=clock)
    assert [batch for _, batch in clock.calls] == [(0, 1), (2, 3), (0, 1), (2, 3), (4, 5)]
    assert stats["a"].rates == (2.0,) and stats["a"].seconds == 3


def test_a_stalled_block_moves_neither_median_nor_much_spread():
    stalled = iter([1] * 4 + [50] + [1] * 40)  # the 5th timed batch is held up by another process
    now = [0.0]

    def fn(batch: list) -> None:
        now[0] += next(stalled)

    stats = measure_throughput_stats(fn, list(range(4)), batch_size=4, warmup_batches=0, min_seconds=5, repeats=5,
                                     clock=lambda: now[0])
    assert stats.rates == (4.0, 4.0, 4.0, 4.0, 4 / 50)
    assert stats.median == 4.0 and stats.spread == 0.0


def test_spread_is_the_relative_interquartile_range():
    assert Throughput((1.0, 2.0, 3.0, 4.0, 5.0), 5.0, 10).spread == pytest.approx((4 - 2) / 3)
    assert Throughput((7.0,), 1.0, 7).spread == 0.0


def test_before_row_has_no_copy_of_the_after_speed(digits_recipe):
    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    digits_recipe["trainer"]["max_steps"] = 2
    digits_recipe["eval"] = {"compare_before": True, "throughput": True}
    teacher, before, after = run_recipe(validate_recipe(digits_recipe))["table"]
    assert before["model"] == "student (before)" and after["model"] == "student (after)"
    assert before["params"] == after["params"] == 16 * 64 + 16 + 10 * 16 + 10
    assert "samples_per_s" not in before and "samples_per_s_spread" not in before
    for row in (teacher, after):
        assert row["samples_per_s"] > 0 and row["samples_per_s_spread"] >= 0


def test_a_stalled_batch_inside_a_block_does_not_move_its_rate():
    costs = iter([1, 1, 50, 1, 1] * 3)
    now = [0.0]

    def fn(batch: list) -> None:
        now[0] += next(costs)

    stats = measure_throughput_stats(fn, list(range(4)), batch_size=4, warmup_batches=0, min_seconds=162,
                                     repeats=3, clock=lambda: now[0])
    assert stats.rates == (4.0, 4.0, 4.0)  # the median batch of each 5-batch block: 1 unit; the mean: 10.8
    assert stats.seconds == 162 and stats.items == 60
