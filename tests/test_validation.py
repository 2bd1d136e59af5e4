"""Bad input is refused up front (issue #22): every case runs the real CLI (`potstill.cli.main`) and must exit 2
with exactly one line on stderr that names the file / field, no traceback, and nothing loaded or written."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from conftest import POTSTILL, REPO, write_yaml

from potstill.cli import main

GOOD_ROW = {"features": [0.0] * 64, "label": 1}


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model load (a factory teacher or student) or task build fails the test: errors must come first."""
    import potstill.tasks.classification as classification
    import potstill.train.run as run

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(run, "build_task", refuse)
    monkeypatch.setattr(classification, "load_factory_teacher", refuse)


@pytest.fixture
def no_model(monkeypatch):
    """The task may load data but no model."""
    import potstill.tasks.classification as classification

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(classification, "load_factory_teacher", refuse)


def one_line_error(capsys, args: list[str], run_dir=None, *, model_loaded: bool = False) -> str:
    """The one error line of a failing command, and no run folder left behind. Before a model loads nothing else
    is written; an error found by loading a model (its weights, its input width) follows only the line that
    announced the set-up ("…")."""
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines[-1].startswith("potstill: error: "), err
    assert all(line.endswith("…") for line in lines[:-1]) and (model_loaded or len(lines) == 1), err
    if run_dir is not None:
        assert not os.path.exists(run_dir), sorted(os.listdir(run_dir))
    return lines[-1]


def run_recipe_error(tmp_path, capsys, raw: dict, *extra: str, model_loaded: bool = False) -> str:
    path = write_yaml(tmp_path / "r.yaml", raw)
    return one_line_error(capsys, ["run", str(path), *extra], run_dir=os.path.join(raw["output_dir"], raw["name"]),
                          model_loaded=model_loaded)


def with_objective(raw: dict, **params) -> dict:
    return dict(raw, objectives=[{"name": "forward_kl", "params": params}])


# ---- 1. objective parameters, by value, when the recipe loads

@pytest.mark.parametrize(("params", "expected"), [
    ({"temperature": 0}, "objectives.0.params.temperature: forward_kl: expected a number > 0, got 0"),
    ({"temperature": -1}, "objectives.0.params.temperature: forward_kl: expected a number > 0, got -1"),
    ({"temperature": "hot"}, "expected a number > 0, got 'hot'"),
    ({"chunk_size": 0}, "objectives.0.params.chunk_size: forward_kl: expected a whole number >= 1 (or null), got 0"),
    ({"chunk_size": -3}, "got -3"),
    ({"scale_t2": "no"}, "objectives.0.params.scale_t2: forward_kl: expected true or false, got 'no'"),
    ({"temprature": 2}, 'has no parameter \'temprature\' (did you mean "temperature"?)'),
])
@pytest.mark.usefixtures("nothing_loads")
def test_objective_params_are_checked_by_value(tmp_path, capsys, digits_recipe, params, expected):
    line = run_recipe_error(tmp_path, capsys, with_objective(digits_recipe, **params))
    assert expected in line and "r.yaml, line " in line


def test_stateful_objective_refuses_through_its_constructor(tmp_path, capsys, digits_recipe):
    raw = dict(digits_recipe, objectives=[{"name": "taid", "params": {"t_start": 0.9, "t_end": 0.1}}])
    assert "t_end must be >= t_start" in run_recipe_error(tmp_path, capsys, raw)


def test_param_rules_follow_the_loss_signatures():
    from potstill.losses.objective_params import check_params, param_rules

    rules = param_rules("generalized_jsd")
    assert sorted(rules) == ["beta", "chunk_size", "scale_t2", "temperature"]
    assert rules["beta"].problem(1.5) == "expected a number >= 0 and <= 1, got 1.5"
    assert rules["beta"].problem(0.5) is None and rules["chunk_size"].problem(None) is None
    assert rules["temperature"].problem(float("inf")) is not None
    assert check_params("forward_kl", {"temperature": 2, "scale_t2": True, "chunk_size": 64}) == []
    # a positional input of the loss is not a recipe parameter
    assert check_params("margin_mse", {"teacher_pos": 1})[0][1].startswith("margin_mse has no parameter 'teacher_pos'")


