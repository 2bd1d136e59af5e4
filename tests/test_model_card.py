"""Every finished run's student folder carries a model card (README.md) with the run's facts and results."""

from __future__ import annotations

import yaml

from potstill.config import validate_recipe
from potstill.report.model_card import CardFacts, model_card
from potstill.train import run_recipe


def test_run_writes_a_card_with_its_results_and_recipe(tmp_path, digits_recipe):
    summary = run_recipe(validate_recipe(digits_recipe))
    card = (tmp_path / "runs" / digits_recipe["name"] / "student" / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert yaml.safe_load(front) == {"tags": ["potstill", "knowledge-distillation"],
                                     "pipeline_tag": "text-classification"}  # a factory student: no library
    assert "`potstill.examples.digits:trained_teacher`" in body and "10 optimizer steps" in body
    assert "1·forward_kl" in body and "load_factory_student" in body
    after = summary["table"][-1]
    assert f"| {after['model']} |" in body and f"{after['accuracy']:.3f}" in body
    recipe = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert recipe["name"] == digits_recipe["name"] and recipe["trainer"]["max_steps"] == 10


def test_card_names_a_hub_teacher_as_base_model_and_its_library(tmp_path):
    (tmp_path / "modules.json").write_text("[]")
    facts = CardFacts(name="s", task="embedding", teacher="sentence-transformers/all-MiniLM-L6-v2", student="x",
                      data="d", objectives="o", training="t", recipe_yaml="name: s\n")
    card = model_card(tmp_path, facts, [])
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert front["library_name"] == "sentence-transformers" and front["pipeline_tag"] == "sentence-similarity"
    assert "SentenceTransformer(" in card and "No evaluation data" in card
    local = model_card(tmp_path, CardFacts(**{**facts.__dict__, "teacher": "builtin:minilm"}), [])
    assert "base_model" not in local
