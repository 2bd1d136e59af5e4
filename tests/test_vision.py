"""The vision task: DMAE-style distillation of masked-autoencoder ViTs on the digits."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import REPO

from potstill.config import load_recipe, validate_recipe
from potstill.errors import UserError
from potstill.examples.digits_vit import mae
from potstill.tasks import build_task
from potstill.tasks.internals import Capture
from potstill.train import Distiller, build_objectives, run_recipe

torch.set_num_threads(1)


def _raw(tmp_path, **trainer):
    raw = yaml.safe_load((REPO / "recipes" / "digits-dmae.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "runs")
    raw["teacher"]["kwargs"] = {"hidden": 32, "layers": 4, "steps": 40}
    raw["data"]["train"]["limit"] = 256
    raw["data"]["eval"]["limit"] = 128
    raw["trainer"] = {"max_steps": 8, "batch_size": 32, "lr": 2e-3, "hard_label_weight": 1.0, "log_every": 1,
                      "num_threads": 1, **trainer}
    raw["eval"] = {"compare_before": True, "batch_size": 128, "throughput": False}
    return raw


def test_capture_can_stop_the_forward_after_a_layer():
    model = mae(hidden=16, layers=4, heads=2).vit.eval()
    ran = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, a, o: ran.append(m))
    x, noise = torch.rand(2, 1, 8, 8), torch.rand(2, 16)
    from potstill.tasks.internals import run_with_internals

    signals = run_with_internals(lambda m, b: m(pixel_values=b, noise=noise), model,
                                 {"hidden": True, "stop_after": 1}, None, model, x)
    assert signals.main is None and len(ran) == 2  # blocks 0 and 1 only
    assert signals.hidden_states[2] is not None and signals.hidden_states[3] is None
    assert signals.token_mask.shape == (2, 5) and signals.token_mask.all()  # CLS + 4 visible patches
    with torch.no_grad(), Capture(model, hidden=True) as cap:
        full = model(pixel_values=x, noise=noise)
    torch.testing.assert_close(cap.hidden_states[2], signals.hidden_states[2])
    assert full.last_hidden_state.shape == (2, 5, 16)


def test_teacher_sees_the_students_visible_patches_and_stops_at_the_aligned_block(tmp_path):
    recipe = validate_recipe(_raw(tmp_path))
    task = build_task(recipe, run_dir=recipe.run_dir)
    distiller = Distiller(task, build_objectives(recipe), recipe.trainer, run_dir=recipe.run_dir,
                          eval_config=recipe.eval)
    task.setup()
    distiller._bind_objectives()
    assert task.internal_needs("teacher")["stop_after"] == 2
    batch = task.prepare_batch(task.collate(task.train_records[:4], [0, 1, 2, 3]), task.student, 0)
    assert float(batch["pixel_values"].max()) <= 1.0
    again = task.prepare_batch(task.collate(task.train_records[:4], [0, 1, 2, 3]), task.student, 0)
    assert torch.equal(batch["noise"], again["noise"])  # the same micro-batch masks the same patches
    teacher, student = task.teacher_signal(batch), task.student_signal(task.student, batch)
    assert teacher.main is None and teacher.hidden_states[4] is None  # blocks 3 and 4 never ran
    assert student.main.loss.ndim == 0 and student.hidden_states[2].shape == (4, 5, 32)
    assert teacher.hidden_states[3].shape == (4, 5, 32)
    # same visible patches: the teacher's block input equals its embedding of the student's kept patches
    enc = task.teacher.vit
    with torch.no_grad():
        emb, _, _ = enc.embeddings(batch["pixel_values"], noise=batch["noise"])
    torch.testing.assert_close(teacher.hidden_states[0], emb)


def test_dmae_run_trains_reports_and_saves(tmp_path):
    from transformers import ViTMAEForPreTraining

    recipe = validate_recipe(_raw(tmp_path))
    summary = run_recipe(recipe)
    teacher, before, after = summary["table"]
    assert "probe_accuracy" in teacher and "reconstruction_mse" not in teacher
    assert {"probe_accuracy", "reconstruction_mse"} <= set(after)
    assert after["reconstruction_mse"] < before["reconstruction_mse"]
    steps = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    aligned = [x["obj/dmae_align"] for x in steps if "obj/dmae_align" in x]
    assert aligned[-1] < aligned[0]
    student = ViTMAEForPreTraining.from_pretrained(recipe.run_dir / "student")
    assert student.config.num_hidden_layers == 2


def test_vision_errors(tmp_path):
    raw = _raw(tmp_path)
    with pytest.raises(UserError, match="the vision task distils features"):
        run_recipe(validate_recipe({**raw, "objectives": [{"name": "forward_kl"}]}))
    bad = {**raw, "student": {"init": "factory", "factory": "potstill.examples.digits:mlp"}}
    with pytest.raises(UserError, match="trains a masked autoencoder"):
        run_recipe(validate_recipe(bad))
    with pytest.raises(UserError, match="needs `pixels`"):
        run_recipe(validate_recipe({**raw, "data": {"train": {"path": "builtin:lee"}}}))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"pixels": [0.5] * 60, "label": 1}) + "\n")
    with pytest.raises(UserError, match=r"record 0: 60 pixel values, but the student takes 1×8×8 = 64"):
        run_recipe(validate_recipe({**raw, "data": {"train": str(wrong)}}))


def test_packaged_recipe_loads():
    recipe = load_recipe(REPO / "recipes" / "digits-dmae.yaml")
    assert recipe.task == "vision" and recipe.objectives[0].name == "dmae_align"