# ---- 2. numbers, booleans, names, YAML, encodings

@pytest.mark.parametrize(("patch", "expected"), [
    ({"trainer": {"epochs": float("inf")}}, "field trainer.epochs"),
    ({"trainer": {"epochs": 1e300}}, "field trainer.epochs: Input should be less than or equal to 1000000"),
    ({"trainer": {"betas": [2, 3]}}, "field trainer.betas.0: Input should be less than 1"),
    ({"trainer": {"lr": float("nan")}}, "field trainer.lr"),
    ({"seed": -1}, "field seed: Input should be greater than or equal to 0"),
    ({"seed": 2**70}, "field seed"),
    ({"name": ""}, "field name"),
    ({"name": "../elsewhere"}, "field name: the run name is a folder under output_dir"),
    ({"name": "/abs"}, "field name: the run name is a folder under output_dir"),
    ({"eval": {"throughput": "no"}}, "field eval.throughput: Input should be a valid boolean (got 'no')"),
])
@pytest.mark.usefixtures("nothing_loads")
def test_numbers_names_and_booleans_are_bounded(tmp_path, capsys, digits_recipe, patch, expected):
    raw = dict(digits_recipe)
    for key, value in patch.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    if "epochs" in raw["trainer"]:
        raw["trainer"].pop("max_steps")
    assert expected in run_recipe_error(tmp_path, capsys, raw)


@pytest.mark.usefixtures("nothing_loads")
def test_duplicate_yaml_key_names_its_line(tmp_path, capsys, digits_recipe):
    path = write_yaml(tmp_path / "r.yaml", digits_recipe)
    text = path.read_text().replace("seed: 0\n", "seed: 0\nseed: 3\n")
    path.write_text(text)
    line = text.splitlines().index("seed: 3") + 1
    err = one_line_error(capsys, ["run", str(path)])
    assert f"r.yaml, line {line}: duplicate key 'seed' (first given at line {line - 1})" in err


@pytest.mark.usefixtures("nothing_loads")
def test_set_value_that_is_not_yaml(tmp_path, capsys, digits_recipe):
    path = write_yaml(tmp_path / "r.yaml", digits_recipe)
    err = one_line_error(capsys, ["run", str(path), "--set", "trainer.lr=[1, 2"])
    assert "--set trainer.lr: the value '[1, 2' is not valid YAML" in err


@pytest.mark.usefixtures("nothing_loads")
def test_recipe_that_is_not_utf8(tmp_path, capsys, digits_recipe):
    path = tmp_path / "r.yaml"
    text = yaml.safe_dump(digits_recipe).encode()
    path.write_bytes(text + b"# caf\xe9\n")
    err = one_line_error(capsys, ["run", str(path)])
    assert f"r.yaml: not UTF-8 text (byte 0xe9 at offset {len(text) + 5})" in err


@pytest.mark.usefixtures("no_model")
def test_data_file_that_is_not_utf8(tmp_path, capsys, digits_recipe):
    head = (json.dumps(GOOD_ROW) + "\n").encode()
    (tmp_path / "d.jsonl").write_bytes(head + b'{"features": "\xff", "label": 1}\n')
    raw = dict(digits_recipe, data={"train": "d.jsonl"})
    err = run_recipe_error(tmp_path, capsys, raw)
    assert f"d.jsonl: not UTF-8 text (byte 0xff at offset {len(head) + 14})" in err


def test_csv_that_is_not_utf8_gets_the_offset_in_the_file(tmp_path):
    from potstill.data import load_records
    from potstill.errors import UserError

    path = tmp_path / "d.csv"
    head = b"text,label\n" + b"".join(b"row %d,1\n" % i for i in range(3000))
    path.write_bytes(head + b"bad \x80,1\n")
    with pytest.raises(UserError, match=f"byte 0x80 at offset {len(head) + 4}"):
        load_records(path)


# ---- 3. factory kwargs and weights

