"""The segmentation task (LAD through `potstill run`): recipe errors, the teacher built and loaded back, a short
run that beats the untrained student, the teacher's label noise as a pure function of (seed, micro-batch), mIoU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from potstill.config import validate_recipe
from potstill.data.segmentation import load_segmentation_source
from potstill.data.shapes import ShapesConfig, make_shapes
from potstill.errors import UserError
from potstill.eval.segmentation import mean_iou, segmentation_metrics
from potstill.tasks import build_task
from potstill.tasks.segmentation import SegmentationTask
from potstill.teachers.lad import LabelAssistedTeacher, SegmentationNet, load_lad_teacher
from potstill.teachers.lad import main as build_teacher

torch.set_num_threads(1)
NET = "potstill.teachers.lad:segmentation_net"


def recipe(tmp_path, teacher_folder: str, **changes) -> dict:
    raw = {"name": "seg", "task": "segmentation", "output_dir": str(tmp_path / "runs"), "seed": 0,
           "teacher": {"factory": "potstill.teachers.lad:load_lad_teacher", "kwargs": {"folder": teacher_folder}},
           "student": {"init": "factory", "factory": NET, "kwargs": {"width": 3, "seed": 100}},
           "data": {"train": {"path": "builtin:shapes", "limit": 48}, "eval": {"path": "builtin:shapes", "limit": 16},
                    "shifted": {"path": "builtin:shapes", "split": "shifted", "limit": 16}, "shapes": {"size": 16,
                                                                                                     "max_radius": 5}},
           "objectives": [{"name": "forward_kl", "params": {"scale_t2": True}}],
           "trainer": {"max_steps": 30, "batch_size": 16, "lr": 1e-2, "weight_decay": 0.0, "schedule": "constant",
                       "hard_label_weight": 1.0, "num_threads": 1, "log_every": 10},
           "eval": {"throughput": False}}
    raw.update(changes)
    return raw


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("lad") / "teacher"
    assert build_teacher(["--out", str(folder), "--train", "16", "--epochs", "1", "--width", "2",
                          "--seed", "3"]) == 0
    return str(folder)


def test_recipe_errors_are_one_line_naming_the_field(tmp_path):
    good = recipe(tmp_path, "t")
    assert validate_recipe(good).data.shapes.size == 16
    cases = [
        ({"teacher": {"path": "some/model"}}, "teacher.factory"),
        ({"student": {"init": "layers_from_teacher", "layers": [0]}}, "student.init"),
        ({"data": {**good["data"], "shapes": {"min_radius": 6, "max_radius": 5}}}, "data.shapes"),
        ({"data": {**good["data"], "train": {"path": "x.npz", "split": "train"}}}, "data.train"),
        ({"data": {**good["data"], "train": {"path": "builtin:shapes", "split": "valid"}}}, "data.train.split"),
        ({"teacher": {**good["teacher"], "label_noise": {"p": 1.5}}}, "teacher.label_noise.p"),
        ({"data": {**good["data"], "pooling": "cls"}}, "data.pooling"),
    ]
    for change, field in cases:
        with pytest.raises(UserError) as err:
            validate_recipe({**good, **change})
        message = str(err.value)
        assert field in message and "\n" not in message.strip(), message


def test_teacher_build_and_load_round_trip(teacher_folder, tmp_path):
    teacher = load_lad_teacher(teacher_folder)
    assert isinstance(teacher, LabelAssistedTeacher) and not teacher.training
    saved = load_file(f"{teacher_folder}/model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in teacher.state_dict().items())
    spec = json.loads(open(f"{teacher_folder}/lad_teacher.json").read())
    assert spec["kind"] == "label-assisted" and spec["training"]["p"] == 0.5 and spec["data"]["seed"] == 3
    image_folder = tmp_path / "image"
    assert build_teacher(["--out", str(image_folder), "--kind", "image-only", "--train", "8", "--epochs", "1",
                          "--width", "2"]) == 0
    image_teacher = load_lad_teacher(str(image_folder))
    assert isinstance(image_teacher, SegmentationNet) and not getattr(image_teacher, "reads_labels", False)
    with pytest.raises(UserError, match="teacher.kwargs.folder: .* is not a LAD teacher folder"):
        load_lad_teacher(str(tmp_path / "missing"))
    # an image-only teacher is fed the images alone: no noised mask in its batches
    task = build_task(validate_recipe(recipe(tmp_path, str(image_folder))), run_dir=tmp_path / "run")
    task.setup()
    batch = task.collate([task.train_records[0]], [0])
    assert not task.reads_labels and "teacher_labels" not in task.prepare_batch(batch, task.student, 0)
    assert torch.equal(task.teacher_signal(batch), image_teacher(batch["pixels"]).permute(0, 2, 3, 1).reshape(-1, 3))


def test_noise_draw_is_a_pure_function_of_seed_and_micro_batch(teacher_folder, tmp_path):
    task = build_task(validate_recipe(recipe(tmp_path, teacher_folder)), run_dir=tmp_path / "a")
    task.setup()
    assert task.reads_labels
    batch = task.collate([task.train_records[i] for i in range(8)], list(range(8)))
    first = task.prepare_batch(batch, task.student, micro_batch=5)["teacher_labels"]
    again = task.prepare_batch(batch, task.student, micro_batch=5)["teacher_labels"]
    other_batch = task.prepare_batch(batch, task.student, micro_batch=6)["teacher_labels"]
    assert torch.equal(first, again) and not torch.equal(first, other_batch)
    changed = float((first != batch["masks"]).float().mean())
    assert 0.2 < changed < 0.45  # about p·(C−1)/C = 1/3 of the pixels
    fresh = build_task(validate_recipe(recipe(tmp_path, teacher_folder)), run_dir=tmp_path / "b")
    fresh.setup()  # a resumed run: a new task object, the same draws
    assert torch.equal(fresh.prepare_batch(batch, fresh.student, micro_batch=5)["teacher_labels"], first)
    reseeded = build_task(validate_recipe(recipe(tmp_path, teacher_folder, seed=1)), run_dir=tmp_path / "c")
    reseeded.setup()
    assert not torch.equal(reseeded.noised_labels(batch["masks"], 5), first)
    # one row per pixel, in the order of the flattened mask
    rows = task.teacher_signal(batch | {"teacher_labels": first})
    assert rows.shape == (8 * 16 * 16, 3)
    logits = task.teacher(batch["pixels"], first)
    assert torch.equal(rows[16 * 16 + 5], logits[1, :, 0, 5])


def test_short_run_beats_the_untrained_student_and_reloads(teacher_folder, tmp_path):
    from potstill.evaluate import evaluate_run
    from potstill.train import run_recipe

    summary = run_recipe(validate_recipe(recipe(tmp_path, teacher_folder)))
    rows = {row["model"]: row for row in summary["table"]}
    before, after = rows["student (before)"], rows["student (after)"]
    assert after["miou"] > before["miou"] + 0.1 and after["pixel_accuracy"] > before["pixel_accuracy"]
    assert set(after) - {"model", "params"} == set(SegmentationTask.metric_names)
    run = tmp_path / "runs" / "seg"
    reloaded = {row["model"]: row for row in evaluate_run(run)}
    assert reloaded["student"]["miou"] == pytest.approx(after["miou"])
    assert reloaded["teacher"]["miou"] == pytest.approx(rows["teacher"]["miou"])


def test_mean_iou_and_agreement_hand_values():
    target = torch.tensor([[0, 0, 1], [2, 2, 0]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    # class 0: TP 2, FP 1, FN 1 → 2/4; class 1: TP 1, FP 1 → 1/2; class 2: TP 1, FN 1 → 1/2
    assert mean_iou(pred, target, 3) == pytest.approx(0.5)
    # a class seen nowhere counts 0: the mean over 4 classes
    assert mean_iou(pred, target, 4) == pytest.approx(1.5 / 4)
    teacher = torch.tensor([[0, 1, 1], [2, 2, 2]])
    metrics = segmentation_metrics(pred, target, 3, teacher_pred=teacher)
    assert metrics["pixel_accuracy"] == pytest.approx(4 / 6) and metrics["agreement"] == pytest.approx(4 / 6)


def test_sources_builtin_shapes_and_npz(tmp_path):
    shapes = ShapesConfig(size=16, max_radius=5)
    test = load_segmentation_source("builtin:shapes", split="test", limit=4, shapes=shapes, seed=2, where="data.eval")
    images, masks = make_shapes(4, 1_002, shapes)  # the test draw: seed + 1000
    assert torch.equal(test.images, images) and torch.equal(test.masks, masks)
    np.savez(tmp_path / "pairs.npz", x=np.full((3, 4, 4), 255, np.uint8), y=np.ones((3, 4, 4), np.int64))
    pairs = load_segmentation_source(str(tmp_path / "pairs.npz"), split="train", limit=2, shapes=shapes, seed=0,
                                     where="data.train")
    assert pairs.images.shape == (2, 1, 4, 4) and float(pairs.images.max()) == 1.0 and pairs.masks.dtype == torch.long
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 4, 4)), y=np.zeros((3, 4, 5), np.int64))
    with pytest.raises(UserError, match=r"data.train.path \(.*bad.npz\): masks of shape \(3, 4, 5\)"):
        load_segmentation_source(str(tmp_path / "bad.npz"), split="train", limit=None, shapes=shapes, seed=0,
                                 where="data.train")
    with pytest.raises(UserError, match="data.eval.path: file not found"):
        load_segmentation_source(str(tmp_path / "none.npz"), split="test", limit=None, shapes=shapes, seed=0,
                                 where="data.eval")
