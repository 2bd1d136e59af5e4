"""Task adapters with Hugging Face models: a text classifier end to end, bf16 autocast, user errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from potstill.assets import minilm_path
from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.train import run_recipe

TOPICS = {"sport": ["The striker scored twice in the final.", "The team won the cup after extra time."],
          "business": ["Shares fell after the bank reported losses.", "The company raised its profit forecast."]}


@pytest.fixture
def text_classifier(tmp_path):
    """A tiny BERT sequence classifier (random init, 4 layers) with the real MiniLM tokenizer, saved offline."""
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, id2label={0: "business", 1: "sport"},
                        label2id={"business": 0, "sport": 1})
    folder = tmp_path / "teacher"
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"text": t, "label": topic} for topic, texts in TOPICS.items() for t in texts] * 8
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, data


def _recipe(tmp_path, folder, data, **trainer):
    return validate_recipe({
        "name": "text", "output_dir": str(tmp_path / "runs"), "task": "classification",
        "teacher": {"path": str(folder)}, "student": {"init": "layers_from_teacher", "layers": [0, 2]},
        "data": {"train": str(data), "eval": str(data), "max_length": 16},
        "objectives": [{"name": "forward_kl", "params": {"temperature": 2.0}}],
        "trainer": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 1, **trainer},
        "eval": {"throughput": True, "compare_before": True}})


def test_hf_text_classifier_end_to_end(tmp_path, text_classifier):
    folder, data = text_classifier
    recipe = _recipe(tmp_path, folder, data, hard_label_weight=0.5)
    summary = run_recipe(recipe)
    after = summary["table"][-1]
    assert {"accuracy", "macro_f1", "agreement", "params", "samples_per_s"} <= after.keys()
    assert summary["table"][0]["params"] > after["params"]
    student = AutoModelForSequenceClassification.from_pretrained(recipe.run_dir / "student")
    assert student.config.num_hidden_layers == 2 and student.config.label2id == {"business": 0, "sport": 1}
    tok = AutoTokenizer.from_pretrained(recipe.run_dir / "student")
    assert student(**tok(["A goal in the last minute."], return_tensors="pt")).logits.shape == (1, 2)


def test_bf16_autocast_run(tmp_path, text_classifier):
    folder, data = text_classifier
    summary = run_recipe(_recipe(tmp_path, folder, data, mixed_precision="bf16"))
    lines = [json.loads(x) for x in (tmp_path / "runs" / "text" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if "loss" in x)
    assert summary["table"][-1]["accuracy"] >= 0


def test_unknown_label_is_a_user_error(tmp_path, text_classifier):
    folder, _ = text_classifier
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "weather"}) + "\n")
    with pytest.raises(UserError, match="weather"):
        run_recipe(_recipe(tmp_path, folder, bad))


def test_missing_teacher_folder_is_a_user_error(tmp_path, text_classifier):
    _, data = text_classifier
    with pytest.raises(UserError, match="model folder not found"):
        run_recipe(_recipe(tmp_path, tmp_path / "nope", data))


def test_bad_student_layers_is_a_user_error(tmp_path, text_classifier):
    folder, data = text_classifier
    recipe = _recipe(tmp_path, folder, data)
    recipe.student.layers = [0, 9]
    with pytest.raises(UserError, match="field student"):
        run_recipe(recipe)