@pytest.mark.parametrize(("section", "kwargs", "expected"), [
    ("teacher", {"hiden": 16}, "field teacher.kwargs.hiden: potstill.examples.digits:trained_teacher takes no "
                               "argument 'hiden' (did you mean \"hidden\"?)"),
    ("student", {"hidden": "big"}, "field student.kwargs.hidden: potstill.examples.digits:mlp expects int, got 'big'"),
])
@pytest.mark.usefixtures("nothing_loads")
def test_factory_kwargs_are_checked_against_the_signature(tmp_path, capsys, digits_recipe, section, kwargs,
                                                          expected):
    raw = dict(digits_recipe)
    raw[section] = {**raw[section], "kwargs": kwargs}
    if section == "student":  # a teacher that loads fast
        raw["teacher"] = {"factory": "potstill.examples.digits:mlp", "kwargs": {"hidden": 8}}
    assert expected in run_recipe_error(tmp_path, capsys, raw)


@pytest.mark.parametrize("content", [b"garbage", b""])
def test_corrupt_teacher_weights(tmp_path, capsys, digits_recipe, content):
    (tmp_path / "w.safetensors").write_bytes(content)
    raw = dict(digits_recipe, teacher={"factory": "potstill.examples.digits:mlp", "weights": "w.safetensors"})
    assert "field teacher.weights: " in run_recipe_error(tmp_path, capsys, raw, model_loaded=True)


def test_teacher_weights_of_another_model(tmp_path, capsys, digits_recipe):
    from safetensors.torch import save_file

    from potstill.examples.digits import mlp

    save_file(mlp(hidden=4).state_dict(), str(tmp_path / "w.safetensors"))
    raw = dict(digits_recipe, teacher={"factory": "potstill.examples.digits:mlp", "weights": "w.safetensors"})
    line = run_recipe_error(tmp_path, capsys, raw, model_loaded=True)
    assert "does not fit potstill.examples.digits:mlp's module" in line


# ---- 4. classification data

def _data_case(tmp_path, digits_recipe, bad_row, extra=None) -> dict:
    rows = [GOOD_ROW, GOOD_ROW, bad_row]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dict(digits_recipe, data={"train": {"path": "d.jsonl", **(extra or {})}})


@pytest.mark.parametrize(("bad_row", "expected"), [
    ({"features": "0,1,2", "label": 1}, "record 3: field features: expected a list of numbers, got a string"),
    ({"features": [0.0] * 10, "label": 1}, "record 3: field features: 10 numbers, but data.train"),
    ({"features": ["a"] * 64, "label": 1}, "record 3: field features: entry 0 is 'a'; expected a finite number"),
    ({"features": [0.0] * 64, "label": -2}, "record 3: field label: class id -2 is negative"),
    ({"features": [0.0] * 64, "label": "cat"}, "record 3: field label: 'cat' is a class name, but data.train"),
    ({"features": [0.0] * 64, "label": 1.5}, "record 3: field label: 1.5 is not a class id"),
    ({"features": [0.0] * 64, "label": [1]}, "record 3: field label: expected a class id"),
])
@pytest.mark.usefixtures("no_model")
def test_bad_classification_records_before_any_model(tmp_path, capsys, digits_recipe, bad_row, expected):
    line = run_recipe_error(tmp_path, capsys, _data_case(tmp_path, digits_recipe, bad_row))
    assert f"data.train ({tmp_path / 'd.jsonl'}), {expected}" in line


@pytest.mark.parametrize(("rows", "expected"), [
    ([{"features": [0.0] * 63, "label": 1}], "field teacher.factory: the teacher does not take the data's feature "
                                             "vectors of length 63"),
    ([GOOD_ROW, {"features": [0.0] * 64, "label": 15}], "record 2: field label: class id 15 is out of range: the "
                                                        "teacher has 10 classes"),
])
def test_records_that_do_not_fit_the_teacher(tmp_path, capsys, digits_recipe, rows, expected):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = dict(digits_recipe, data={"train": "d.jsonl"},
               teacher={"factory": "potstill.examples.digits:mlp", "kwargs": {"hidden": 8}})
    assert expected in run_recipe_error(tmp_path, capsys, raw, model_loaded=True)


