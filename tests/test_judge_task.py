"""task: judge (Self-J through `potstill run`): the recipe's rules, the metrics by hand, the labels and the before
row against the tiny LM's own self-evaluation, training toward the labels, the saved judge, and bad records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from potstill.config import validate_recipe
from potstill.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [f"what is {a} + {b}?" for a, b in ((2, 3), (4, 1), (6, 2), (3, 3), (5, 4), (7, 1))]


def char_embedder(texts: list[str]) -> np.ndarray:
    """A stand-in for MiniLM: letter and digit counts (cosine 1 for equal texts, lower the more they differ)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789=+"
    return np.array([[t.lower().count(c) + 0.1 for c in alphabet] for t in texts], dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """The tiny judging LM of conftest, saved as a folder."""
    from conftest import tiny_digit_lm

    model, tok = tiny_digit_lm(max_positions=512)
    folder = tmp_path_factory.mktemp("judge") / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def records(with_truth: bool) -> list[dict]:
    rows = []
    for group, question in enumerate(QUESTIONS):
        a, b = (int(x) for x in question.removeprefix("what is ").removesuffix("?").split(" + "))
        for guess in (a + b, a + b + 3):
            row = {"instruction": question, "response": f"{a} + {b} = {guess}", "reference": f"{a} + {b} = {a + b}"}
            if with_truth:
                row.update(quality=1.0 - abs(guess - a - b) / (a + b), correct=guess == a + b, group=group)
            rows.append(row)
    return rows


def judge_recipe(tmp_path, lm, **changes) -> dict:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for split, truth in (("train", False), ("eval", True)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(truth)))
    raw = {"name": "j", "output_dir": str(tmp_path / "runs"), "task": "judge", "seed": 0,
           "teacher": {"path": str(lm)},
           "student": {"init": "factory", "factory": "potstill.students.self_judge:score_head", "kwargs": {"rank": 4}},
           "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "system": None},
           "objectives": [{"name": "self_judge"}],
           "trainer": {"max_steps": 40, "batch_size": 4, "lr": 0.02, "weight_decay": 0.0, "schedule": "constant"},
           "eval": {"throughput": False, "batch_size": 4}}
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


@pytest.fixture
def fake_minilm(monkeypatch):
    import potstill.data.program_exemplars as exemplars

    monkeypatch.setattr(exemplars, "minilm_embedder", lambda: char_embedder)


def test_judge_metrics_by_hand():
    from potstill.eval.judge import judge_metrics

    scores = [3.0, 1.0, 2.0, 5.0, 5.0, 0.0]
    m = judge_metrics(scores, quality=[3, 1, 2, 6, 4, 0], correct=[True, False, False, False, True, False],
                      groups=[0, 0, 0, 1, 1, 1], labels=[0, 1, 2, 3, 4, 5])
    # ranks of the scores 4, 2, 3, 5.5, 5.5, 1 against quality ranks 4, 2, 3, 6, 5, 1
    assert m["spearman"] == pytest.approx(0.9856, abs=1e-4)
    assert m["best_of_n_acc"] == 0.5  # group 0: index 0 (right); group 1: index 3, the first of the tie (wrong)
    assert m["selective_acc_50"] == pytest.approx(2 / 3)  # top 3: indices 3 (wrong), 4 and 0 (right)
    assert m["mean_score"] == pytest.approx(16 / 6)
    flat = judge_metrics([1.0, 1.0, 1.0, 1.0], quality=[0.0, 1.0, 1.0, 0.0], correct=[False, True, True, False],
                         groups=[0, 0, 1, 1])
    assert flat["spearman"] == 0.0  # a constant score ranks nothing
    assert flat["best_of_n_acc"] == 0.5 and flat["selective_acc_50"] == 0.5  # ties: the first of each, in order
    assert set(judge_metrics([1.0, 2.0])) == {"mean_score"}
    with pytest.raises(ValueError, match="2 scores but 1 values of quality"):
        judge_metrics([1.0, 2.0], quality=[1.0])


def test_recipe_mistakes_are_one_line_naming_the_field(tmp_path, tiny_lm):
    base = judge_recipe(tmp_path, tiny_lm)
    cases = [
        ({"student": {"factory": "potstill.students.graph_mlp:GraphMLP"}}, "student.factory"),
        ({"objectives": [{"name": "forward_kl"}]}, "self_judge only, got forward_kl"),
        ({"student": {"kwargs": {"rank": 4, "hidden": 8}}}, "hidden not read"),
        ({"teacher": {"path": None}}, "needs teacher.path"),
        ({"trainer": {"hard_label_weight": 1.0}}, "trainer.hard_label_weight"),
        ({"data": {"similarity_weight": 1.5}}, "data.similarity_weight"),
    ]
    for change, words in cases:
        with pytest.raises(UserError) as err:
            validate_recipe(judge_recipe(tmp_path, tiny_lm, **change))
        assert words in str(err.value) and "\n" not in str(err.value).strip(), str(err.value)
    assert validate_recipe(base).data.max_length == 512


