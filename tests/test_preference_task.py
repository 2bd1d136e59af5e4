"""Preference pairs in the causal_lm task (data.format: preference) with dpo_teacher_ref, on tiny Llamas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_causal_lm import llama, make_tokenizer, setup_task

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.losses.preference import sequence_logps
from potstill.tasks.preference import PairLogits
from potstill.train import run_recipe
from potstill.train.run import build_objectives

PAIRS = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran in the park"},
         {"prompt": "what is two plus two", "chosen": " four", "rejected": " a song"},
         {"prompt": "my friend", "chosen": " reads a book", "rejected": " sat on the roof"},
         {"prompt": "rain fell", "chosen": " on the old roof", "rejected": " on the cat"}]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    tok = make_tokenizer()
    folder = tmp_path_factory.mktemp("pref") / "teacher"
    llama(len(tok), layers=2, init=0.3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pair_recipe(tmp_path: Path, teacher: Path, *, objectives=None, data=None, **trainer):
    train = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    return validate_recipe({
        "name": "pref", "output_dir": str(tmp_path / "runs"), "task": "causal_lm", "seed": 0,
        "teacher": {"path": str(teacher)},
        "student": {"init": "layers_from_teacher", "layers": [0, 1]},
        "data": {"train": train, "eval": train, "max_length": 32, **(data or {})},
        "objectives": objectives if objectives is not None else [{"name": "dpo_teacher_ref"}],
        "trainer": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1, "num_threads": 1, **trainer},
        "eval": {"throughput": False, "compare_before": True}})


def test_pairs_collate_chosen_rows_then_rejected(tmp_path, teacher_dir):
    task = setup_task(pair_recipe(tmp_path, teacher_dir))
    assert task.train_format == "preference"
    tok = task.tokenizer
    batch = task.collate(task.train_records[:2], [0, 1])
    assert batch["input_ids"].shape[0] == 4 and task.count_rows(batch) == 2
    for row, (pair, key) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
        scored = [t for t in batch["targets"][row].tolist() if t != -100]
        assert tok.decode(scored, skip_special_tokens=True) == PAIRS[pair][key]


def test_student_equal_to_teacher_gives_log2_and_hard_label_on_chosen(tmp_path, teacher_dir):
    recipe = pair_recipe(tmp_path, teacher_dir)
    task = setup_task(recipe)
    batch = task.to_device(task.collate(task.train_records[:2], [0, 1]))
    teacher, student = task.teacher_signal(batch), task.student_signal(task.teacher, batch)
    assert isinstance(student, PairLogits)
    (objective,) = build_objectives(recipe, task)
    loss = objective(student, teacher, task.signal_mask(batch))
    assert loss.item() == pytest.approx(2 * math.log(2), abs=1e-5)  # summed over the 2 pairs
    ce = task.hard_label_loss(student, batch)
    assert ce.item() == pytest.approx(-sequence_logps(*student.chosen()).sum().item(), rel=1e-5)


def test_forward_kl_reads_only_chosen_rows(tmp_path, teacher_dir):
    recipe = pair_recipe(tmp_path, teacher_dir, objectives=[{"name": "forward_kl"}])
    task = setup_task(recipe)
    batch = task.to_device(task.collate(task.train_records[:2], [0, 1]))
    student = task.student_signal(task.student, batch)
    teacher = task.teacher_signal(batch)
    (objective,) = build_objectives(recipe, task)
    expected = torch.nn.functional.kl_div(student.logits[:2].log_softmax(-1), teacher.logits[:2].log_softmax(-1),
                                          log_target=True, reduction="none").sum(-1)
    expected = expected[batch["targets"][:2] != -100].sum()
    assert objective(student, teacher, task.signal_mask(batch)).item() == pytest.approx(expected.item(), rel=1e-4)


def test_run_reports_preference_accuracy(tmp_path, teacher_dir):
    summary = run_recipe(pair_recipe(tmp_path, teacher_dir))
    rows = {row["model"]: row for row in summary["table"]}
    teacher, before, after = rows["teacher"], rows["student (before)"], rows["student (after)"]
    assert "preference_accuracy" in teacher and "reward_accuracy" not in teacher
    # the student starts as the teacher's copy: same ranking, zero reward margin
    assert before["preference_accuracy"] == teacher["preference_accuracy"] and before["reward_margin"] == 0.0
    assert after["reward_margin"] > 0.0  # trained on the same pairs: chosen rises against rejected
    log = [json.loads(line) for line in (tmp_path / "runs" / "pref" / "metrics.jsonl").read_text().splitlines()]
    assert log[1]["obj/dpo_teacher_ref"] == pytest.approx(math.log(2), abs=1e-5)


def test_bad_preference_recipes(tmp_path, teacher_dir):
    with pytest.raises(UserError, match="data.packing"):
        setup_task(pair_recipe(tmp_path, teacher_dir, data={"packing": True}))
    with pytest.raises(UserError, match="objectives.0.params.loss_type: expected one of sigmoid, kto_pair"):
        setup_task(pair_recipe(tmp_path, teacher_dir, objectives=[{"name": "dpo_teacher_ref",
                                                                   "params": {"loss_type": "ipo"}}]))
    with pytest.raises(UserError, match="objectives.0.name: with preference pairs"):
        setup_task(pair_recipe(tmp_path, teacher_dir, objectives=[{"name": "taid"}]))
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "the cat", "completion": " sat"}])
    with pytest.raises(UserError, match="trains on preference pairs"):
        setup_task(pair_recipe(tmp_path, teacher_dir, data={"train": plain, "eval": plain}))
    with pytest.raises(UserError, match="data.eval: its records are prompt_completion"):
        setup_task(pair_recipe(tmp_path, teacher_dir, data={"eval": plain}))
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " b"}])
    with pytest.raises(UserError, match="record 0: 'chosen' and 'rejected' are the same"):
        setup_task(pair_recipe(tmp_path, teacher_dir, data={"train": same, "eval": None}))


def test_verified_pairs_from_generate_outputs(tmp_path):
    from potstill.data.preference import verified_pairs

    first, second = tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"
    write_jsonl(first, [{"prompt": "2+2", "completion": "4"}, {"prompt": "3+3", "completion": "6"}])
    write_jsonl(tmp_path / "s0.rejected.jsonl", [{"record": 3, "reason": "r", "prompt": "5+5", "response": "11"}])
    write_jsonl(second, [{"prompt": "5+5", "completion": "10"}, {"prompt": "2+2", "completion": "4 "}])
    write_jsonl(tmp_path / "s1.rejected.jsonl", [{"record": 1, "reason": "r", "prompt": "2+2", "response": "5"},
                                                 {"record": 2, "reason": "r", "prompt": "7+7", "response": "1"}])
    assert verified_pairs([first, second]) == [{"prompt": "2+2", "chosen": "4", "rejected": "5"},
                                               {"prompt": "5+5", "chosen": "10", "rejected": "11"}]
    with pytest.raises(UserError, match="no such file"):
        verified_pairs([tmp_path / "missing.jsonl"])