@pytest.mark.usefixtures("no_model")
def test_columns_mapping_to_a_missing_column(tmp_path, capsys, digits_recipe):
    raw = _data_case(tmp_path, digits_recipe, GOOD_ROW, {"columns": {"features": "feats"}})
    line = run_recipe_error(tmp_path, capsys, raw)
    assert 'd.jsonl: column "feats" (mapped to "features") is not in the data (did you mean "features"?)' in line


def test_string_labels_of_a_factory_teacher_are_numbered_in_sorted_order_with_a_warning(tmp_path, capsys):
    from potstill.config import validate_recipe
    from potstill.tasks import build_task

    rows = [{"features": [0.0] * 64, "label": name} for name in ("sport", "business", "tech", "business")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = validate_recipe({
        "task": "classification", "output_dir": str(tmp_path / "runs"),
        "teacher": {"factory": "potstill.examples.digits:mlp", "kwargs": {"hidden": 8, "num_classes": 3}},
        "student": {"init": "factory", "factory": "potstill.examples.digits:mlp", "kwargs": {"num_classes": 3}},
        "data": {"train": str(tmp_path / "d.jsonl")}, "objectives": [{"name": "forward_kl"}]})
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    assert task.label_ids == {"business": 0, "sport": 1, "tech": 2}
    assert "warning: data: the labels are class names" in capsys.readouterr().err


def test_digit_string_labels_are_class_ids(tmp_path):
    from potstill.data.record_checks import check_class_labels, is_class_id

    assert [is_class_id(x) for x in (3, 3.0, "3", " 12 ", -1, 1.5, True, "cat")] == [
        True, True, True, True, False, False, False, False]
    assert check_class_labels([("d", [{"label": "3"}, {"label": 0}, {"label": None}])]) == "ids"


def test_student_deeper_than_its_teacher_warns(capsys):
    from transformers import BertConfig, BertModel

    from potstill.students.loading import warn_if_deeper

    small = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                                 vocab_size=10))
    deep = BertModel(BertConfig(hidden_size=8, num_hidden_layers=3, num_attention_heads=1, intermediate_size=8,
                                vocab_size=10))
    assert warn_if_deeper(deep, small, field="student.init") is True
    assert "student has 3 layers, more than the teacher's 1" in capsys.readouterr().err
    assert warn_if_deeper(small, deep, field="student.init") is False


# ---- 5. output folder, cache and serve options

@pytest.mark.usefixtures("nothing_loads")
def test_output_dir_that_is_a_file(tmp_path, capsys, digits_recipe):
    (tmp_path / "afile").write_text("x")
    raw = dict(digits_recipe, output_dir=str(tmp_path / "afile"))
    assert f"field output_dir: {tmp_path / 'afile'} is a file" in run_recipe_error(tmp_path, capsys, raw)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
@pytest.mark.usefixtures("nothing_loads")
def test_output_dir_that_is_read_only(tmp_path, capsys, digits_recipe):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        raw = dict(digits_recipe, output_dir=str(folder))
        assert "is not writable" in run_recipe_error(tmp_path, capsys, raw)
    finally:
        folder.chmod(0o700)


@pytest.mark.usefixtures("nothing_loads")
def test_output_dir_without_write_permission(tmp_path, capsys, digits_recipe, monkeypatch):
    real_access = os.access
    folder = tmp_path / "ro"
    folder.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(folder) else real_access(path, mode))
    raw = dict(digits_recipe, output_dir=str(folder))
    assert f"field output_dir: {folder} is not writable" in run_recipe_error(tmp_path, capsys, raw)


@pytest.mark.parametrize("argv", [["cache", "x.yaml", "--k", "0"], ["serve", "builtin:smollm2", "--fail-rate", "2"],
                                  ["run"], ["runn"], [], ["objectives", "--bogus"]])
def test_usage_errors_are_one_line(capsys, argv):
    line = one_line_error(capsys, argv)
    assert "Usage: potstill" in line


@pytest.mark.parametrize(("k", "temperature", "expected"), [(0, 1.0, "--k: expected a whole number from 1"),
                                                            (11, 1.0, "vocabulary size 10, got 11"),
                                                            (2, 0.0, "--temperature: expected a finite number > 0")])
