"""benchmarks/bialign.py: its toy ICL tasks and Kendall τ by hand, and its --quick path end to end (slow)."""

from __future__ import annotations

import random
from types import ModuleType

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bialign")


def test_kendall_tau_by_hand(bench) -> None:
    assert bench.kendall_tau([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == 1.0
    assert bench.kendall_tau([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == -1.0
    # pairs (0,1) concordant, (0,2) concordant, (1,2) discordant: (2 − 1) / 3
    assert bench.kendall_tau([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(1 / 3)


def test_query_pool_holds_the_answer_and_one_distractor(bench) -> None:
    rng = random.Random(0)
    task = bench.random_task(rng)
    q = bench.query(task, rng)
    key = int(q.query[1:])
    assert q.target == f"v{task[key]}"
    on_key = [d.output for d in q.pool if d.input == q.query]
    assert len(q.pool) == 7 and len(on_key) == 2 and q.target in on_key
    assert all(d.output == f"v{task[int(d.input[1:])]}" for d in q.pool if d.input != q.query)


def test_pretraining_batch_targets_are_the_values(bench) -> None:
    batch = bench.pretraining_batch(random.Random(0), 2, noise=0.0)
    ids, targets = batch["input_ids"], batch["targets"]
    assert torch.equal(targets[:, 0::2], ids[:, 1::2])  # after each key, its value
    assert (targets[:, 1::2] == -100).all()
    first = {}
    for key, value in zip(ids[0, 0::2].tolist(), ids[0, 1::2].tolist(), strict=True):
        assert first.setdefault(key, value) == value  # noise 0: one value per key


def test_split_keeps_held_out_tasks_apart(bench) -> None:
    train, held_out = bench.task_split()
    assert len(train) == 512 and len(held_out) == 64 and not set(train) & set(held_out)


@pytest.mark.slow
def test_quick_run(bench, tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--seeds", "0", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for row in ("| sft |", "| kd |", "| bialign |", "| teacher |"):
        assert row in out
