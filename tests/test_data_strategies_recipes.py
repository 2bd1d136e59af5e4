"""Data strategies of issue #6 §5 in a recipe: data.prune and data.domains (DDK) through the training loop."""

from __future__ import annotations

import json

import pytest
import torch

from potstill.data.pruning import (
    kd_weight_for_fraction,
)

# -- data.prune in a recipe ---------------------------------------------------------------------------------------

def test_recipe_prune_keeps_the_fraction_and_ties_the_kd_weight(tmp_path, digits_recipe):
    import json

    from conftest import write_yaml

    from potstill.cli import main
    from potstill.config import validate_recipe
    from potstill.tasks import build_task
    from potstill.train.run import with_pruned_kd_weights

    digits_recipe["data"]["prune"] = {"fraction": 0.25}
    digits_recipe["objectives"][0]["weight"] = 2.0
    recipe = validate_recipe(digits_recipe)
    task = build_task(recipe, run_dir=tmp_path / "run")
    task.setup()
    assert len(task.train_records) == 64  # 25 % of the 256 records
    again = build_task(recipe, run_dir=tmp_path / "run2")
    again.setup()
    assert again.train_records == task.train_records  # seeded
    tied = with_pruned_kd_weights(recipe)
    alpha = kd_weight_for_fraction(0.25)
    assert tied.objectives[0].weight == pytest.approx(alpha)
    assert tied.trainer.hard_label_weight == pytest.approx(1 - alpha)
    assert recipe.objectives[0].weight == 2.0  # the recipe itself is unchanged
    digits_recipe["data"]["prune"] = {"fraction": 0.25, "tie_kd_weight": False}
    assert with_pruned_kd_weights(validate_recipe(digits_recipe)).trainer.hard_label_weight == 0.0

    # ranking by a score column: the hardest quarter of a scored file
    rows = [{"features": [float(i)] * 64, "label": i % 10, "difficulty": float((7 * i) % 40)} for i in range(40)]
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    digits_recipe["data"]["train"] = str(data)
    digits_recipe["data"]["prune"] = {"fraction": 0.25, "keep": "hardest", "score_column": "difficulty"}
    task = build_task(validate_recipe(digits_recipe), run_dir=tmp_path / "run3")
    task.setup()
    assert sorted(r["difficulty"] for r in task.train_records) == [float(d) for d in range(30, 40)]

    # user mistakes: exit 2 with the field named
    rows[3]["difficulty"] = "high"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    digits_recipe["trainer"]["max_steps"] = 1
    assert main(["run", str(write_yaml(tmp_path / "bad.yaml", digits_recipe))]) == 2
    digits_recipe["data"]["prune"] = {"fraction": 0.25, "keep": "hardest"}
    assert main(["run", str(write_yaml(tmp_path / "bad2.yaml", digits_recipe))]) == 2
    digits_recipe["data"]["prune"] = {"fraction": 1.5}
    assert main(["run", str(write_yaml(tmp_path / "bad3.yaml", digits_recipe))]) == 2


# -- data.domains (DDK) in the training loop -----------------------------------------------------------------------

def _domain_files(tmp_path):
    import json

    from potstill.data import builtin_records

    def write(name, split, limit):
        rows = builtin_records("digits", split)[:limit]
        for r in rows:
            r["domain"] = "low" if r["label"] < 5 else ("high" if r["label"] < 9 else "nine")
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / f"{name}.jsonl")

    return write("train", "train", 300), write("eval", "test", 200)


