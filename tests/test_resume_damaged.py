"""`--resume` with a damaged newest checkpoint: one line saying so, then the previous checkpoint, and the same
final weights as an undamaged run; with no usable checkpoint, one line and exit 2 (never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from conftest import POTSTILL, REPO, write_yaml
from safetensors.torch import load_file

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.train import checkpoint as ckpt
from potstill.train import run_recipe


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _killed_after_last_checkpoint(run_dir):
    """A run killed after its newest checkpoint, before it finished: no summary.json (a complete run's `--resume`
    does nothing; tests/test_first_use_traps.py)."""
    (run_dir / "summary.json").unlink()


def _wrong_shape(folder):
    from safetensors.torch import save_file

    save_file({"0.weight": torch.zeros(3, 3)}, str(folder / "student.safetensors"))


DAMAGES = {
    "truncated student.safetensors": (lambda d: _truncate(d / "student.safetensors"),
                                      "student.safetensors is unreadable"),
    "broken state.json": (lambda d: (d / "state.json").write_text('{"step": 6, "world'), "state.json is unreadable"),
    "missing optimizer.pt": (lambda d: (d / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "truncated rng state": (lambda d: _truncate(d / "rng-rank0.pt"), "rng-rank0.pt is unreadable"),
    "student of another shape": (_wrong_shape, "student.safetensors does not fit this run"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_past_a_damaged_newest_checkpoint_to_the_same_weights(digits_recipe, damage, capsys):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 6, "save_every": 2, "keep_last": 2})
    recipe = validate_recipe(raw)
    run_recipe(recipe)
    run, root = recipe.run_dir, recipe.run_dir / "checkpoints"
    straight = load_file(str(run / "student" / "model.safetensors"))
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4, 6]
    do_damage, expected = DAMAGES[damage]
    do_damage(root / "step-00000006")
    _killed_after_last_checkpoint(run)
    capsys.readouterr()

    assert run_recipe(recipe, resume=True)["steps"] == 6
    err = " ".join(capsys.readouterr().err.split())
    assert f"checkpoint {root / 'step-00000006'} is damaged: {expected}" in err
    assert "set aside as damaged-step-00000006, falling back to step-00000004" in err
    assert f"resumed from {root / 'step-00000004'}" in err
    resumed = load_file(str(run / "student" / "model.safetensors"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    again = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss")) for r in again] == [(r["step"], r.get("loss")) for r in log]
    # the damaged one is kept aside, out of the rotation; keep_last applies to the good ones
    assert (root / "damaged-step-00000006").is_dir()
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4, 6]


def test_no_usable_checkpoint_is_a_user_error_and_nothing_is_moved(digits_recipe):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 4, "save_every": 2, "keep_last": 2})
    recipe = validate_recipe(raw)
    run_recipe(recipe)
    root = recipe.run_dir / "checkpoints"
    _truncate(root / "step-00000004" / "student.safetensors")
    (root / "step-00000002" / "state.json").write_text("")
    _killed_after_last_checkpoint(recipe.run_dir)
    with pytest.raises(UserError, match=r"no usable checkpoint in .*step-00000004: student.safetensors is "
                                        r"unreadable .*; step-00000002: state.json is unreadable .*--overwrite"):
        run_recipe(recipe, resume=True)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4]


def test_cli_resume_without_a_usable_checkpoint_exits_2_in_one_line(digits_recipe, tmp_path):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 2, "save_every": 1, "keep_last": 2})
    path = write_yaml(tmp_path / "r.yaml", raw)
    recipe = validate_recipe(raw)
    run_recipe(recipe)
    (recipe.run_dir / "checkpoints" / "step-00000002" / "state.json").write_text("{not json")
    (recipe.run_dir / "checkpoints" / "step-00000001" / "scheduler.pt").unlink()
    _killed_after_last_checkpoint(recipe.run_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    out = subprocess.run(POTSTILL + ["run", str(path), "--resume"], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 2, out.stderr
    *progress, error = out.stderr.strip().splitlines()  # set-up lines, then the one error line
    assert "Traceback" not in out.stderr and all(line.endswith("…") or ": done in " in line for line in progress)
    assert "no usable checkpoint" in error and "step-00000002: state.json is unreadable" in error
    assert "step-00000001: scheduler.pt is missing" in error
