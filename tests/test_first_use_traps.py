"""Regression tests for the first-use traps of issue #18 (one test group per trap)."""

from __future__ import annotations

import pytest
import transformers
from conftest import tiny_bert_encoder
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

from potstill.tasks.models import load_hf_teacher


@pytest.fixture
def quiet_transformers():
    """As the CLI runs: transformers' own loading report is silenced."""
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(before)


# ---- trap 1: a classification teacher whose head is freshly initialised must not be silent
def test_teacher_without_classifier_head_warns(tmp_path, capsys, quiet_transformers):
    folder = tiny_bert_encoder(tmp_path / "encoder", num_hidden_layers=1)  # a plain encoder: no classifier
    capsys.readouterr()
    load_hf_teacher(str(folder), AutoModelForSequenceClassification)
    err = capsys.readouterr().err
    assert "warning: field teacher.path:" in err
    assert "classifier.bias, classifier.weight" in err
    assert len([line for line in err.splitlines() if "warning" in line]) == 1  # one line


def test_fine_tuned_teacher_loads_without_warning(tmp_path, capsys, quiet_transformers):
    folder = tiny_bert_encoder(tmp_path / "encoder", num_hidden_layers=1)
    BertForSequenceClassification.from_pretrained(folder).save_pretrained(tmp_path / "clf")  # head now saved
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "clf")
    capsys.readouterr()
    load_hf_teacher(str(tmp_path / "clf"), AutoModelForSequenceClassification)
    assert "warning" not in capsys.readouterr().err


# ---- trap 2 and 3: a 3-class CSV with class names; the exported student answers the names in `pipeline`
def _three_class_run(tmp_path, quiet_transformers_):
    import torch
    from transformers import BertConfig

    from potstill.assets import minilm_path
    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)  # a teacher whose config names no class (LABEL_i)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    rows = [("the match ended in a draw", "sport"), ("shares fell sharply today", "business"),
            ("a new phone was announced", "tech")] * 4
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    recipe = validate_recipe({
        "name": "three", "output_dir": str(tmp_path / "runs"), "task": "classification",
        "teacher": {"path": str(tmp_path / "teacher")}, "student": {"init": "layers_from_teacher", "layers": [0]},
        "data": {"train": str(tmp_path / "train.csv"), "max_length": 16},
        "objectives": [{"name": "forward_kl"}], "trainer": {"max_steps": 2, "batch_size": 4},
        "eval": {"throughput": False, "compare_before": False}})
    run_recipe(recipe)
    return recipe.run_dir / "student"


def test_three_class_names_reach_the_exported_pipeline(tmp_path, quiet_transformers):
    from transformers import pipeline

    student = _three_class_run(tmp_path, quiet_transformers)
    classify = pipeline("text-classification", model=str(student), device="cpu")
    labels = {row["label"] for row in classify(["the match ended", "shares fell", "a new phone"], top_k=None)[0]}
    assert labels == {"business", "sport", "tech"}


def _recipe_with_student(tmp_path, student: dict):
    from potstill.config import validate_recipe

    folder = tiny_bert_encoder(tmp_path / "encoder", num_hidden_layers=2)
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\nc,z\n")
    return validate_recipe({
        "name": "three", "output_dir": str(tmp_path / "runs"), "task": "classification",
        "teacher": {"path": str(folder)}, "student": student, "data": {"train": str(tmp_path / "train.csv")},
        "objectives": [{"name": "forward_kl"}]})


@pytest.mark.parametrize("student", [{"init": "layers_from_teacher", "layers": [0], "config": {"num_labels": 3}},
                                     {"init": "from_config", "config": {"num_labels": 3, "num_hidden_layers": 1}}])
def test_student_num_labels_is_not_silently_ignored(tmp_path, quiet_transformers, student):
    from potstill.errors import UserError
    from potstill.train import run_recipe

    with pytest.raises(UserError, match=r"field student.config"):
        run_recipe(_recipe_with_student(tmp_path, student))


# ---- trap 6: the README's `serve builtin:smollm2` then `--model smollm2` must not get a 404
def test_serve_builtin_answers_its_short_name(monkeypatch, capsys):
    import httpx
    from test_causal_lm import llama, make_tokenizer

    import potstill.serve
    from potstill.cli import main
    from potstill.serve import LocalServer

    tok = make_tokenizer()
    tiny = llama(len(tok), layers=1, init=0.3).eval()
    monkeypatch.setattr(potstill.serve, "load_model", lambda path: (tiny, tok))  # stands in for SmolLM2
    answers = {}

    def ask_then_stop(self):
        for name in ("smollm2", "builtin:smollm2", "smollm2-135m-instruct", "gpt-4"):
            answers[name] = httpx.post(self.base_url + "/completions", timeout=30,
                                       json={"model": name, "prompt": "a", "max_tokens": 1})

    monkeypatch.setattr(LocalServer, "wait", ask_then_stop)
    assert main(["serve", "builtin:smollm2", "--port", "0"]) == 0
    assert {name: r.status_code for name, r in answers.items()} == {
        "smollm2": 200, "builtin:smollm2": 200, "smollm2-135m-instruct": 200, "gpt-4": 404}
    assert answers["smollm2"].json()["model"] == "smollm2-135m-instruct"


