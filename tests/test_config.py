"""The recipe schema: one model per task, path fields relative to the recipe, saved recipes and their changes."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

import pytest
import yaml
from conftest import write_yaml
from pydantic import BaseModel

from potstill.config import (
    DISTILLATION_TASKS,
    RECIPE_OF_TASK,
    TASKS,
    RecipeRelative,
    dump_recipe,
    load_recipe,
    load_saved_recipe,
    recipe_changes,
    validate_recipe,
)
from potstill.errors import UserError
from potstill.recipes import packaged_recipe, packaged_recipes

FACTORY = {"factory": "potstill.examples.digits:trained_teacher"}
STUDENT = {"init": "factory", "factory": "potstill.examples.digits:mlp"}


def minimal(task: str) -> dict:
    """A small valid recipe (dict) of `task`."""
    raw = {"name": f"min-{task}", "task": task, "teacher": {"path": "some/teacher"},
           "student": {"init": "layers_from_teacher", "layers": [0]}, "data": {"train": "train.jsonl"},
           "objectives": [{"name": "forward_kl"}]}
    if task in ("classification", "vision", "image_classification", "vision_language", "segmentation"):
        raw.update(teacher=FACTORY, student=STUDENT)
    if task == "seq2seq":
        raw.update(objectives=[], trainer={"hard_label_weight": 1.0})
    if task == "graph":
        raw.update(teacher={"factory": "potstill.teachers.vqgraph:load_vqgraph_teacher"}, student=STUDENT,
                   data={"train": "builtin:connectome"})
    if task == "judge":
        raw.update(student={"init": "factory", "factory": "potstill.students.self_judge:score_head"},
                   objectives=[{"name": "self_judge"}])
    return raw


def test_every_packaged_recipe_validates():
    names = packaged_recipes()
    assert {"demo", "digits", "step-by-step"} <= set(names)
    for name in names:
        recipe = load_recipe(packaged_recipe(name))
        assert type(recipe) is RECIPE_OF_TASK[recipe.task]
    with pytest.raises(UserError, match="no packaged recipe named 'nope'; shipped: .*demo"):
        packaged_recipe("nope")


@pytest.mark.parametrize("task", DISTILLATION_TASKS)
def test_each_task_gets_its_own_recipe_model(task):
    recipe = validate_recipe(minimal(task))
    assert type(recipe) is RECIPE_OF_TASK[task] and recipe.task == task
    # code shared by all tasks reads these two; tasks without them read None
    assert recipe.data.domains is None and recipe.teacher.cache is None
    copy = recipe.model_copy(deep=True)
    assert copy == recipe and copy.run_dir == Path("runs") / f"min-{task}"


def test_a_field_of_another_task_is_an_unknown_key_naming_that_task(tmp_path):
    raw = {**minimal("causal_lm"), "ranking": {"negatives": 2}, "pooling": "cls"}
    raw["data"] = {"train": "train.jsonl", "collection": "more.jsonl"}
    path = write_yaml(tmp_path / "r.yaml", raw)
    lines = path.read_text().splitlines()
    with pytest.raises(UserError) as err:
        load_recipe(path)
    text = str(err.value)
    ranking = lines.index("ranking:") + 2  # another task's section: its first entry
    collection = next(i for i, x in enumerate(lines, 1) if "collection:" in x)
    assert f"r.yaml, line {ranking}: field ranking: unknown key 'ranking': ranking is for the ranking task, " \
           f"not causal_lm" in text
    assert f"r.yaml, line {collection}: field data.collection: unknown key 'collection': data.collection is for " \
           f"the ranking task" in text
    assert "field pooling: unknown key 'pooling': pooling is for the embedding and ranking tasks" in text
    assert "causal_lm." not in text  # the union's tag is not part of a field's path
    for task, field, value, says in (
            ("embedding", "generation", {"lmbda": 0.5}, "generation is for the causal_lm task, not embedding"),
            ("ranking", "step_by_step", {}, "step_by_step is for the causal_lm and seq2seq tasks, not ranking"),
            ("classification", "eval", {"pairs": "builtin:lee"}, "eval.pairs is for the embedding task"),
            ("seq2seq", "data", {"train": "t.jsonl", "packing": True}, "data.packing is for the causal_lm task"),
            ("embedding", "trainer", {"fused_lm_head": True}, "trainer.fused_lm_head is for the causal_lm task")):
        with pytest.raises(UserError) as err:
            validate_recipe({**minimal(task), field: value})
        assert says in str(err.value)
    with pytest.raises(UserError, match="field teacher.cache: unknown key 'cache': teacher.cache is for the causal_lm"):
        validate_recipe({**minimal("seq2seq"), "teacher": {"cache": "topk"}})
    with pytest.raises(UserError, match="field data.domains: .* is for the classification and causal_lm tasks"):
        validate_recipe({**minimal("ranking"), "data": {"train": "t.jsonl", "domains": {}}})
    # a typo still gets its hint
    with pytest.raises(UserError, match='unknown key \'negativs\' \\(did you mean "negatives"\\?\\)'):
        validate_recipe({**minimal("ranking"), "ranking": {"negativs": 2}})


def test_missing_or_unknown_task_is_one_line(tmp_path):
    raw = minimal("ranking")
    del raw["task"]
    with pytest.raises(UserError) as err:
        validate_recipe(raw)
    assert str(err.value).splitlines() == [
        "invalid recipe: recipe: field task: missing; what the models do, one of " + ", ".join(TASKS)]
    path = write_yaml(tmp_path / "r.yaml", {**raw, "task": "causal-lm"})
    line = path.read_text().splitlines().index("task: causal-lm") + 1
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value).splitlines() == [
        f"invalid recipe: {path}, line {line}: field task: unknown task 'causal-lm' (did you mean \"causal_lm\"?); "
        "valid: " + ", ".join(TASKS)]


def _leaves(annotation, marked: bool = False):
    """(type, marked as a recipe-relative path) for every leaf type of an annotation; free-form dicts skipped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *meta = get_args(annotation)
        yield from _leaves(base, marked or any(isinstance(m, RecipeRelative) for m in meta))
    elif origin in (dict, Literal):
        return
    elif origin in (Union, types.UnionType, list, tuple):
        for arg in get_args(annotation):
            yield from _leaves(arg, marked)
    else:
        yield annotation, marked