def test_recipe_domains_reweights_blocks_and_replays_on_resume(tmp_path, digits_recipe):
    import json

    from potstill.config import validate_recipe
    from potstill.tasks import build_task
    from potstill.train import run_recipe

    train, eval_ = _domain_files(tmp_path)
    digits_recipe["data"] = {"train": train, "eval": eval_, "domains": {"every": 2, "eval_records": 30}}
    digits_recipe["trainer"]["max_steps"] = 8
    recipe = validate_recipe(digits_recipe)
    run_recipe(recipe)
    history = json.loads((recipe.run_dir / "domain_weights.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # 8 steps in blocks of 2
    floor = (1 - 0.5) / 3
    for h in history:
        assert sum(h["weights"].values()) == pytest.approx(1.0) and min(h["weights"].values()) >= floor - 1e-12
    assert history[0]["weights"] == {"low": pytest.approx(1 / 3), "high": pytest.approx(1 / 3),
                                     "nine": pytest.approx(1 / 3)}
    assert set(history[1]["student_ppl"]) == {"low", "high", "nine"}
    ratios = {d: history[1]["student_ppl"][d] / history[1]["teacher_ppl"][d] for d in ("low", "high", "nine")}
    worst, best = max(ratios, key=ratios.get), min(ratios, key=ratios.get)
    assert history[1]["weights"][worst] > history[1]["weights"][best]  # the lagging domain gains weight

    # a fresh hook in the same run folder replays the recorded blocks: same batches, nothing measured again
    from potstill.train.data_order import domain_blocks

    def hook(task):
        task.setup()
        return domain_blocks(task, run_dir=recipe.run_dir, seed=recipe.seed, global_batch=8, grad_accum=1,
                             fresh=False)

    first = build_task(recipe, run_dir=recipe.run_dir)
    orders = [hook(first).order(b) for b in range(4)]
    assert all(len(o) == 2 * 8 for o in orders)
    replay = build_task(recipe, run_dir=recipe.run_dir)
    blocks = hook(replay)
    replay.eval_loss = lambda *a: pytest.fail("a recorded block must not be measured again")
    for step in (2, 4, 6):  # the loop's block ends: recorded, so replayed
        blocks.on_block_end(step)
    assert blocks.order(2) == orders[2] and blocks.order(3) == orders[3]
    domains = [r["domain"] for r in first.train_records]
    assert {domains[i] for o in orders for i in o} == {"low", "high", "nine"}
    assert json.loads((recipe.run_dir / "domain_weights.json").read_text()) == history  # nothing re-recorded


def test_recipe_domains_epochs_count_passes_over_the_records(tmp_path, digits_recipe):
    """With data.domains, trainer.epochs still means passes over data.train: DDK changes which records a block
    draws, not the number of steps (300 records / batch 8 = 37 steps per epoch)."""
    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    train, eval_ = _domain_files(tmp_path)
    digits_recipe["data"] = {"train": train, "eval": eval_, "domains": {"every": 10, "eval_records": 10}}
    digits_recipe["trainer"].update(epochs=1, max_steps=None, batch_size=8, grad_accum=1)
    digits_recipe["eval"] = {"compare_before": False, "throughput": False}
    recipe = validate_recipe(digits_recipe)
    assert run_recipe(recipe)["steps"] == 300 // 8
    history = json.loads((recipe.run_dir / "domain_weights.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # blocks of 10 steps: 0-9, 10-19, 20-29, 30-36


def test_recipe_domains_resume_mid_run_is_bit_identical(tmp_path, digits_recipe):
    """A DDK run resumed from a mid-run checkpoint, with the later blocks never recorded (as if killed right after
    the checkpoint), measures those blocks again and ends with exactly the weights and history of the full run."""
    import shutil

    from safetensors.torch import load_file

    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    train, eval_ = _domain_files(tmp_path)
    digits_recipe["data"] = {"train": train, "eval": eval_, "domains": {"every": 2, "eval_records": 30}}
    digits_recipe["trainer"].update(max_steps=8, save_every=3, keep_last=5)
    recipe = validate_recipe(digits_recipe)
    run_recipe(recipe)
    ckpts = recipe.run_dir / "checkpoints"
    full = load_file(str(ckpts / "step-00000008" / "student.safetensors"))
    history = json.loads((recipe.run_dir / "domain_weights.json").read_text())
    for step in (6, 8):
        shutil.rmtree(ckpts / f"step-0000000{step}")
    (recipe.run_dir / "domain_weights.json").write_text(json.dumps(history[:2]))  # blocks 0, 1: up to step 3
    run_recipe(recipe, resume=True)
    resumed = load_file(str(ckpts / "step-00000008" / "student.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert json.loads((recipe.run_dir / "domain_weights.json").read_text()) == history


def test_recipe_domains_user_errors(tmp_path, digits_recipe):
    from conftest import write_yaml

    from potstill.cli import main

    train, eval_ = _domain_files(tmp_path)
    digits_recipe["trainer"]["max_steps"] = 2
    digits_recipe["data"] = {"train": train, "domains": {"every": 1}}
    assert main(["run", str(write_yaml(tmp_path / "a.yaml", digits_recipe))]) == 2  # no data.eval
    digits_recipe["data"] = {"train": train, "eval": {"path": "builtin:digits", "split": "test"},
                             "domains": {"every": 1}}
    assert main(["run", str(write_yaml(tmp_path / "b.yaml", digits_recipe))]) == 2  # eval records lack a domain


def test_recipe_domains_with_two_processes(tmp_path, digits_recipe):
    """DDK blocks under DDP (2 gloo processes): each process measures the perplexities of its own (synchronised)
    student copy and draws the block order; the run completes and records the re-weighted history."""
    import json

    from conftest import accelerate_launch, write_yaml

    train, eval_ = _domain_files(tmp_path)
    digits_recipe["data"] = {"train": train, "eval": eval_, "domains": {"every": 2, "eval_records": 30}}
    digits_recipe["trainer"].update(max_steps=6, batch_size=4)
    proc = accelerate_launch(tmp_path, write_yaml(tmp_path / "ddk2.yaml", digits_recipe), "--cpu", port=29573)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / digits_recipe["name"]
    history = json.loads((run_dir / "domain_weights.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert all(sum(h["weights"].values()) == pytest.approx(1.0) for h in history)
    assert history[1]["weights"] != history[0]["weights"]
    assert (run_dir / "student").exists()
