"""`potstill search`: the space parser, a short study end to end (tiny BERT, tiny Llama), resuming a killed
search, the Pareto front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from potstill.errors import UserError
from potstill.search.pareto import pareto_front
from potstill.search.space import SearchSpace, parse_space, sample
from potstill.students.build import spread_layers

pytest.importorskip("optuna")


# ------------------------------------------------------------------------------------------ the space


def test_a_full_space_parses_into_typed_fields():
    space = parse_space({"proxy": "train", "budget": {"max_steps": 3},
                         "quality": {"metric": "cosine_to_teacher"},
                         "student": {"init": ["layers_from_teacher", "pruned", "from_config"],
                                     "layers": [[0, 1], [0, 2]], "depth": [1, 2], "width": [16], "ffn": [8, 16]},
                         "objectives": [[{"name": "embedding_mse", "weight": {"low": 0.5, "high": 1.0}}]],
                         "lr": {"low": 1e-4, "high": 1e-2, "log": True}, "temperature": [1.0, 2.0]})
    assert isinstance(space, SearchSpace)
    assert space.student.layers == [[0, 1], [0, 2]] and space.lr.log and space.temperature == [1.0, 2.0]
    assert space.objectives[0][0].weight.low == 0.5
    assert space.quality.direction == "maximize"


@pytest.mark.parametrize(("raw", "message"), [
    ({"student": {"init": ["grown"]}}, "field student.init.0: Input should be"),
    ({"student": {"layers": [[0]], "init": ["pruned"], "depth": [2]}}, "add layers_from_teacher to init"),
    ({"student": {"init": ["layers_from_teacher"], "layers": [[0]], "width": [16]}}, "shape of a pruned"),
    ({"student": {"init": ["pruned"]}}, "need at least one of depth"),
    ({"student": {"init": ["layers_from_teacher"]}}, "needs layers"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "must be below high"),
    ({"lr": {"low": 0, "high": 1e-4, "log": True}}, "log range needs low > 0"),
    ({"budget": {}, "student": {"init": ["layers_from_teacher"], "depth": [1]}}, "needs max_steps or max_seconds"),
    ({"depth": [2]}, "field depth: unknown field"),
    ({"proxy": "nas"}, "field proxy: Input should be 'train', 'diswot' or 'supernet'"),
    ([1, 2], "a search space is a YAML mapping"),
])
def test_space_mistakes_are_one_line_naming_the_field(raw, message):
    if isinstance(raw, dict):
        raw.setdefault("student", {"init": ["layers_from_teacher"], "depth": [1]})
    with pytest.raises(UserError, match=message) as err:
        parse_space(raw, "space.yaml")
    assert "\n" not in str(err.value) and "space.yaml" in str(err.value)


def test_spread_layers():
    assert spread_layers(2, 6) == [0, 5]
    assert spread_layers(3, 6) == [0, 2, 5]  # 2.5 rounds to 2
    assert spread_layers(1, 6) == [0]
    assert spread_layers(8, 6) == [0, 1, 2, 3, 4, 5]


class FixedTrial:
    """A stand-in for an Optuna trial that returns given values and records what was asked."""

    def __init__(self, values):
        self.values, self.asked = values, []

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        assert self.values[name] in choices
        return self.values[name]

    def suggest_float(self, name, low, high, log=False):
        self.asked.append(name)
        return self.values[name]


def test_sampling_draws_only_the_dims_of_the_drawn_init():
    space = parse_space({"student": {"init": ["layers_from_teacher", "pruned"], "layers": [[0, 1], [1]],
                                     "depth": [1, 2], "ffn": [8]}, "lr": {"low": 1e-4, "high": 1e-2}})
    trial = FixedTrial({"init": "layers_from_teacher", "layers": "[1]", "lr": 1e-3})
    assert sample(space, trial) == {"init": "layers_from_teacher", "layers": [1], "lr": 1e-3}
    assert trial.asked == ["init", "layers", "lr"]
    trial = FixedTrial({"init": "pruned", "depth": 2, "ffn": 8, "lr": 1e-3})
    assert sample(space, trial) == {"init": "pruned", "depth": 2, "ffn": 8, "lr": 1e-3}


def test_candidate_overrides_replace_the_students_build_and_set_temperature():
    from potstill.search.trial import TeacherShape, candidate_overrides

    space = parse_space({"student": {"init": ["pruned"], "width": [16]},
                         "objectives": [[{"name": "forward_kl", "weight": {"low": 0.1, "high": 1}},
                                         {"name": "hidden_mse"}]], "temperature": [2.0]})
    base = {"student": {"init": "layers_from_teacher", "layers": [0, 1], "calibration_batches": 2}}
    values = {"init": "pruned", "width": 16, "objectives": 0, "weight.0.0": 0.5, "temperature": 2.0}
    sets = candidate_overrides(space, values, base, TeacherShape(layers=3, hidden=32, heads=2))
    assert sets[0] == "student=null"
    assert json.loads(sets[1].split("=", 1)[1]) == {"calibration_batches": 2, "init": "pruned",
                                                   "config": {"hidden_size": 16, "num_attention_heads": 1}}
    objectives = json.loads(sets[2].split("=", 1)[1])
    assert objectives[0] == {"name": "forward_kl", "weight": 0.5, "params": {"temperature": 2.0}}
    assert objectives[1] == {"name": "hidden_mse", "weight": 1.0, "params": {}}  # takes no temperature
    with pytest.raises(UserError, match="not a multiple of the teacher's head size 16"):
        candidate_overrides(space, {**values, "width": 24}, base, TeacherShape(3, 32, 2))


def test_pareto_front_on_hand_made_points():
    points = [(0.9, 1.0), (0.8, 2.0), (0.7, 1.5), (0.95, 0.5), (0.8, 2.0), (float("nan"), 9.0)]
    # (0.7, 1.5) is dominated by (0.8, 2.0); the two equal (0.8, 2.0) do not dominate each other
    assert pareto_front(points) == [0, 1, 3, 4]
    assert pareto_front([(1.0, 1.0), (2.0, 1.0)], maximize_quality=False) == [0]


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture
def embedding_setup(tmp_path):
    from conftest import tiny_search_recipe, write_yaml

    raw = tiny_search_recipe(tmp_path, max_steps=2)
    raw["eval"]["batch_size"] = 8
    recipe = write_yaml(tmp_path / "recipe.yaml", raw)
    space = write_yaml(tmp_path / "space.yaml", {
        "budget": {"max_steps": 2},
        "student": {"init": ["layers_from_teacher", "from_config"], "layers": [[0], [0, 2], [1]], "depth": [1]},
        "lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    return tmp_path, recipe, space


def _search(recipe: Path, space: Path, study: Path, trials: int, budget: str = "10m") -> dict:
    from potstill.search.space import load_space
    from potstill.search.study import SearchSettings, parse_budget, run_search

    return run_search(SearchSettings(recipe, load_space(space), space, study, parse_budget(budget), trials))


@pytest.mark.usefixtures("one_thread")
def test_a_three_trial_search_writes_its_outputs_and_resumes(embedding_setup):
    from potstill.config import load_recipe

    tmp_path, recipe, space = embedding_setup
    study = tmp_path / "study"
    result = _search(recipe, space, study, trials=3)
    assert result["finished"] == 3 and len(result["trials"]) == 3
    assert result["metric"] == "cosine_to_teacher" and result["proxy"] == "train"
    assert result["trials"][0]["values"]["layers"] == "[0]"  # the recipe's own student comes first
    assert result["trials"][0]["label"].endswith("(the recipe's own student)")
    stored = json.loads((study / "search.json").read_text())
    assert stored["pareto"] == result["pareto"] and stored["pareto"]
    for trial in stored["trials"]:
        assert trial["speedup"] > 0 and trial["params"] > 0 and -1 <= trial["quality"] <= 1
    speeds = json.loads((study / "speed.json").read_text())  # one measurement per architecture
    assert len(speeds) == len({t["params"] for t in stored["trials"]})
    by_params = {t["params"]: t["speedup"] for t in stored["trials"]}
    assert all(t["speedup"] == by_params[t["params"]] for t in stored["trials"])
    recipes = sorted((study / "pareto").glob("*.yaml"))
    assert len(recipes) == len(stored["pareto"])
    for path in recipes:  # each loads as a valid recipe, with the recipe's own budget, not the trial's
        loaded = load_recipe(path)
        assert loaded.trainer.max_steps == 2 and loaded.name.startswith("recipe-trial-")
        assert loaded.output_dir == str(tmp_path / "runs")
    assert (study / "pareto.png").is_file() and "| trial |" in (study / "pareto.md").read_text()

    # a search killed during a trial: the study keeps it as RUNNING; the rerun marks it failed and goes on
    import optuna

    storage = f"sqlite:///{study / 'study.db'}"
    optuna.load_study(study_name="tiny-search", storage=storage).ask()
    result = _search(recipe, space, study, trials=4)
    states = [t["state"] for t in result["trials"]]
    assert states.count("complete") == 4 and states.count("fail") == 1 and len(states) == 5
    assert result["trials"][3]["error"].startswith("interrupted")
    assert optuna.load_study(study_name="tiny-search", storage=storage).trials[-1].number == 4


@pytest.mark.usefixtures("one_thread")
def test_diswot_proxy_and_bad_metric(embedding_setup):
    from conftest import write_yaml

    tmp_path, recipe, _ = embedding_setup
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"text": f"text {i}", "label": i % 2}) + "\n" for i in range(8)))
    space = write_yaml(tmp_path / "diswot.yaml", {"proxy": "diswot", "diswot": {"path": str(labelled)},
                                                   "student": {"init": ["layers_from_teacher"],
                                                               "layers": [[0], [0, 1, 2]]}})
    result = _search(recipe, space, tmp_path / "d", trials=2)
    assert result["metric"] == "diswot_score"
    scores = [t["quality"] for t in result["trials"]]
    assert all(s <= 0 for s in scores)  # 0 only for a student identical to the teacher
    full = [t for t in result["trials"] if t["values"]["layers"] == "[0, 1, 2]"]
    assert not full or abs(full[0]["quality"]) < 1e-9  # all three layers: the teacher itself

    bad = write_yaml(tmp_path / "bad.yaml", {"quality": {"metric": "perplexity"},
                                             "student": {"init": ["layers_from_teacher"], "layers": [[0]]}})
    with pytest.raises(UserError, match="has no metric 'perplexity'"):
        _search(recipe, bad, tmp_path / "b", trials=1)


@pytest.mark.usefixtures("one_thread")
def test_a_search_on_a_tiny_llama(tmp_path):
    from conftest import write_yaml
    from test_causal_lm import SENTENCES, llama, make_tokenizer, write_jsonl

    tok = make_tokenizer()
    llama(len(tok), layers=3, init=0.3).save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": s} for s in SENTENCES * 2])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": s} for s in SENTENCES[:4]])
    recipe = write_yaml(tmp_path / "lm.yaml", {
        "name": "lm", "output_dir": str(tmp_path / "runs"), "task": "causal_lm",
        "teacher": {"path": str(tmp_path / "t")},
        "student": {"init": "layers_from_teacher", "layers": [0]},
        "data": {"train": train, "eval": held, "max_length": 16},
        "objectives": [{"name": "forward_kl", "params": {"chunk_size": 64}}],
        "trainer": {"max_steps": 2, "batch_size": 4, "num_threads": 1}, "eval": {"batch_size": 4}})
    space = write_yaml(tmp_path / "space.yaml", {
        "budget": {"max_steps": 1},
        "student": {"init": ["layers_from_teacher", "pruned"], "depth": [1, 2], "ffn": [16]},
        "temperature": {"low": 1.0, "high": 2.0}})
    result = _search(recipe, space, tmp_path / "s", trials=2)
    assert result["metric"] == "kl_to_teacher" and result["direction"] == "minimize"
    assert result["finished"] == 2
    for trial in result["trials"]:
        assert trial["quality"] >= 0 and trial["speedup"] > 0


def test_budget_and_task_checks(tmp_path, digits_recipe):
    from conftest import write_yaml

    from potstill.search.study import parse_budget

    assert parse_budget("30m") == 1800 and parse_budget("1h30m") == 5400 and parse_budget("90") == 90
    with pytest.raises(UserError, match="expected a duration"):
        parse_budget("soon")
    recipe = write_yaml(tmp_path / "digits.yaml", digits_recipe)
    space = write_yaml(tmp_path / "space.yaml", {"student": {"init": ["layers_from_teacher"], "layers": [[0]]}})
    with pytest.raises(UserError, match="the classification task is not searchable yet"):
        _search(recipe, space, tmp_path / "s", trials=1)


def test_the_shipped_space_matches_the_demo_recipe():
    from potstill.recipes import packaged_recipe
    from potstill.search.space import load_space

    space = load_space(packaged_recipe("demo").parent / "spaces" / "minilm.yaml")
    assert space.proxy == "train" and [0, 3] in (space.student.layers or [])
    assert yaml.safe_load((packaged_recipe("demo").parent / "spaces" / "minilm.yaml").read_text())


def test_the_command_reports_a_bad_space_in_one_line(tmp_path, capsys):
    from conftest import write_yaml

    from potstill.cli import main

    space = write_yaml(tmp_path / "space.yaml", {"student": {"init": ["layers_from_teacher"], "layers": [[0]]},
                                                 "lr": {"low": 1.0, "high": 0.1}})
    assert main(["search", "demo", "--space", str(space), "--budget", "1m"]) == 2
    err = capsys.readouterr().err
    assert "field lr: low (1.0) must be below high (0.1)" in " ".join(err.split())
    assert main(["search", "demo", "--space", str(tmp_path / "missing.yaml")]) == 2
    assert "search space file not found" in capsys.readouterr().err
