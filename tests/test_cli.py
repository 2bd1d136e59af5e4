"""CLI and recipe errors: user mistakes exit 2 with a message that names the file, line and field."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import POTSTILL, REPO, write_yaml

from potstill.cli import main
from potstill.config import apply_overrides, load_recipe


def _fail(capsys, args: list[str]) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_bad_yaml(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("task: classification\nteacher: {path: x\ndata: [\n")
    err = _fail(capsys, ["run", str(path)])
    assert "r.yaml, line" in err and "not valid YAML" in err


def test_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("- just\n- a list\n")
    assert "must be a YAML mapping" in _fail(capsys, ["run", str(path)])


def test_unknown_key_with_hint_and_line(tmp_path, capsys, digits_recipe):
    raw = dict(digits_recipe)
    raw["trainer"] = dict(raw["trainer"], learning_rate=0.1)
    path = write_yaml(tmp_path / "r.yaml", raw)
    line = next(i for i, x in enumerate(path.read_text().splitlines(), 1) if "learning_rate" in x)
    err = _fail(capsys, ["run", str(path)])
    assert f"r.yaml, line {line}: field trainer.learning_rate: unknown key 'learning_rate'" in err


def test_unknown_top_level_key_hint(tmp_path, capsys, digits_recipe):
    raw = dict(digits_recipe, objectivs=[])
    err = _fail(capsys, ["run", str(write_yaml(tmp_path / "r.yaml", raw))])
    assert 'unknown key \'objectivs\' (did you mean "objectives"?)' in err


def test_wrong_type(tmp_path, capsys, digits_recipe):
    raw = dict(digits_recipe, trainer=dict(digits_recipe["trainer"], batch_size="thirty-two"))
    err = _fail(capsys, ["run", str(write_yaml(tmp_path / "r.yaml", raw))])
    assert "field trainer.batch_size" in err and "thirty-two" in err and "integer" in err


def test_unknown_objective_hint(tmp_path, capsys, digits_recipe):
    raw = dict(digits_recipe, objectives=[{"name": "forward_k1"}])
    err = _fail(capsys, ["run", str(write_yaml(tmp_path / "r.yaml", raw))])
    assert "field objectives.0.name" in err and 'did you mean "forward_kl"' in err


def test_objective_param_hint(tmp_path, capsys, digits_recipe):
    raw = dict(digits_recipe, objectives=[{"name": "forward_kl", "params": {"temprature": 2}}])
    err = _fail(capsys, ["run", str(write_yaml(tmp_path / "r.yaml", raw))])
    assert "objectives.0.params.temprature" in err and 'did you mean "temperature"' in err


def test_objective_of_wrong_signal_kind(tmp_path, capsys, digits_recipe):
    raw = dict(digits_recipe, objectives=[{"name": "embedding_mse"}])
    err = _fail(capsys, ["run", str(write_yaml(tmp_path / "r.yaml", raw))])
    assert "embedding_mse" in err and "classification task gives logits" in err


def test_missing_data_file(tmp_path, capsys, digits_recipe):
    raw = dict(digits_recipe, data={"train": "nowhere/train.jsonl"})
    err = _fail(capsys, ["run", str(write_yaml(tmp_path / "r.yaml", raw))])
    assert "data file not found" in err and "train.jsonl" in err


def test_malformed_jsonl_line(tmp_path, capsys, digits_recipe):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"features": [0.0] * 64, "label": 1})
    data.write_text("\n".join([good, good, '{"features": [0.0, "label": 3}', good]) + "\n")
    raw = dict(digits_recipe, data={"train": "train.jsonl"})
    err = _fail(capsys, ["run", str(write_yaml(tmp_path / "r.yaml", raw))])
    assert "train.jsonl, line 3" in err and "invalid JSON" in err


def test_missing_field_in_data(tmp_path, capsys, digits_recipe):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"feats": [0.0] * 64, "label": 1}) + "\n")
    raw = dict(digits_recipe, data={"train": "train.jsonl"})
    err = _fail(capsys, ["run", str(write_yaml(tmp_path / "r.yaml", raw))])
    assert "train.jsonl, line 1" in err and "features" in err


def test_missing_recipe(capsys):
    assert "recipe not found" in _fail(capsys, ["run", "no-such-recipe.yaml"])


def test_bad_set_override(tmp_path, capsys, digits_recipe):
    path = write_yaml(tmp_path / "r.yaml", digits_recipe)
    assert "expected KEY=VALUE" in _fail(capsys, ["run", str(path), "--set", "trainer.lr"])
    err = _fail(capsys, ["run", str(path), "--set", "trainer.max_stepz=3"])
    assert "unknown key 'max_stepz'" in err and 'did you mean "max_steps"' in err


def test_set_overrides_apply(tmp_path, digits_recipe):
    path = write_yaml(tmp_path / "r.yaml", digits_recipe)
    recipe = load_recipe(path, ["trainer.max_steps=7", "objectives.0.weight=0.5", "eval.every=2",
                                "objectives.0.params.temperature=2"])
    assert recipe.trainer.max_steps == 7 and recipe.objectives[0].weight == 0.5 and recipe.eval.every == 2
    assert recipe.objectives[0].params["temperature"] == 2
    raw = apply_overrides({"a": [1, 2]}, ["a.1=5", "b.c=x"])
    assert raw == {"a": [1, 5], "b": {"c": "x"}}


def test_relative_paths_resolve_against_recipe(tmp_path, digits_recipe, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "train.jsonl").write_text(json.dumps({"features": [0.0] * 64, "label": 1}) + "\n")
    path = write_yaml(tmp_path / "sub" / "r.yaml", dict(digits_recipe, data={"train": "train.jsonl"}))
    monkeypatch.chdir(REPO)
    assert load_recipe(path).data.train.path == str(tmp_path / "sub" / "train.jsonl")


def test_objectives_lists_all(capsys):
    from potstill.losses import OBJECTIVES

    assert main(["objectives"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    for name, info in OBJECTIVES.items():
        assert name in text and info.paper.split(",")[0] in text


def test_real_process_exit_code_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: classification\nteacher: {factory: 'x:y'}\ndata: {train: t.jsonl}\nbogus: 1\n")
    proc = subprocess.run(POTSTILL + ["run", str(path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "unknown key 'bogus'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(recipe):
    load_recipe(REPO / "recipes" / recipe)


def test_eval_command_scores_a_finished_run(tmp_path, capsys, digits_recipe):
    path = write_yaml(tmp_path / "r.yaml", digits_recipe)
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / digits_recipe["name"]
    summary = json.loads((run_dir / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "teacher" in text and "student" in text
    # the same accuracy as the run's own final evaluation, shown with 3 decimals, and saved in eval.json
    assert f"{summary['table'][-1]['accuracy']:.3f}" in text
    rows = json.loads((run_dir / "eval.json").read_text())["table"]
    assert [r["model"] for r in rows] == ["teacher", "student"]
    assert rows[1]["accuracy"] == pytest.approx(summary["table"][-1]["accuracy"])


def test_eval_command_on_a_non_run(tmp_path, capsys):
    assert "not a finished potstill run" in _fail(capsys, ["eval", str(tmp_path)])


@pytest.mark.parametrize("argv", [[], ["runn"], ["run"], ["objectives", "--bogus"], ["cache"]])
def test_usage_errors_exit_2_without_a_traceback(argv, capsys):
    assert main(argv) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Usage: potstill" in text and "Traceback" not in text


def test_version(capsys):
    from potstill import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"potstill {__version__}"


def test_a_full_disk_mid_run_is_one_line_with_how_to_resume(tmp_path, capsys, digits_recipe, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)  # what the checkpoint writer calls
    raw = dict(digits_recipe, output_dir=str(tmp_path / "runs"),
               trainer=dict(digits_recipe["trainer"], max_steps=2, save_every=1))
    err = _fail(capsys, ["run", str(write_yaml(tmp_path / "r.yaml", raw))])
    assert "no space left on device; free some space, then `potstill run RECIPE --resume`" in err
    assert err.count("potstill: error:") == 1 and err.endswith("resume from)\n")
    # anything else keeps its traceback: a bug is not reported as the user's
    monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["run", str(write_yaml(tmp_path / "r.yaml", dict(raw, name="other")))])
