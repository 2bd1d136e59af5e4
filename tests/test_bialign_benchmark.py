"""benchmarks/bialign.py: its toy ICL tasks and Kendall τ by hand, and its --quick path end to end (slow)."""

from __future__ import annotations

import random
from types import ModuleType

import pytest
import torch
from conftest import load_benchmark

from potstill.examples.icl_labels import KEYS


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bialign")


def test_kendall_tau_by_hand(bench) -> None:
    assert bench.kendall_tau([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == 1.0
    assert bench.kendall_tau([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == -1.0
    # pairs (0,1) concordant, (0,2) concordant, (1,2) discordant: (2 − 1) / 3
    assert bench.kendall_tau([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(1 / 3)


def test_query_pool_holds_three_right_demos(bench) -> None:
    q = bench.query(5, random.Random(0))
    assert q.target == "v5" and len(q.pool) == 7
    assert sum(d.output == "v5" for d in q.pool) == 3
    assert all(d.input in KEYS for d in q.pool) and q.query in KEYS  # the toy world of examples/icl_labels


def test_pretraining_batch_targets_are_the_labels(bench) -> None:
    batch = bench.pretraining_batch(random.Random(0), 4, noise=0.0)
    ids, targets = batch["input_ids"], batch["targets"]
    assert torch.equal(targets[:, 0::2], ids[:, 1::2])  # after each input, its label
    assert (targets[:, 1::2] == -100).all()
    for row in ids.tolist():
        assert len(set(row[1::2])) == 1  # noise 0: the task's label throughout


def test_held_out_labels_are_never_trained_answers(bench) -> None:
    assert not set(bench.TRAIN_LABELS) & set(bench.HELD_OUT_LABELS)
    assert sorted(bench.TRAIN_LABELS + bench.HELD_OUT_LABELS) == list(range(16))


@pytest.mark.slow
def test_quick_run(bench, tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--seeds", "0", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for row in ("| sft |", "| kd |", "| bialign (μ = 1, λ = 0.01) |", "| teacher |"):
        assert row in out
