"""benchmarks/capacity_gap_llm.py: the teacher shapes it picks, and a tiny sweep end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

capacity_gap_llm = pytest.importorskip("capacity_gap_llm")


def test_parameter_counts_by_hand() -> None:
    # width 32, 1 layer, FFN 96: q, k, v, o 4·32·32 = 4,096; gate, up, down 3·32·96 = 9,216; two layer norms and
    # the final norm 3·32 = 96. The tied embedding is 300·32 = 9,600.
    assert capacity_gap_llm.parameter_counts(32, 1, 300) == (4096 + 9216 + 96, 9600)


def test_teacher_shapes_are_the_closest_to_each_ratio() -> None:
    # Body of (64, 2) is 106,816; (64, 4) is twice it less one norm, (128, 2) and (128, 4) about 4x and 8x.
    shapes = capacity_gap_llm.teacher_shapes(64, 2, [1, 2, 4, 8], 4096)
    assert shapes == {1: (64, 2), 2: (64, 4), 4: (128, 2), 8: (128, 4)}


def bbc_validation_blocks(tokenizer, *, blocks_per_source: int, block_len: int) -> dict[str, torch.Tensor]:
    """Stands in for the general corpus' held-out sources in the smoke test (building that corpus takes ~5 s)."""
    from potstill.data.loaders import builtin_records

    ids = [t for r in builtin_records("bbc", "validation")[:4] for t in tokenizer(r["text"])["input_ids"]]
    return {"bbc-validation": torch.tensor(ids[:blocks_per_source * block_len]).view(blocks_per_source, block_len)}


def test_tiny_sweep_writes_its_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["capacity_gap_llm.py", "--out", str(tmp_path), "--seeds", "0", "--ratios", "2",
            "--student-width", "32", "--student-layers", "1", "--vocab", "300", "--teacher-articles", "4",
            "--student-articles", "1", "--teacher-epochs", "1", "--student-epochs", "1", "--max-length", "32",
            "--batch-size", "8", "--eval-blocks", "2", "--heldout-blocks", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(capacity_gap_llm, "heldout_blocks", bbc_validation_blocks)
    capacity_gap_llm.main()
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["runs"]) == {"ce-s0", "kd-2x-s0"}
    assert result["teachers"]["2"]["shape"] == [32, 2]
    assert result["student"] == {"shape": [32, 1], "body": 13408, "embedding": 9600}
    for run in [*result["runs"].values(), result["teachers"]["2"]]:
        assert set(run["ppl"]) == {"held-out", "in-domain"}
        assert all(1.0 < ppl < 300.0 for ppl in run["ppl"].values())  # better than uniform over 300 ids
    table = capsys.readouterr().out
    assert "| KD from the 2x teacher | 32 × 2 | 26,784 (2.00×) |" in table

    # A rerun with the same settings reuses the teacher and every finished run.
    monkeypatch.setattr(capacity_gap_llm, "run_recipe", lambda *a, **k: pytest.fail("nothing should train"))
    capacity_gap_llm.main()
