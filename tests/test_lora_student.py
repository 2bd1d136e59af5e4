"""student.lora: LoRA adapters through peft; only they train, the saved student is merged and plain."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fit_until_crash, tiny_text_classifier
from safetensors.torch import load_file

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.train import checkpoint as ckpt
from potstill.train import run_recipe

LORA = {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}
PREFIX = "base_model.model."


def _lora_run(tmp_path, **lora):
    raw = tiny_text_classifier(tmp_path)
    raw["student"] = {**raw["student"], "lora": {**LORA, **lora}}
    raw["trainer"] = {**raw["trainer"], "lr": 1e-2}
    recipe = validate_recipe(raw)
    run_recipe(recipe)
    return recipe


def test_only_the_adapters_train_and_the_merged_student_loads_plainly(tmp_path):
    from transformers import AutoModelForSequenceClassification

    recipe = _lora_run(tmp_path)
    final = ckpt.latest_checkpoint(recipe.run_dir / "checkpoints")
    wrapped = load_file(str(final / "student.safetensors"))
    teacher = load_file(str(tmp_path / "teacher" / "model.safetensors"))  # the student is its layer 0
    lora_keys = sorted(k for k in wrapped if ".lora_" in k)
    assert len(lora_keys) == 4  # (A, B) × (query, value) × 1 layer
    base = {k.removeprefix(PREFIX).replace(".base_layer", ""): v for k, v in wrapped.items() if ".lora_" not in k}
    compared = [k for k in base if k in teacher]
    assert len(compared) > 15 and "classifier.weight" in compared
    for key in compared:  # every base weight as built (copied from the teacher), after two steps
        assert torch.equal(base[key], teacher[key]), key
    # the adapters moved: B starts at zero
    b_query = wrapped[f"{PREFIX}bert.encoder.layer.0.attention.self.query.lora_B.default.weight"]
    a_query = wrapped[f"{PREFIX}bert.encoder.layer.0.attention.self.query.lora_A.default.weight"]
    assert b_query.abs().sum() > 0
    # only they were in the optimizer
    optimizer = ckpt.load_torch(final / "optimizer.pt")
    assert len(optimizer["state"]) == len(lora_keys)

    student, info = AutoModelForSequenceClassification.from_pretrained(recipe.run_dir / "student",
                                                                       output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys: a plain BERT classifier
    assert not any("lora" in name for name, _ in student.named_parameters())
    merged = student.bert.encoder.layer[0].attention.self.query.weight.detach()
    by_hand = teacher["bert.encoder.layer.0.attention.self.query.weight"] + (8 / 4) * b_query @ a_query
    torch.testing.assert_close(merged, by_hand, rtol=1e-6, atol=1e-7)
    key = "bert.encoder.layer.0.attention.self.key.weight"  # not a target: as built
    assert torch.equal(student.state_dict()[key], teacher[key])

    adapter = recipe.run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8, ["query", "value"])
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert torch.equal(next(v for k, v in saved.items() if "query.lora_B" in k), b_query)


def test_adapter_reloads_with_peft_onto_the_student_as_built(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = _lora_run(tmp_path)
    # the student as built: the teacher's layer 0 (layers_from_teacher [0])
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "teacher", num_hidden_layers=1)
    with_adapter = PeftModel.from_pretrained(base, recipe.run_dir / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(recipe.run_dir / "student").eval()
    batch = AutoTokenizer.from_pretrained(tmp_path / "teacher")(["shares fell", "a new phone"], return_tensors="pt",
                                                                padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, with_adapter(**batch).logits, rtol=1e-5, atol=1e-6)


def test_a_target_that_is_not_there_names_the_field(tmp_path):
    with pytest.raises(UserError, match="^field student.lora.target_modules: peft cannot place LoRA"):
        _lora_run(tmp_path, target_modules=["nonexistent_proj"])


def test_lora_on_a_static_student_is_refused():
    from potstill.config import EmbeddingStudentConfig

    with pytest.raises(ValueError, match="student.lora adapts a transformer's linear layers"):
        EmbeddingStudentConfig(init="static", lora={"r": 2})


def test_resumed_lora_run_ends_with_the_same_student(tmp_path):
    raw = tiny_text_classifier(tmp_path)
    raw["student"] = {**raw["student"], "lora": LORA}
    raw["trainer"] = {**raw["trainer"], "lr": 1e-2, "max_steps": 4, "save_every": 2}
    straight = validate_recipe(dict(raw, name="straight"))
    run_recipe(straight)
    halted = validate_recipe(dict(raw, name="halted"))
    fit_until_crash(halted, 3)
    run_recipe(halted, resume=True)
    wa = load_file(str(straight.run_dir / "student" / "model.safetensors"))
    wb = load_file(str(halted.run_dir / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    teacher = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    key = "bert.encoder.layer.0.attention.self.value.weight"
    assert not torch.equal(wa[key], teacher[key])  # the merged adapter changed it
