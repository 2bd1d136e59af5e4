"""trainer.report_to: Accelerate's trackers get the scalars of metrics.jsonl (TensorBoard, offline)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.train import run_recipe
from potstill.train.trackers import check_trackers, flat_config


def test_tensorboard_event_files_hold_the_metrics(digits_recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 4, "report_to": "tensorboard"},
               eval={**digits_recipe["eval"], "every": 2})
    recipe = validate_recipe(raw)
    assert recipe.trainer.report_to == ["tensorboard"]
    run_recipe(recipe)
    events = sorted((recipe.run_dir / "trackers" / "potstill").glob("events.out.tfevents.*"))
    assert events, list((recipe.run_dir / "trackers").rglob("*"))
    board = EventAccumulator(str(events[0].parent))
    board.Reload()
    lines = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(x["step"], x["loss"]) for x in lines if "loss" in x]
    accuracies = [(x["step"], x["eval/accuracy"]) for x in lines if "eval/accuracy" in x]
    assert [s for s, _ in losses] == [1, 2, 3, 4] and [s for s, _ in accuracies] == [2, 4]
    logged = [(e.step, e.value) for e in board.Scalars("loss")]
    assert [s for s, _ in logged] == [s for s, _ in losses]
    assert [v for _, v in logged] == pytest.approx([v for _, v in losses], rel=1e-6)  # stored as float32
    board_accuracies = board.Scalars("eval/accuracy")
    assert [e.step for e in board_accuracies] == [2, 4]
    assert [e.value for e in board_accuracies] == pytest.approx([v for _, v in accuracies], rel=1e-6)
    assert {"lr", "epoch", "obj/forward_kl", "grad_norm"} <= set(board.Tags()["scalars"])
    # a new run in the same folder starts clean
    run_recipe(recipe, overwrite=True)
    assert len(list((recipe.run_dir / "trackers" / "potstill").glob("events.out.tfevents.*"))) == 1


def test_unknown_tracker_lists_the_valid_ones(digits_recipe):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "report_to": ["tensorbord"]})
    with pytest.raises(UserError, match="trainer.report_to.*'tensorboard'"):
        validate_recipe(raw)
    assert validate_recipe(dict(digits_recipe, trainer={**digits_recipe["trainer"], "report_to": "none"})
                           ).trainer.report_to == []


@pytest.mark.skipif(importlib.util.find_spec("clearml") is not None, reason="clearml is installed")
def test_absent_tracker_names_the_install(digits_recipe):
    message = "^field trainer.report_to: clearml is not installed here: pip install clearml$"
    with pytest.raises(UserError, match=message):
        check_trackers(["clearml"])
    recipe = validate_recipe(dict(digits_recipe, trainer={**digits_recipe["trainer"], "report_to": ["clearml"]}))
    with pytest.raises(UserError, match="clearml is not installed"):
        run_recipe(recipe)
    assert not recipe.run_dir.exists()


def test_flat_config():
    assert flat_config({"trainer": {"lr": 0.1, "betas": [0.9, 0.99], "x": None}, "name": "a"}) == {
        "trainer.lr": 0.1, "trainer.betas": "[0.9, 0.99]", "trainer.x": "None", "name": "a"}


def test_report_to_may_change_on_resume(digits_recipe):
    from potstill.config import dump_recipe, recipe_changes

    old = dump_recipe(validate_recipe(digits_recipe))
    new = dump_recipe(validate_recipe(dict(digits_recipe, trainer={**digits_recipe["trainer"],
                                                                   "report_to": "tensorboard"})))
    assert old != new and recipe_changes(old, new) == []
    sgd = dump_recipe(validate_recipe(dict(digits_recipe, trainer={**digits_recipe["trainer"], "optimizer": "sgd"})))
    assert recipe_changes(old, sgd) == ["trainer.optimizer"]
