"""Distilling step-by-step (causal_lm and seq2seq tasks) and teacher-less text-target runs, with tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_causal_lm import make_tokenizer, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from potstill.cli import main
from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.evaluate import evaluate_run
from potstill.tasks import build_task
from potstill.train import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [
    {"input": "two plus two", "label": "four", "rationale": "two and two make four"},
    {"input": "one plus two", "label": "three", "rationale": "one and two make three"},
    {"input": "two plus three", "label": "five", "rationale": "two and three make five"},
    {"input": "one plus one", "label": "two", "rationale": "one and one make two"},
    {"input": "three plus one", "label": "four", "rationale": "three and one make four"},
    {"input": "one plus three", "label": "four", "rationale": "one and three make four"},
]
WORDS = [" ".join(r.values()) for r in RECORDS] + ["predict: explain: and make plus"]
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
T5 = {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4,
      "dropout_rate": 0.0}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(WORDS, vocab_size=300, chat=False)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(folder)
    return folder


def sbs_recipe(tmp_path, tok_dir, train, eval_=None, *, task="causal_lm", step_by_step=None, name="sbs",
               student=None, **trainer) -> dict:
    """A teacher-less recipe (dict): the tokenizer from teacher.tokenizer, a tiny student from config."""
    return {
        "name": name, "output_dir": str(tmp_path / "runs"), "task": task, "seed": 0,
        "teacher": {"tokenizer": str(tok_dir)},
        "student": student or {"init": "from_config", "config": LLAMA if task == "causal_lm" else T5},
        "data": {"train": train, "eval": eval_, "max_length": 32},
        **({"step_by_step": step_by_step} if step_by_step is not None else {}),
        "trainer": {"max_steps": 2, "batch_size": 3, "lr": 1e-2, "log_every": 1, "num_threads": 1,
                    "hard_label_weight": 1.0, "weight_decay": 0.0, **trainer},
        "eval": {"throughput": False, "compare_before": True},
    }


def setup_task(raw: dict):
    r = validate_recipe(raw)
    task = build_task(r, run_dir=r.run_dir)
    task.setup()
    return task


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


# ------------------------------------------------------------------------------------------ views


def test_two_aligned_views_with_prefixes_and_uncounted_prompts(tmp_path, tok, tok_dir):
    data = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    task = setup_task(sbs_recipe(tmp_path, tok_dir, data, step_by_step={"label_prefix": "predict: "}))
    eos = tok.eos_token_id
    for rec, ex in zip(RECORDS, task.train_records, strict=True):
        for prefix, field, view in (("predict: ", "label", ex), ("explain: ", "rationale", ex["rationale"])):
            prompt = tok(prefix + rec["input"]).input_ids
            completion = tok(rec[field], add_special_tokens=False).input_ids + [eos]
            assert view["input_ids"] == prompt + completion
            # the prompt's last position predicts the first completion token; prompt tokens are never targets
            assert view["targets"] == [-100] * (len(prompt) - 1) + completion + [-100]
    batch = task.collate(task.train_records[:3], [0, 1, 2])
    assert batch["input_ids"].shape[0] == 6 and batch["view"].tolist() == [0, 0, 0, 1, 1, 1]
    for b in range(3):  # row b and row 3 + b are the two views of record b
        n, m = len(task.train_records[b]["input_ids"]), len(task.train_records[b]["rationale"]["input_ids"])
        assert tok.decode(batch["input_ids"][b, :n]).startswith("<bos>predict: " + RECORDS[b]["input"])
        assert tok.decode(batch["input_ids"][3 + b, :m]).startswith("<bos>explain: " + RECORDS[b]["input"])
        assert batch["attention_mask"][b].sum() == n and batch["attention_mask"][3 + b].sum() == m
    labels = sum(t != -100 for ex in task.train_records[:3] for t in ex["targets"])
    assert task.count_rows(batch) == labels  # the loop's rows: label tokens only


def test_alpha_one_is_plain_fine_tuning_exactly(tmp_path, tok_dir):
    sbs = write_jsonl(tmp_path / "sbs.jsonl", RECORDS)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "predict: " + r["input"], "completion": r["label"]}
                                                   for r in RECORDS])
    task = setup_task(sbs_recipe(tmp_path, tok_dir, sbs, step_by_step={"alpha": 1.0}))
    assert all("rationale" not in ex for ex in task.train_records)  # the rationale view is dropped
    a = run_recipe(validate_recipe(sbs_recipe(tmp_path, tok_dir, sbs, step_by_step={"alpha": 1.0}, name="a",
                                              max_steps=5, grad_accum=2, batch_size=2)))
    b = run_recipe(validate_recipe(sbs_recipe(tmp_path, tok_dir, plain, name="b", max_steps=5, grad_accum=2,
                                              batch_size=2)))
    la, lb = losses(Path(a["student_dir"]).parent), losses(Path(b["student_dir"]).parent)
    assert len(la) == 5 and la == lb and la[-1] < la[0]
    wa = AutoModelForCausalLM.from_pretrained(a["student_dir"]).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b["student_dir"]).state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _view_mean(task, records, view_key):
    """Mean token CE of the student on one view alone (its own forward pass, like the official code)."""
    rows = [ex if view_key is None else ex[view_key] for ex in records]
    rows = [{k: v for k, v in row.items() if k != "rationale"} for row in rows]
    batch = task.collate(rows, list(range(len(rows))))
    logits = task.student_signal(task.student, batch)
    key = "targets" if "targets" in batch else "labels"
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[key].flatten(), ignore_index=-100)


@pytest.mark.parametrize("task_name", ["causal_lm", "seq2seq"])
def test_alpha_mixes_the_two_view_means(tmp_path, tok_dir, task_name):
    data = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    task = setup_task(sbs_recipe(tmp_path, tok_dir, data, task=task_name, step_by_step={"alpha": 0.3}))
    task.student.eval()
    records = task.train_records[:4]
    batch = task.collate(records, list(range(4)))
    with torch.no_grad():
        got = task.hard_label_loss(task.student_signal(task.student, batch), batch) / task.count_rows(batch)
        want = 0.3 * _view_mean(task, records, None) + 0.7 * _view_mean(task, records, "rationale")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    if task_name == "causal_lm":  # the fused lm-head path mixes the same way
        fused = setup_task(sbs_recipe(tmp_path, tok_dir, data, step_by_step={"alpha": 0.3}, fused_lm_head=True))
        fused.student.eval()
        with torch.no_grad():
            loss = fused.hard_label_loss(fused.student_signal(fused.student, batch), batch) / fused.count_rows(batch)
        assert torch.allclose(loss, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ whole runs


def test_causal_run_without_a_teacher_trains_and_saves(tmp_path, tok, tok_dir):
    data = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    raw = sbs_recipe(tmp_path, tok_dir, data, data, step_by_step={}, max_steps=80, batch_size=6)
    summary = run_recipe(validate_recipe(raw))
    teacher, before, after = summary["table"]
    assert set(teacher) == {"model"}  # no teacher model: nothing to score
    assert {"perplexity", "token_accuracy", "label_accuracy", "rationale_perplexity"} <= set(after)
    assert "kl_to_teacher" not in after
    assert after["perplexity"] < before["perplexity"] / 3
    assert after["rationale_perplexity"] < before["rationale_perplexity"] / 3
    assert after["label_accuracy"] == 1.0 > before["label_accuracy"]  # six records, learnt by heart
    student = AutoModelForCausalLM.from_pretrained(summary["student_dir"])
    assert AutoTokenizer.from_pretrained(summary["student_dir"]).get_vocab() == tok.get_vocab()
    assert student.config.num_hidden_layers == 1 and student.config.vocab_size == len(tok)
    rows = evaluate_run(Path(summary["student_dir"]).parent)  # `potstill eval` on the saved student
    assert rows[1]["perplexity"] == pytest.approx(after["perplexity"], rel=1e-4)
    assert rows[1]["label_accuracy"] == after["label_accuracy"]


def test_seq2seq_student_trains_saves_and_reloads(tmp_path, tok, tok_dir):
    data = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    raw = sbs_recipe(tmp_path, tok_dir, data, data, task="seq2seq", step_by_step={}, max_steps=30, batch_size=6)
    summary = run_recipe(validate_recipe(raw))
    run_dir = Path(summary["student_dir"]).parent
    curve = losses(run_dir)
    assert curve[-1] < 0.3 * curve[0]
    _, before, after = summary["table"]
    assert after["perplexity"] < before["perplexity"] and after["label_accuracy"] >= before["label_accuracy"]
    student = AutoModelForSeq2SeqLM.from_pretrained(summary["student_dir"])
    assert student.config.model_type == "t5" and student.config.decoder_start_token_id == tok.pad_token_id
    assert AutoTokenizer.from_pretrained(summary["student_dir"]).get_vocab() == tok.get_vocab()
    rows = evaluate_run(run_dir)
    assert rows[1]["perplexity"] == pytest.approx(after["perplexity"], rel=1e-4)
    assert rows[1]["label_accuracy"] == after["label_accuracy"]


def test_plain_seq2seq_records_and_loss_match_the_model_own_loss(tmp_path, tok, tok_dir):
    rows = [{"question": r["input"], "target": r["label"]} for r in RECORDS]
    data = {"path": write_jsonl(tmp_path / "p.jsonl", rows), "columns": {"input": "question"}}
    task = setup_task(sbs_recipe(tmp_path, tok_dir, data, task="seq2seq"))
    ex = task.train_records[0]
    assert ex == {"input_ids": tok("two plus two").input_ids,
                  "labels": tok("four", add_special_tokens=False).input_ids + [tok.eos_token_id]}
    batch = task.collate(task.train_records[:3], [0, 1, 2])
    assert "view" not in batch and task.count_rows(batch) == int((batch["labels"] != -100).sum())
    with torch.no_grad():
        ours = task.hard_label_loss(task.student_signal(task.student, batch), batch) / task.count_rows(batch)
        theirs = task.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, rtol=1e-5)


# ------------------------------------------------------------------------------------------ recipe errors


def _cli(tmp_path, raw: dict, capsys) -> tuple[int, str, Path]:
    from conftest import write_yaml

    path = write_yaml(tmp_path / "recipe.yaml", raw)
    code = main(["run", str(path)])
    return code, capsys.readouterr().err, path


def test_recipe_errors_exit_2(tmp_path, tok_dir, digits_recipe, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"input": "x", "label": "y"}) + "\n")
    code, err, _ = _cli(tmp_path, sbs_recipe(tmp_path, tok_dir, str(bad), step_by_step={}), capsys)
    assert code == 2 and f"{bad}, line 2" in err and '"rationale"' in err and "Traceback" not in err
    code, err, _ = _cli(tmp_path, sbs_recipe(tmp_path, tok_dir, str(bad), step_by_step={"rationale_column": "why"}),
                        capsys)
    assert code == 2 and f"{bad}, line 1" in err and '"why"' in err

    code, err, path = _cli(tmp_path, {**digits_recipe, "step_by_step": {"alpha": 0.5}}, capsys)
    line = path.read_text().splitlines().index("step_by_step:") + 2  # the section's first entry
    assert code == 2 and f"line {line}: field step_by_step" in err and "causal_lm and seq2seq" in err

    raw = {**sbs_recipe(tmp_path, tok_dir, str(bad), task="seq2seq", step_by_step={}),
           "objectives": [{"name": "forward_kl"}]}
    code, err, path = _cli(tmp_path, raw, capsys)
    line = path.read_text().splitlines().index("objectives:") + 2
    assert code == 2 and f"line {line}: field objectives" in err and "not supported for seq2seq" in err

    # a teacher-less recipe: KD objectives still need a teacher; the student needs a model type and a tokenizer
    raw = {**sbs_recipe(tmp_path, tok_dir, str(bad)), "objectives": [{"name": "forward_kl"}]}
    code, err, _ = _cli(tmp_path, raw, capsys)
    assert code == 2 and "give exactly one of teacher.path or teacher.factory" in err
    raw = sbs_recipe(tmp_path, tok_dir, str(bad), student={"init": "from_config", "config": {"hidden_size": 8}})
    code, err, _ = _cli(tmp_path, raw, capsys)
    assert code == 2 and "student.config.model_type" in err
    raw = {**sbs_recipe(tmp_path, tok_dir, str(bad)), "teacher": {}}
    code, err, _ = _cli(tmp_path, raw, capsys)
    assert code == 2 and "teacher.tokenizer" in err
    raw = sbs_recipe(tmp_path, tok_dir, str(bad), student={"init": "from_config", "config": {**LLAMA,
                                                                                            "hiden_size": 8}})
    code, err, _ = _cli(tmp_path, raw, capsys)
    assert code == 2 and "field student.config" in err and 'did you mean "hidden_size"' in err
    with pytest.raises(UserError, match="data.packing"):
        validate_recipe({**sbs_recipe(tmp_path, tok_dir, str(bad), step_by_step={}),
                         "data": {"train": str(bad), "packing": True}})


def test_packaged_recipe_runs_without_a_teacher(tmp_path, capsys):
    from potstill.recipes import packaged_recipe

    recipe = packaged_recipe("step-by-step")
    code = main(["run", str(recipe), "--set", f"output_dir={tmp_path}", "--set", "trainer.max_steps=3",
                 "--set", "data.train.limit=64", "--set", "data.eval.limit=10"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "step-by-step" / "summary.json").read_text())
    assert summary["steps"] == 3 and 0.0 <= summary["table"][-1]["label_accuracy"] <= 1.0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "step-by-step" / "student").config.hidden_size == 64


def test_generate_rationales_then_train_step_by_step(tmp_path, tok_dir):
    """The black-box pipeline: a teacher LLM behind an HTTP endpoint (scripted) → `potstill generate --rationale
    --filter match` → a step-by-step run on the generated file, whose columns are the recipe's defaults."""
    import re

    import yaml
    from fastapi import FastAPI

    from potstill.cli import main
    from potstill.serve import LocalServer

    names = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:
        a, b = re.match(r"(\w+) plus (\w+)", body["messages"][-1]["content"]).groups()
        total = [k for k, v in names.items() if v == a][0] + [k for k, v in names.items() if v == b][0]
        answer = names.get(total, "many") if a != "three" else "wrong"  # the filter must drop these
        text = f"{a} and {b} make {names.get(total, 'many')}\nAnswer: {answer}"
        return {"model": "scripted", "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}]}

    prompts = [{"prompt": f"{a} plus {b}", "answer": names[x + y]} for x, a in names.items()
               for y, b in names.items() if x + y <= 5]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    out = tmp_path / "sbs.jsonl"
    with LocalServer(app) as server:
        assert main(["generate", str(tmp_path / "prompts.jsonl"), "--out", str(out), "--base-url", server.base_url,
                     "--model", "scripted", "--rationale", "--filter", "match", "--reference-column", "answer"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == sum(not p["prompt"].startswith("three") for p in prompts) and rows
    assert all(r["label"] == r["answer"] and r["rationale"].endswith(r["label"]) for r in rows)
    recipe = tmp_path / "sbs.yaml"
    recipe.write_text(yaml.safe_dump(sbs_recipe(tmp_path, tok_dir, str(out), str(out), step_by_step={},
                                                max_steps=3)))
    assert main(["run", str(recipe)]) == 0
    summary = json.loads((tmp_path / "runs" / "sbs" / "summary.json").read_text())
    assert "label_accuracy" in summary["table"][-1] and "rationale_perplexity" in summary["table"][-1]