# ---- trap 10: Hugging Face Trainer names get the potstill field they mean
@pytest.mark.parametrize(("where", "key", "expected"), [
    ("trainer", "learning_rate", "is trainer.lr"),
    ("trainer", "num_train_epochs", "is trainer.epochs"),
    ("trainer", "gradient_accumulation_steps", "is trainer.grad_accum"),
    ("trainer", "save_steps", "is trainer.save_every"),
    ("trainer", "bf16", "is trainer.mixed_precision: bf16"),
    ("trainer", "per_device_train_batch_size", "is trainer.batch_size"),
    (None, "warmup_steps", "belongs under trainer: (trainer.warmup_steps)"),
    (None, "report_to", "belongs under trainer: (trainer.report_to)"),
    ("trainer", "optim", "is trainer.optimizer"),
    ("trainer", "metric_for_best_model", "is trainer.early_stopping.metric"),
])
def test_hf_trainer_names_get_the_potstill_field(tmp_path, where, key, expected):
    from potstill.config import load_recipe
    from potstill.errors import UserError

    raw = {"name": "x", "task": "classification", "teacher": {"path": "builtin:minilm"},
           "student": {"init": "from_config"}, "data": {"train": "a.csv"}, "objectives": [{"name": "forward_kl"}]}
    (raw.setdefault(where, {}) if where else raw)[key] = 1
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(UserError) as info:
        load_recipe(tmp_path / "r.yaml")
    field = f"{where}.{key}" if where else key
    assert f"field {field}: unknown key {key!r}: " in str(info.value) and expected in str(info.value)
    assert "did you mean" not in str(info.value)


def test_recipe_reference_page_is_generated():
    from potstill.config.reference import PAGE, render_reference

    assert PAGE.read_text(encoding="utf-8") == render_reference(), \
        "docs/recipe-fields.md is stale: run `python -m potstill.config.reference --write`"


def test_every_hf_trainer_alias_names_a_real_field():
    from potstill.config.messages import HF_TRAINER_NAMES
    from potstill.config.reference import render_reference

    page = render_reference()
    for target in filter(None, HF_TRAINER_NAMES.values()):
        assert f"| `{target.split(':')[0].split(' ')[0]}` |" in page, target


# ---- trap 9: results on stdout, not cut at 80 columns when piped (eval.json: tests/test_cli.py)
def test_result_tables_go_to_stdout_uncut(capsys):
    from pathlib import Path

    from potstill.cli import _print_summary

    row = {"accuracy": 0.5, "token_agreement": 0.25, "sequence_perplexity": 12.5, "teacher_top1_match": 0.75,
           "parameters_in_millions": 1.5, "samples_per_second": 1234.5}
    rows = [{"model": name, **row} for name in ("teacher", "student (before)", "student (after)")]
    _print_summary({"table": rows, "student_dir": "runs/x/student"}, Path("runs/x"))
    out = capsys.readouterr()
    assert "…" not in out.out
    for column in row:
        assert column in out.out
    assert "student saved to runs/x/student" in out.out and out.err == ""


def test_objectives_are_listed_on_stdout(capsys):
    from potstill.cli import main

    assert main(["objectives"]) == 0
    out = capsys.readouterr()
    assert "forward_kl" in out.out and "forward_kl" not in out.err