# str fields that are not file-system paths (model.field -> what it is)
NOT_PATHS = {
    "RunFolderFields.name": "a run name", "RunFolderFields.output_dir": "relative to the cwd, as documented",
    "ObjectiveConfig.name": "an objective", "DataSource.split": "a dataset split",
    "TeacherConfig.factory": "'module:function'", "StudentConfig.factory": "'module:function'",
    "TeacherConfig.layers_path": "a module path inside the model", "StudentConfig.layers_path": "the same",
    "PruneConfig.score_column": "a record field", "DomainsConfig.column": "a record field",
    "StepByStepConfig.input_column": "a record field", "StepByStepConfig.label_column": "a record field",
    "StepByStepConfig.rationale_column": "a record field", "StepByStepConfig.label_prefix": "prompt text",
    "StepByStepConfig.rationale_prefix": "prompt text", "ICLDataConfig.demo_template": "prompt text",
    "ICLDataConfig.query_template": "prompt text", "ICLDataConfig.separator": "prompt text",
    "ICLDataConfig.target_prefix": "prompt text", "EndpointConfig.base_url": "a URL",
    "EndpointConfig.model": "a model name sent to a server", "EndpointConfig.api_key_env": "an environment variable",
    "EarlyStoppingConfig.metric": "a metric name", "LoraStudentConfig.target_modules": "module names in the model",
    "LoraStudentConfig.modules_to_save": "module names in the model",
    "VisionLanguageConfig.class_names": "class names or builtin:<set>", "VisionLanguageConfig.templates": "captions",
    "VisionLanguageConfig.descriptions": "class descriptions or builtin:<set>",
    "JudgeData.system": "a system turn of the judging prompts",
}
# names that say "path" (or file, folder, cache...) and must then be a RelPath, unless listed in NOT_PATHS
PATH_NAME = re.compile(r"(^|_)(path|paths|file|files|dir|folder|cache|weights|tokenizer|scores|collection)($|_)")
PATH_NAMED_NOT_PATHS = {"layers_path", "output_dir"}


