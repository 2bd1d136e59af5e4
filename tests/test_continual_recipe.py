"""`task: continual` through `potstill run`: validation, the run folder, resume at a task boundary, and the same
numbers as the loop the PRD benchmark calls. A 2-task split-MNIST stream of 10 training images per class."""

from __future__ import annotations

import json

import pytest
import torch

from potstill.config import ContinualRecipe, distillation_recipe, load_recipe, validate_recipe
from potstill.errors import UserError
from potstill.recipes import packaged_recipe
from potstill.train import continual_run, prd_stream
from potstill.train.continual_run import build_stream, load_continual_net, run_continual
from potstill.train.prd_stream import StreamConfig, predict, random_crop_augment, small_cnn_net, train_stream

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, name: str = "cl", **settings) -> ContinualRecipe:
    pytest.importorskip("mlxtend")
    raw = {"name": name, "output_dir": str(tmp_path / "runs"), "task": "continual", "seed": 1,
           "continual": {"train_per_class": 10, "test_per_class": 5, "num_tasks": 2, "epochs": 1, "batch_size": 8,
                         "log_every": 1, **settings}}
    recipe = validate_recipe(raw)
    assert isinstance(recipe, ContinualRecipe)
    return recipe


def weights(folder) -> dict[str, torch.Tensor]:
    return load_continual_net(folder)[0].state_dict()


def test_the_packaged_recipes_validate_and_errors_name_the_field(tmp_path):
    for name, stream in (("split-mnist-prd", "split-mnist"), ("split-fashion-mnist-prd", "split-fashion-mnist")):
        recipe = load_recipe(packaged_recipe(name))
        assert isinstance(recipe, ContinualRecipe) and recipe.continual.stream == stream
        assert recipe.continual.method == "prd" and recipe.continual.distill_weight == 4.0
    path = packaged_recipe("split-mnist-prd")
    with pytest.raises(UserError, match=r"--set continual.method=lwff: field continual.method: .*'prd', 'lwf' or "
                                        r"'finetune'"):
        load_recipe(path, ["continual.method=lwff"])
    with pytest.raises(UserError, match=r"field continual.metod: unknown key 'metod' \(did you mean \"method\"\?\)"):
        load_recipe(path, ["continual.metod=lwf"])
    with pytest.raises(UserError, match=r"field continual.epochs: Input should be greater than or equal to 1"):
        load_recipe(path, ["continual.epochs=0"])
    with pytest.raises(UserError, match=r"field continual.stream: Input should be 'split-mnist' or"):
        load_recipe(path, ["continual.stream=cifar"])
    with pytest.raises(UserError, match=r"field student: unknown key 'student': student is for the classification"):
        load_recipe(path, ["student={init: factory}"])
    with pytest.raises(UserError, match=r"field task: potstill eval needs a distillation recipe"):
        distillation_recipe(load_recipe(path), "potstill eval")


def test_a_run_writes_the_run_folder_and_its_numbers(tmp_path):
    recipe = tiny(tmp_path)
    summary = run_continual(recipe)
    run_dir = recipe.run_dir
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["stream_tasks"] == [[0, 1], [2, 3]] and summary["complete"]
    assert [len(row) for row in summary["accuracy"]] == [1, 2]
    final = summary["accuracy"][-1]
    assert summary["average_accuracy"] == pytest.approx(sum(final) / 2)
    assert summary["forgetting"] == pytest.approx(summary["accuracy"][0][0] - final[0])
    assert load_recipe(run_dir / "recipe.yaml") == recipe
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/average_accuracy" in r]
    # 20 images per task in batches of 8: 2 full batches and one of 4, one epoch
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["stream_task"]) for r in evals] == [(3, 0), (6, 1)]
    assert evals[1]["eval/task_0_accuracy"] == final[0] and evals[1]["eval/task_1_accuracy"] == final[1]
    # the saved network predicts what the summary scored: nearest prototype among the 4 classes seen
    net, info = load_continual_net(run_dir / "student")
    assert info["method"] == "prd" and info["classes_seen"] == [0, 1, 2, 3]
    tasks = build_stream(recipe)
    for task, accuracy in zip(tasks, final, strict=True):
        hits = (predict(net, task.test.images, info["classes_seen"], "prd") == task.test.labels).float().mean()
        assert float(hits) == pytest.approx(accuracy)
    # the benchmark's path (prd_stream.train_stream on the same network, settings and batches) gives the same numbers
    cfg = StreamConfig(epochs=1, batch_size=8, seed=1)
    direct = train_stream(small_cnn_net(seed=1), tasks, cfg, random_crop_augment(2))
    assert direct.accuracy == summary["accuracy"]


def test_a_second_run_into_the_folder_is_refused_without_resume_or_overwrite(tmp_path):
    recipe = tiny(tmp_path, method="finetune")
    first = run_continual(recipe)
    with pytest.raises(UserError, match="already holds checkpoints up to stream task 2; pass --resume to continue it, "
                                        "--overwrite to start over"):
        run_continual(recipe)
    assert run_continual(recipe, resume=True) == first  # complete: nothing to redo
    again = run_continual(recipe, overwrite=True)
    assert again["accuracy"] == first["accuracy"]
    changed = recipe.model_copy(update={"continual": recipe.continual.model_copy(update={"lr": 0.1})})
    (recipe.run_dir / "summary.json").unlink()
    with pytest.raises(UserError, match=r"the recipe changed since the run started \(continual.lr\)"):
        run_continual(changed, resume=True)


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["prd", "lwf"])
def test_a_run_killed_after_a_task_resumes_at_the_next_and_ends_the_same(tmp_path, monkeypatch, method):
    whole = run_continual(tiny(tmp_path, "whole", method=method))
    recipe = tiny(tmp_path, "killed", method=method)
    write = continual_run._write_checkpoint

    def write_then_die(root, done, *args):
        write(root, done, *args)
        if done == 1:
            raise Killed

    monkeypatch.setattr(continual_run, "_write_checkpoint", write_then_die)
    with pytest.raises(Killed):
        run_continual(recipe)
    assert not (recipe.run_dir / "summary.json").exists()
    monkeypatch.setattr(continual_run, "_write_checkpoint", write)
    trained = []
    original_train_task = prd_stream.train_task

    def counting(model, old, task, *args):
        trained.append((task.index, old is not None))
        return original_train_task(model, old, task, *args)

    monkeypatch.setattr(prd_stream, "train_task", counting)
    resumed = run_continual(recipe, resume=True)
    assert trained == [(1, True)]  # only the second task, with the checkpoint's network as the old model
    assert resumed["accuracy"] == whole["accuracy"]
    got, want = weights(recipe.run_dir / "student"), weights(tmp_path / "runs" / "whole" / "student")
    assert all(torch.equal(got[k], want[k]) for k in want)
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stream_task"] for r in records if "eval/average_accuracy" in r] == [0, 1]