def test_cache_k_and_temperature(tmp_path, k, temperature, expected):
    from potstill.errors import UserError
    from potstill.teachers.capture import capture_teacher_topk

    class Task:
        vocab_size = 10
        train_records: list = []

    with pytest.raises(UserError, match=expected):
        capture_teacher_topk(Task(), tmp_path / "cache", k=k, temperature=temperature)
    assert not (tmp_path / "cache").exists()


# ---- 6. the error boundary

@pytest.mark.parametrize(("exc", "expected"), [
    (PermissionError(13, "Permission denied", "/x/y"), "potstill: error: /x/y: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "/x"), "potstill: error: /x: Is a directory"),
    (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"), "not UTF-8 text (byte 0xff at offset 2)"),
])
def test_os_and_encoding_errors_are_one_line(monkeypatch, capsys, exc, expected):
    import potstill.methods

    def boom(json_output: bool) -> None:
        raise exc

    monkeypatch.setattr(potstill.methods, "methods_command", boom)
    assert expected in one_line_error(capsys, ["methods"])


def test_ctrl_c_exits_130_with_a_resume_hint(monkeypatch, capsys, tmp_path, digits_recipe):
    import potstill.config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(potstill.config, "load_recipe", interrupted)
    capsys.readouterr()
    assert main(["run", str(write_yaml(tmp_path / "r.yaml", digits_recipe))]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["potstill: interrupted; `potstill run RECIPE --resume` continues the run from its last checkpoint"]


def test_a_bug_keeps_its_traceback(monkeypatch):
    import potstill.methods

    def bug(json_output: bool) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(potstill.methods, "methods_command", bug)
    with pytest.raises(ZeroDivisionError):
        main(["methods"])


def test_real_process_usage_error_is_one_line():
    proc = subprocess.run([*POTSTILL, "run"], capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2
    assert lines == ["potstill: error: Missing argument 'recipe'. (Usage: potstill run [OPTIONS] {recipe}; see "
                     "--help)"]


# ---- top-k cache: a manifest that disagrees with its shards

def _small_cache(path):
    import torch

    from potstill.teachers.cache_writer import TopKCacheWriter

    generator = torch.Generator().manual_seed(0)
    with TopKCacheWriter(path, k=8, temperature=1.0, vocab_size=50, meta={}) as writer:
        for record in range(3):
            writer.add(record, torch.randn(5, 50, generator=generator))
    return path


def _edit_manifest(path, **fields):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(fields)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_cache_manifest_k_that_disagrees_with_its_shards(tmp_path):
    from potstill.errors import UserError
    from potstill.teachers.cache import TopKCache

    cache = _small_cache(tmp_path / "c")
    _edit_manifest(cache, k=4)
    with pytest.raises(UserError, match=r"holds ids \[15, 8\] .* but manifest.json records k=4 and 15 tokens"):
        TopKCache(cache)
    _edit_manifest(cache, k=60)
    with pytest.raises(UserError, match="records k=60 for a vocabulary of 50"):
        TopKCache(cache)


def test_cache_ids_outside_the_vocabulary(tmp_path):
    from potstill.errors import UserError
    from potstill.teachers.cache import TopKCache

    cache = _small_cache(tmp_path / "c")
    _edit_manifest(cache, vocab_size=10)
    with pytest.raises(UserError, match="outside the vocabulary of 10"):
        TopKCache(cache).get([0, 1, 2])


def test_layers_from_teacher_out_of_range_is_a_user_error():
    from transformers import BertConfig, BertModel

    from potstill.config import StudentConfig
    from potstill.errors import UserError
    from potstill.students.loading import build_student

    teacher = BertModel(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=1, intermediate_size=8,
                                   vocab_size=10))
    with pytest.raises(UserError, match=r"field student: cannot build the student: layer index 5 is out of range: "
                                        r"the teacher has 2 layers \(0..1\)"):
        build_student(StudentConfig(init="layers_from_teacher", layers=[0, 5]), teacher, seed=0)