def test_run_accepts_a_shipped_recipe_name(tmp_path, monkeypatch):
    from potstill.cli import main

    monkeypatch.chdir(tmp_path)  # no file named "digits" here
    assert main(["run", "digits", "--set", "trainer.max_steps=1", "--set", "teacher.kwargs.epochs=1",
                 "--set", "eval.throughput=false", "--set", "output_dir=" + str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "digits" / "student").is_dir()


def test_recipes_copy_writes_real_files_that_validate(tmp_path, capsys):
    from potstill.cli import main
    from potstill.config import load_recipe
    from potstill.recipes import packaged_recipes

    assert main(["recipes", "--copy", str(tmp_path / "mine")]) == 0
    copied = sorted((tmp_path / "mine").glob("*.yaml"))
    assert sorted(p.stem for p in copied) == packaged_recipes()
    assert not any(p.is_symlink() for p in (tmp_path / "mine").rglob("*"))
    assert (tmp_path / "mine" / "step-by-step" / "train.jsonl").is_file()  # the data a recipe reads comes along
    for path in copied:
        load_recipe(path)
    assert main(["recipes", "--copy", str(tmp_path / "mine")]) == 2  # never overwrites edited copies
    assert main(["recipes"]) == 0
    assert "digits\t" in capsys.readouterr().out


# ---- trap 15: one stalled batch (another process took the CPU) must not change the measured throughput
def test_throughput_ignores_a_stalled_batch():
    from potstill.eval.speed import measure_throughput

    now = [0.0]
    calls = [0]

    def fn(batch):  # 1 ms per batch of 4, except the 3rd timed call: 500 ms
        calls[0] += 1
        now[0] += 0.5 if calls[0] == 3 else 0.001

    rate = measure_throughput(fn, list(range(40)), batch_size=4, warmup_batches=0, min_seconds=0.0,
                              clock=lambda: now[0])
    assert calls[0] == 10  # one pass over 40 items
    assert rate == pytest.approx(4 / 0.001)  # the median batch: 1 ms; the mean would give 40 / 0.509 = 78.6/s


# ---- trap 14: --resume on a finished run says so, and does not rebuild the teacher or re-evaluate
def test_resume_of_a_complete_run_says_so_and_does_nothing(tmp_path, digits_recipe, capsys, monkeypatch):
    from potstill.config import validate_recipe
    from potstill.train import run, run_recipe

    recipe = validate_recipe(digits_recipe)
    first = run_recipe(recipe)
    log = (recipe.run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    monkeypatch.setattr(run, "build_task", lambda *a, **k: pytest.fail("a complete run was set up again"))
    assert run_recipe(recipe, resume=True) == first
    out = capsys.readouterr().err
    assert "is already complete (10 steps, same recipe): nothing to resume" in out
    assert f"--set student.path={recipe.run_dir / 'student'}" in out
    assert (recipe.run_dir / "metrics.jsonl").read_text() == log


def test_resume_of_a_run_stopped_early_or_changed_is_not_called_complete(tmp_path, digits_recipe):
    from potstill.config import validate_recipe
    from potstill.errors import UserError
    from potstill.train import run_recipe
    from potstill.train.run import finished_summary

    short = validate_recipe({**digits_recipe, "trainer": {**digits_recipe["trainer"], "max_seconds": 1e-9}})
    summary = run_recipe(short)
    assert summary["steps"] == 1 and summary["complete"] is False and finished_summary(short) is None
    longer = validate_recipe({**digits_recipe, "trainer": {**digits_recipe["trainer"], "max_steps": 12}})
    assert finished_summary(longer) is None
    with pytest.raises(UserError, match="the recipe changed"):
        run_recipe(longer, resume=True)


# ---- trap 8: no silent phase: set-up, evaluations and the throughput measurement each say when they start and end
def test_every_phase_of_a_run_and_of_eval_is_announced(tmp_path, digits_recipe, capsys):
    from potstill.config import validate_recipe
    from potstill.evaluate import evaluate_run
    from potstill.train import run_recipe

    raw = {**digits_recipe, "eval": {"compare_before": False, "throughput": True}}
    run_recipe(validate_recipe(raw))
    err = capsys.readouterr().err
    starts = ["setting up the classification run: data, teacher and student…", "evaluating the teacher…",
              "step 1/10", "evaluating the student…", "measuring teacher and student throughput (interleaved)…"]
    positions = [err.index(s) for s in starts]
    assert positions == sorted(positions)
    assert err.count(": done in ") == 4

    evaluate_run(tmp_path / "runs" / raw["name"])
    err = capsys.readouterr().err
    assert err.startswith(f"loading {tmp_path / 'runs' / raw['name']}: data, teacher and saved student…")
    assert err.count(": done in ") == 4 and "evaluating the student: done in" in err


# ---- trap 11: --set errors name the --set; objectives[0] works; a mapping value merges like the dotted form
def test_set_errors_blame_the_set_not_the_file(tmp_path, digits_recipe):
    from conftest import write_yaml

    from potstill.config import load_recipe
    from potstill.errors import UserError

    path = write_yaml(tmp_path / "r.yaml", digits_recipe)
    with pytest.raises(UserError, match=r"^invalid recipe: --set trainer.lr=-1: field trainer.lr: Input should be"):
        load_recipe(path, ["trainer.lr=-1"])
    with pytest.raises(UserError, match=r"--set objectives\[0\].params.temperature=-2: field objectives.0.params"):
        load_recipe(path, ["objectives[0].params.temperature=-2"])
    with pytest.raises(UserError, match=r"bad.yaml, line \d+: field trainer.lr"):  # a bad value in the file itself
        load_recipe(write_yaml(tmp_path / "bad.yaml", {**digits_recipe, "trainer": {"lr": -1}}), ["seed=3"])


def test_set_list_items_by_bracket_and_mappings_merge(tmp_path, digits_recipe):
    from conftest import write_yaml

    from potstill.config import apply_overrides, load_recipe

    path = write_yaml(tmp_path / "r.yaml", {**digits_recipe, "student": {**digits_recipe["student"],
                                                                        "kwargs": {"hidden": 16, "seed": 1}}})
    recipe = load_recipe(path, ["objectives[0].params.temperature=2", "student.kwargs={hidden: 32}"])
    assert recipe.objectives[0].params["temperature"] == 2
    assert recipe.student.kwargs == {"hidden": 32, "seed": 1}  # merged, as student.kwargs.hidden=32 would be
    assert load_recipe(path, ["student.kwargs=null", "student.kwargs={hidden: 8}"]).student.kwargs == {"hidden": 8}
    assert apply_overrides({"a": [{"b": 1}]}, ["a[0].c=2", "a.0.b=3"]) == {"a": [{"b": 3, "c": 2}]}
