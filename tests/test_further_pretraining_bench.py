"""The further pre-training benchmark end to end at toy size (slow: real MiniLM, three runs of 2 steps)."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


@pytest.mark.slow
def test_benchmark_writes_one_row_per_seed_with_three_arms(tmp_path):
    assets = pytest.importorskip("potstill.assets")
    try:
        assets.minilm_path()
        assets.bbc_news()
    except Exception as err:  # MiniLM and BBC News are optional offline assets
        pytest.skip(f"offline assets missing: {err}")
    bench = load_benchmark("further_pretraining_sd")
    assert bench.main(["--seeds", "0", "--steps", "2", "--ft-epochs", "1", "--threads", "1",
                       "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert set(bench.ARMS) <= set(row)
    assert row["theta0"]["distance"] == 0.0  # θ0 against itself
    assert row["further_pretrained"]["distance"] > 0 and row["self_distilled"]["distance"] > 0
    assert all(0.0 <= row[arm]["probe"] <= 1.0 for arm in bench.ARMS)
    assert row["sd_term_first_last"][0] > 0  # φ ≠ θ0: the self-distillation term is positive from the start
