"""SSLD: the Jensen-Shannon loss against a hand value, the pool selection per class, de-duplication, the task."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from test_image_classification import tiny_images, tiny_recipe

from potstill.config import validate_recipe
from potstill.data.ssld import duplicates_of, ssld_select
from potstill.losses import js_divergence
from potstill.tasks import build_task

torch.set_num_threads(1)


def test_js_divergence_hand_value():
    # p_s = softmax(0, log 3) = (1/4, 3/4), p_t = (1/2, 1/2), m = (3/8, 5/8)
    student = torch.tensor([[0.0, math.log(3.0)]])
    teacher = torch.zeros(1, 2)
    kl_t = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    kl_s = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    expected = 0.5 * kl_t + 0.5 * kl_s  # ≈ 0.0338
    value = js_divergence(student, teacher)
    assert value.dtype == torch.float32 and abs(float(value) - expected) < 1e-6
    assert abs(float(js_divergence(teacher, student)) - expected) < 1e-6  # symmetric
    far = js_divergence(torch.tensor([[60.0, -60.0]]), torch.tensor([[-60.0, 60.0]]))
    assert float(far) <= math.log(2) + 1e-6 and float(far) > 0.69  # bounded by log 2, reached when disjoint
    assert float(js_divergence(teacher, teacher)) == 0.0


def test_selection_keeps_the_most_confident_per_teacher_class():
    probs = torch.tensor([[0.90, 0.10],   # class 0, 0.90
                          [0.60, 0.40],   # class 0, 0.60
                          [0.95, 0.05],   # class 0, 0.95
                          [0.20, 0.80],   # class 1, 0.80
                          [0.30, 0.70],   # class 1, 0.70
                          [0.90, 0.10]])  # class 0, 0.90 (ties row 0: the earlier row wins)
    pick = ssld_select(probs, per_class=2)
    assert pick.indices == [0, 2, 3, 4] and pick.per_class == {0: 2, 1: 2}
    pick = ssld_select(probs, per_class=2, exclude=torch.tensor([False, False, True, False, False, False]),
                       min_confidence=0.75)
    assert pick.indices == [0, 3, 5] and pick.per_class == {0: 2, 1: 1}
    assert pick.duplicates == 1 and pick.below_confidence == 2  # rows 1 (0.60) and 4 (0.70)
    assert json.loads(json.dumps(pick.as_json()))["kept"] == 3


def test_duplicates_are_exact_byte_matches():
    pool = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    pool[1, 0, 0, 0] = 7
    pool[2, 0, 1, 1] = 1
    reference = torch.stack([pool[1], torch.ones(1, 2, 2, dtype=torch.uint8)])
    assert duplicates_of(pool, reference).tolist() == [False, True, False]
    assert duplicates_of(pool, reference[:0]).tolist() == [False, False, False]


def test_the_task_adds_the_picked_pool_without_labels_and_skips_eval_copies(tmp_path):
    pool, _ = tiny_images(30, seed=5)
    eval_x, eval_y = tiny_images(16, seed=1)
    pool[:4] = eval_x[:4]  # four test images leaked into the pool
    np.savez(tmp_path / "pool.npz", x=pool)
    raw = tiny_recipe(tmp_path, ssld={"pool": str(tmp_path / "pool.npz"), "per_class": 5})
    raw["objectives"] = [{"name": "js_divergence"}]
    task = build_task(validate_recipe(raw), run_dir=tmp_path / "run")
    task.setup()
    chosen = json.loads((tmp_path / "run" / "ssld_selection.json").read_text())
    assert chosen["duplicates_of_eval"] == 4 and not set(chosen["indices"]) & {0, 1, 2, 3}
    assert chosen["kept"] == sum(chosen["per_class"].values()) <= 10
    assert len(task.train_records) == 40 + chosen["kept"]
    assert (task.train_set.labels[40:] == -100).all() and (task.train_set.labels[:40] >= 0).all()
    assert torch.equal(task.train_set.images[40:], torch.as_tensor(pool[chosen["indices"]]).unsqueeze(1))
    # an unlabelled batch has no label term; the pool's teacher logits are cached with the training ones
    batch = task.collate([task.train_records[-1]], [len(task.train_records) - 1])
    assert "labels" not in batch
    assert float(task.hard_label_loss(task.student_signal(task.student, batch), batch).detach()) == 0.0
    assert task._teacher_logits.shape == (40 + chosen["kept"], 2)
