"""benchmarks/vqgraph.py end to end on a few epochs (skipped without the graph extra), and its split."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def vqgraph():
    return load_benchmark("vqgraph")


def test_stratified_split_keeps_every_class_in_every_part(vqgraph):
    labels = np.array([0] * 10 + [1] * 5)
    train, val, test = vqgraph.stratified_split(labels, (0.4, 0.2), seed=3)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(15))
    assert np.bincount(labels[train]).tolist() == [4, 2]
    assert np.bincount(labels[val]).tolist() == [2, 1]
    assert np.bincount(labels[test]).tolist() == [4, 2]


def test_best_on_validation_reports_the_test_score_of_the_best_validation_epoch(vqgraph):
    scores = iter([(0.5, 0.1), (0.9, 0.2), (0.7, 0.9)])
    assert vqgraph.best_on_validation(3, lambda: None, lambda: next(scores)) == 0.2


@pytest.mark.skipif(importlib.util.find_spec("graspologic") is None or importlib.util.find_spec("grakel") is None,
                    reason="graph extra not installed")
def test_a_short_run_prints_both_tables(vqgraph, tmp_path, capsys):
    pytest.importorskip("torch_geometric")
    threads = torch.get_num_threads()
    try:
        out_file = tmp_path / "vq.json"
        assert vqgraph.main(["--seeds", "0", "--epochs", "3", "--graph-epochs", "1", "--out", str(out_file)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "Drosophila left (projection features)" in out and "MUTAG" in out and "speed-up" in out
    saved = json.loads(out_file.read_text())
    assert set(saved["node"][0]) == {"teacher", "mlp", "glnn", "vqgraph", "speedup"}
    assert set(saved["graph"][0]) == {"teacher", "mlp", "glnn", "vqgraph"}