def test_labels_and_the_before_row_are_the_lms_own_self_evaluation(tmp_path, tiny_lm, fake_minilm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.data.self_judge import recalibrated_label
    from potstill.eval.judge import judge_metrics
    from potstill.students.self_judge import SelfJudge
    from potstill.tasks import build_task

    task = build_task(validate_recipe(judge_recipe(tmp_path, tiny_lm)), run_dir=tmp_path / "probe")
    task.setup()
    judge = SelfJudge(AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm), rank=4)
    rows = records(True)
    args = [[r[k] for r in rows] for k in ("instruction", "response")]
    refs = [r["reference"] for r in rows]
    with_ref, free = judge.score(*args, references=refs), judge.score(*args)
    a, b = char_embedder([r["response"] for r in rows]), char_embedder(refs)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    labels = recalibrated_label(with_ref.numpy(), cos)
    assert np.allclose(task.labels["eval"].numpy(), labels, atol=1e-4)
    truth = {"quality": [r["quality"] for r in rows], "correct": [r["correct"] for r in rows],
             "groups": [r["group"] for r in rows]}
    before = task.evaluate(task.student, role="student")
    want = judge_metrics(free.numpy(), **truth, labels=labels)
    assert before == pytest.approx(want, abs=1e-4)
    assert task.evaluate(task.teacher, role="teacher") == pytest.approx(
        judge_metrics(with_ref.numpy(), **truth, labels=labels), abs=1e-4)
    # the teacher signal: the labels as two-hot targets; the student: its head on both views
    batch = task.collate(task.train_records[:3], [0, 1, 2])
    targets = task.teacher_signal(batch)
    assert torch.allclose((targets * torch.arange(10.0)).sum(-1), task.labels["train"][:3], atol=1e-5)
    views = task.student_signal(task.student, batch)
    assert views.free.shape == views.ref.shape == (3, 10)


def test_training_moves_the_head_toward_the_labels_and_the_judge_loads_back(tmp_path, tiny_lm, fake_minilm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.students.self_judge import load_judge
    from potstill.train import run_recipe

    summary = run_recipe(validate_recipe(judge_recipe(tmp_path, tiny_lm)))
    table = {row["model"]: row for row in summary["table"]}
    assert set(table) == {"teacher", "student (before)", "student (after)"}
    run = tmp_path / "runs" / "j"
    rows = records(False)
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    judge = load_judge(run / "student", model, tok)
    args = [[r[k] for r in rows] for k in ("instruction", "response")]
    from potstill.tasks import build_task

    task = build_task(validate_recipe(judge_recipe(tmp_path, tiny_lm)), run_dir=tmp_path / "probe")
    task.setup()
    labels = task.labels["train"]
    trained, untrained = judge.score(*args), task.scores(task.judge.head, split="train")
    assert (trained - labels).abs().mean() < 0.5 * (untrained - labels).abs().mean()
    eval_scores = judge.score(*[[r[k] for r in records(True)] for k in ("instruction", "response")])
    assert table["student (after)"]["mean_score"] == pytest.approx(float(eval_scores.mean()), abs=1e-4)
    assert load_judge(run / "student").token_ids == judge.token_ids  # the LM named in the folder
    from potstill.evaluate import evaluate_run

    rows = {row["model"]: row for row in evaluate_run(run)}  # potstill eval: the saved head, scored again
    for key in ("mean_score", "spearman", "spearman_vs_label"):
        assert rows["student"][key] == pytest.approx(table["student (after)"][key], abs=1e-5)
        assert rows["teacher"][key] == pytest.approx(table["teacher"][key], abs=1e-5)
    from potstill.assets import minilm_path

    other = AutoTokenizer.from_pretrained(minilm_path())  # another model's digit ids: refused
    with pytest.raises(UserError, match="trained on score tokens"):
        load_judge(run / "student", model, other)


def test_bad_records_are_one_line_errors(tmp_path, tiny_lm, fake_minilm, capsys):
    import yaml

    from potstill.cli import main

    raw = judge_recipe(tmp_path, tiny_lm)
    rows = records(True)
    rows[2]["quality"] = "high"
    (tmp_path / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.eval" in err and "record 3: field 'quality' must be a number, got 'high'" in err, err
    assert "\n" not in err and "Traceback" not in err
    rows = records(True)
    rows[0]["group"] = [1, 2]
    (tmp_path / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["run", str(path)]) == 2
    assert "record 1: field 'group' must be text or a whole number" in capsys.readouterr().err
    raw = judge_recipe(tmp_path, tiny_lm, data={"max_length": 20})
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.train: record 1: its judging prompt is" in err and "over data.max_length 20 (12 records" in err, err


def test_a_killed_run_resumes_to_the_uninterrupted_head(tmp_path, tiny_lm, fake_minilm):
    from conftest import fit_until_crash
    from safetensors.torch import load_file

    from potstill.train import run_recipe

    steps = {"max_steps": 6, "save_every": 2}
    straight = validate_recipe(judge_recipe(tmp_path, tiny_lm, name="straight", trainer=steps))
    run_recipe(straight)
    halted = validate_recipe(judge_recipe(tmp_path, tiny_lm, name="halted", trainer=steps))
    fit_until_crash(halted, 4)
    run_recipe(halted, resume=True)
    a = load_file(str(straight.run_dir / "student" / "model.safetensors"))
    b = load_file(str(halted.run_dir / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