def test_every_path_field_is_relative_to_the_recipe():
    """Walk every task's recipe (nested sections included): a str field is a RelPath / ModelPath unless it is
    listed in NOT_PATHS, and a field whose name says it is a path must be one."""
    seen, paths, plain = set(), set(), set()
    todo = list(RECIPE_OF_TASK.values())
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            marked = any(isinstance(m, RecipeRelative) for m in field.metadata)
            leaves = list(_leaves(field.annotation, marked))
            todo += [t for t, _ in leaves if isinstance(t, type) and issubclass(t, BaseModel)]
            strs = [m for t, m in leaves if t is str]
            owner = next(c for c in reversed(model.__mro__) if name in getattr(c, "__annotations__", {}))
            where = f"{owner.__name__}.{name}"
            assert all(strs) or not any(strs), f"{where}: some of its str values are paths, some not"
            if strs and all(strs):
                paths.add(where)
            elif strs:
                plain.add(where)
                assert where in NOT_PATHS, f"{where} is a plain str: make it a RelPath / ModelPath, or list it in " \
                                          f"NOT_PATHS if it is not a path"
                assert not PATH_NAME.search(name) or name in PATH_NAMED_NOT_PATHS, f"{where} looks like a path"
    expected = {"DataSource.path", "TeacherConfig.path", "TeacherConfig.weights", "StudentConfig.path",
                "TextTeacherConfig.tokenizer", "CausalLMTeacherConfig.cache", "EndpointConfig.cache",
                "RankingConfig.teacher_scores"}
    assert expected <= paths, expected - paths
    assert not paths & plain


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    (folder / "models" / "student").mkdir(parents=True)
    (folder / "tok").mkdir()
    elsewhere.mkdir()
    (elsewhere / "local.jsonl").write_text("{}\n")
    monkeypatch.chdir(elsewhere)
    ranking = {**minimal("ranking"), "teacher": {},
               "student": {"init": "pretrained", "path": "models/student"},
               "data": {"train": "data/train.jsonl", "eval": "local.jsonl", "collection": "data/passages.jsonl"},
               "objectives": [{"name": "margin_mse"}],
               "ranking": {"teacher_scores": ["scores/a.tsv", "/abs/b.tsv", "builtin:nothing"]}}
    recipe = load_recipe(write_yaml(folder / "rank.yaml", ranking))
    assert recipe.data.train.path == str(folder / "data" / "train.jsonl")
    assert recipe.data.collection.path == str(folder / "data" / "passages.jsonl")  # the bug: was left as given
    assert recipe.data.eval.path == str(elsewhere / "local.jsonl")  # exists only under the cwd (e.g. a --set)
    assert recipe.ranking.teacher_scores == [str(folder / "scores" / "a.tsv"), "/abs/b.tsv", "builtin:nothing"]
    assert recipe.student.path == str(folder / "models" / "student")  # a model folder next to the recipe
    one = load_recipe(write_yaml(folder / "one.yaml", {**ranking, "ranking": {"teacher_scores": "s.jsonl"}}))
    assert one.ranking.teacher_scores == str(folder / "s.jsonl")

    lm = {**minimal("causal_lm"), "objectives": [], "teacher": {
        "tokenizer": "tok", "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "cache": "c/ep.sqlite"}},
        "student": {"init": "from_config", "config": {"model_type": "llama"}},
        "generation": {"seq_kd": True}, "trainer": {"hard_label_weight": 1.0}}
    recipe = load_recipe(write_yaml(folder / "lm.yaml", lm))
    assert recipe.teacher.endpoint.cache == str(folder / "c" / "ep.sqlite")
    assert recipe.teacher.tokenizer == str(folder / "tok")
    cached = {**minimal("causal_lm"), "teacher": {"path": "HuggingFaceTB/SmolLM2-135M", "cache": "topk"},
              "student": {"init": "pretrained", "path": "org/student"}}
    recipe = load_recipe(write_yaml(folder / "cached.yaml", cached))
    assert recipe.teacher.cache == str(folder / "topk")  # a folder `potstill cache` creates
    assert recipe.teacher.path == "HuggingFaceTB/SmolLM2-135M" and recipe.student.path == "org/student"  # hub ids

    embedding = {**minimal("embedding"), "eval": {"probe_train": "p.jsonl", "pairs": "builtin:lee"}}
    recipe = load_recipe(write_yaml(folder / "emb.yaml", embedding))
    assert recipe.eval.probe_train.path == str(folder / "p.jsonl") and recipe.eval.pairs.path == "builtin:lee"
    assert recipe.output_dir == "runs"  # relative to the cwd, as documented
    weights = {**minimal("classification"), "teacher": {**FACTORY, "weights": "w.safetensors"}}
    assert load_recipe(write_yaml(folder / "w.yaml", weights)).teacher.weights == str(folder / "w.safetensors")
    # validated without a recipe file, values stay as given
    assert validate_recipe(ranking).data.collection.path == "data/passages.jsonl"


def test_dump_holds_what_was_set_and_loads_back_equal(tmp_path, digits_recipe):
    (tmp_path / "in").mkdir()
    raw = {**digits_recipe, "data": {"train": "train.jsonl", "eval": "builtin:digits"}}
    del raw["eval"], raw["seed"]
    recipe = load_recipe(write_yaml(tmp_path / "in" / "r.yaml", raw), ["trainer.lr=0.5"])
    text = dump_recipe(recipe)
    saved = yaml.safe_load(text)
    assert list(saved)[:2] == ["name", "task"]
    assert saved["data"] == {"train": {"path": str(tmp_path / "in" / "train.jsonl")},
                             "eval": {"path": "builtin:digits"}}
    assert saved["trainer"]["lr"] == 0.5 and "epochs" not in saved["trainer"]
    assert "eval" not in saved and "seed" not in saved and "pooling" not in saved
    (tmp_path / "run").mkdir()
    again = load_recipe(write_yaml(tmp_path / "run" / "recipe.yaml", saved))
    assert again == recipe and dump_recipe(again) == text
    # a field assigned in a section the recipe did not give is saved too
    recipe.eval.every = 3
    assert yaml.safe_load(dump_recipe(recipe))["eval"] == {"every": 3}
    minimal_recipe = validate_recipe(minimal("vision"))
    assert yaml.safe_load(dump_recipe(minimal_recipe)) == {**minimal("vision"), "data": {"train": {"path":
                                                                                               "train.jsonl"}}}


def _legacy(recipe) -> str:
    """The recipe.yaml an older potstill wrote: every field of every task, at its default for other tasks."""
    raw = recipe.model_dump(mode="json")
    raw.update(pooling="mean", generation={"lmbda": 0.0, "seq_kd": False, "max_new_tokens": 128,
                                           "temperature": 0.9, "top_k": 0, "top_p": 1.0},
               step_by_step=None, ranking=validate_recipe(minimal("ranking")).ranking.model_dump(mode="json"))
    raw["data"].update(collection=None, format="auto", packing=False, add_eos=True)
    raw["teacher"].update(tokenizer=None, endpoint=None, cache=None)
    raw["trainer"]["fused_lm_head"] = False
    raw["eval"].update(probe_train=None, probe_test=None, pairs=None)
    return yaml.safe_dump(raw, sort_keys=False)


def test_recipe_changes(tmp_path, digits_recipe):
    path = write_yaml(tmp_path / "r.yaml", digits_recipe)
    base = load_recipe(path)
    old = dump_recipe(base)
    assert recipe_changes(old, old) == []
    harmless = ["name=other", "output_dir=elsewhere", "eval.every=5", "trainer.log_every=3", "trainer.save_every=7",
                "trainer.keep_last=1", "trainer.num_threads=2"]
    assert recipe_changes(old, dump_recipe(load_recipe(path, harmless))) == []
    # a default written out is no change
    assert recipe_changes(old, dump_recipe(load_recipe(path, ["trainer.weight_decay=0.0", "seed=0",
                                                              "trainer.schedule=cosine"]))) == []
    changed = dump_recipe(load_recipe(path, ["trainer.lr=0.5", "objectives.0.params.temperature=2",
                                             "data.train.limit=10", "trainer.log_every=1"]))
    assert recipe_changes(old, changed) == ["data.train.limit", "objectives.0.params.temperature", "trainer.lr"]
    assert recipe_changes(old, dump_recipe(validate_recipe(minimal("vision")))) == ["task"]
    # a recipe.yaml from before per-task recipes (every field of every task) is read, and equal
    assert recipe_changes(_legacy(base), old) == []
    (tmp_path / "run").mkdir()
    saved = write_yaml(tmp_path / "run" / "recipe.yaml", yaml.safe_load(_legacy(base)))
    assert load_saved_recipe(saved) == base
    with pytest.raises(UserError, match="unknown key 'pooling': pooling is for the embedding and ranking tasks"):
        load_recipe(saved)
    not_default = yaml.safe_load(_legacy(base))
    not_default["pooling"] = "cls"
    with pytest.raises(UserError, match="field pooling: unknown key 'pooling'"):
        recipe_changes(yaml.safe_dump(not_default), old)
