"""`potstill search RECIPE --teachers A,B`: DistillNearest's choice of teacher on the recipe's labelled texts
(`potstill.search.teacher_choice`), through the Python API and the CLI."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import embedding_recipe, numbered_texts_jsonl, tiny_bert_encoder, write_yaml

from potstill.errors import UserError
from potstill.search.teacher_choice import TeacherChoiceSettings, choose_teacher
from potstill.tasks.embedding_sources import encoder_embeddings
from potstill.teachers.zoo import h_score, probe_score

ANIMALS = ["the cat purrs on the warm sofa", "a puppy chews a rubber bone", "the horse grazes in the field",
           "kittens chase a ball of wool", "the parrot repeats every word", "a rabbit hides in the garden"]
MARKETS = ["shares fell sharply after the report", "the central bank raised interest rates",
           "investors sold bonds on friday", "the stock index closed at a record", "oil prices rose again today",
           "the company posted a quarterly loss"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("choice")
    probe = root / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": f"{t} ({i})", "label": label}) + "\n"
                             for label, texts in enumerate((ANIMALS, MARKETS)) for i, t in enumerate(texts)))
    train = numbered_texts_jsonl(root / "train.jsonl", ANIMALS + MARKETS)
    one, two = tiny_bert_encoder(root / "one", 1), tiny_bert_encoder(root / "two", 2)
    raw = embedding_recipe(root, one, train, name="pick", student={"init": "layers_from_teacher", "layers": [0]},
                           objectives=[{"name": "embedding_mse"}])
    raw["eval"]["probe_train"] = str(probe)
    return root, write_yaml(root / "pick.yaml", raw), [str(one), str(two)]


def test_scores_are_the_zoo_scores_of_each_teachers_embeddings_and_the_pick_is_the_best(setup):
    root, recipe, teachers = setup
    result = choose_teacher(TeacherChoiceSettings(recipe, teachers, root / "out"))
    texts = [json.loads(line)["text"] for line in (root / "probe.jsonl").read_text().splitlines()]
    labels = [0] * len(ANIMALS) + [1] * len(MARKETS)
    for row, path in zip(result["teachers"], teachers, strict=True):
        want = probe_score(encoder_embeddings(path, texts, pooling="mean", max_length=16), labels, seed=0)
        assert row["teacher"] == path and row["score"] == pytest.approx(want)
    scores = [r["score"] for r in result["teachers"]]
    assert result["nearest"] == teachers[scores.index(max(scores))]
    assert sum(r["weight"] for r in result["teachers"]) == pytest.approx(1.0)
    written = yaml.safe_load((root / "out" / "pick-nearest.yaml").read_text())
    assert written["teacher"]["path"] == result["nearest"]
    assert json.loads((root / "out" / "teachers.json").read_text())["nearest"] == result["nearest"]


def test_h_score_metric(setup):
    root, recipe, teachers = setup
    result = choose_teacher(TeacherChoiceSettings(recipe, teachers, root / "h", metric="h_score"))
    texts = [json.loads(line)["text"] for line in (root / "probe.jsonl").read_text().splitlines()]
    want = h_score(encoder_embeddings(teachers[1], texts, pooling="mean", max_length=16),
                   [0] * len(ANIMALS) + [1] * len(MARKETS))
    assert result["teachers"][1]["score"] == pytest.approx(want, rel=1e-6)


def test_the_real_encoder_beats_a_random_one_on_topic_labels(setup):
    """all-MiniLM-L6-v2 separates animals from markets; a random 1-layer BERT barely does: the pick is MiniLM."""
    root, recipe, teachers = setup
    result = choose_teacher(TeacherChoiceSettings(recipe, [teachers[0], "builtin:minilm"], root / "real"))
    minilm = result["teachers"][1]
    assert result["nearest"] == "builtin:minilm" and minilm["score"] == 1.0 and minilm["dim"] == 384
    assert result["teachers"][0]["score"] < 1.0 and minilm["weight"] > 0.5


@pytest.mark.parametrize("change, teachers, message", [
    ({}, ["only-one"], "at least two"),
    ({"eval": {"throughput": False}}, None, "eval.probe_train"),
    ({}, None, "--metric"),
])
def test_mistakes_are_one_line(setup, tmp_path, change, teachers, message):
    root, recipe, default = setup
    raw = {**yaml.safe_load(recipe.read_text()), **change}
    path = write_yaml(tmp_path / "r.yaml", raw)
    settings = TeacherChoiceSettings(path, teachers or default, tmp_path / "o",
                                     metric="cosine" if message == "--metric" else "probe")
    with pytest.raises(UserError, match=message) as err:
        choose_teacher(settings)
    assert "\n" not in str(err.value)


def test_cli_prints_the_table_and_writes_the_recipe(setup, capsys):
    from potstill.cli import main

    root, recipe, teachers = setup
    out = root / "cli"
    assert main(["search", str(recipe), "--teachers", ",".join(teachers), "--study-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "teachers scored on 12 labelled texts" in printed and "pick-nearest.yaml" in printed
    assert (out / "pick-nearest.yaml").exists()
    assert main(["search", str(recipe)]) == 2  # neither --space nor --teachers
    assert "--teachers" in capsys.readouterr().err
