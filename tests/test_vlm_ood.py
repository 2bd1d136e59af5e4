"""Large-VLM OOD distillation: visual-space imitation (MSE, contrastive), vision–language coherence and the
label-text CE against hand values, the enriched label text, and a run mixing them with a logit objective."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from potstill.config import validate_recipe
from potstill.data.vision_language import class_captions, class_descriptions, thicken_images
from potstill.errors import UserError
from potstill.losses.vlm_ood import (
    coherence,
    label_text_ce,
    visual_contrastive,
    visual_mse,
    vlm_ood_coherence,
    vlm_ood_label_ce,
    vlm_ood_visual_contrastive,
    vlm_ood_visual_mse,
)

torch.set_num_threads(1)
LOG1PE = math.log1p(math.e)  # −log(1 / (1 + e))
LOG1PINV = math.log1p(math.exp(-1))  # −log(e / (e + 1))


def test_visual_mse_hand_value():
    assert visual_mse(torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]])).item() == pytest.approx(0.8)
    s = SimpleNamespace(image=torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    t = SimpleNamespace(image=torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert vlm_ood_visual_mse(s, t).item() == pytest.approx(0.4)
    assert vlm_ood_visual_mse(s, t, mask=torch.tensor([True, False]), reduction="sum").item() == pytest.approx(0.8)


def test_visual_contrastive_hand_values_one_and_both_directions():
    s, v = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.eye(2)  # scores [[1, 0], [1, 0]] at τ = 1
    one = visual_contrastive(s, v, temperature=1.0, bidirectional=False)
    assert one.tolist() == pytest.approx([LOG1PINV, LOG1PE])
    both = visual_contrastive(s, v, temperature=1.0)  # the transposed scores [[1, 1], [0, 0]]: log 2 each
    assert both.tolist() == pytest.approx([0.5 * (LOG1PINV + math.log(2)), 0.5 * (LOG1PE + math.log(2))])
    total = vlm_ood_visual_contrastive(SimpleNamespace(image=s), SimpleNamespace(image=v), temperature=1.0,
                                       reduction="sum")
    assert total.item() == pytest.approx(float(both.sum()))


def test_coherence_hand_values_top_k_and_the_misaligned_filter():
    s, v, text = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.eye(2)
    p_t = 1 / (1 + math.exp(-1))  # softmax([0, 1])[1]
    expected = (1 - p_t) * math.log((1 - p_t) / p_t) + p_t * math.log(p_t / (1 - p_t))
    assert coherence(s, v, text, temperature=1.0).item() == pytest.approx(expected)
    assert coherence(s, v, text, temperature=1.0, top_k=1).item() == pytest.approx(0.0, abs=1e-7)
    student, teacher = SimpleNamespace(image=s), SimpleNamespace(image=v, class_text=text)
    # the teacher classifies the image as 1: with label 0 it is skipped, with label 1 it counts
    assert vlm_ood_coherence(student, teacher, labels=torch.tensor([0]), temperature=1.0,
                             reduction="sum").item() == 0.0
    assert vlm_ood_coherence(student, teacher, labels=torch.tensor([1]), temperature=1.0).item() == pytest.approx(
        expected)
    assert vlm_ood_coherence(student, teacher, labels=torch.tensor([0]), temperature=1.0,
                             filter_misaligned=False).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="top_k"):
        coherence(s, v, text, top_k=0)


def test_label_text_ce_hand_value_and_unlabelled_rows():
    s, text = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.eye(2)
    assert label_text_ce(s[:1], text, torch.tensor([1]), temperature=1.0).item() == pytest.approx(LOG1PE)
    got = vlm_ood_label_ce(SimpleNamespace(image=s), SimpleNamespace(class_text=text), labels=torch.tensor([1, -100]),
                           temperature=1.0, reduction="sum")
    assert got.item() == pytest.approx(LOG1PE)
    with pytest.raises(ValueError, match="labels"):
        vlm_ood_label_ce(SimpleNamespace(image=s), SimpleNamespace(class_text=text))


def test_enriched_label_text_and_the_thickening_shift():
    descriptions = class_descriptions("builtin:digits", 10)
    assert descriptions is not None and all(len(d) == 3 for d in descriptions)
    captions = class_captions(["seven"], ["a photo of the digit {}.", "a {}."], [["a flat top", "a slanted stem"]])
    assert captions == [["a photo of the digit seven, a flat top.", "a photo of the digit seven, a slanted stem.",
                         "a seven, a flat top.", "a seven, a slanted stem."]]
    assert class_descriptions(None, 3) is None
    with pytest.raises(UserError, match="one per class"):
        class_descriptions([["a"], ["b", "c"]], 2)
    with pytest.raises(UserError, match="builtin:digits"):
        class_descriptions("builtin:cars", 2)
    dot = torch.zeros(1, 1, 5, 5, dtype=torch.uint8)
    dot[0, 0, 2, 2] = 255
    thick = thicken_images(dot)
    assert thick[0, 0, 1:4, 1:4].eq(1.0).all() and float(thick.sum()) == 9.0


def test_ood_losses_with_a_logit_objective_through_the_loop(tmp_path):
    from potstill.teachers.vision_language import write_embedding_file
    from potstill.train import run_recipe

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8), y=np.arange(8) % 2)
    gen = torch.Generator().manual_seed(0)
    write_embedding_file(tmp_path / "teacher.npz", torch.randn(8, 4, generator=gen), torch.randn(2, 4, generator=gen))
    raw = {"name": "ood", "task": "vision_language", "output_dir": str(tmp_path / "runs"),
           "teacher": {"embeddings": str(tmp_path / "teacher.npz")},
           "student": {"factory": "potstill.students.vl2v_adip:vl2v_student",
                       "kwargs": {"backbone": "potstill.students.cnn:small_cnn", "feature_dim": 6, "embed_dim": 4,
                                  "backbone_kwargs": {"width": 2, "depth": 1, "num_classes": 6, "image_size": 8},
                                  "stage": "distil"}},
           "data": {"train": str(tmp_path / "train.npz")},
           "vision_language": {"class_names": ["cat", "dog"], "descriptions": [["furry", "small"], ["loyal", "big"]]},
           "objectives": [{"name": n} for n in ("vlm_ood_visual_mse", "vlm_ood_visual_contrastive",
                                                "vlm_ood_coherence", "vlm_ood_label_ce", "taid")],
           "trainer": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "num_threads": 1, "log_every": 1,
                       "hard_label_weight": 0.5},
           "eval": {"compare_before": False, "throughput": False}}
    summary = run_recipe(validate_recipe(raw))
    assert summary["complete"]
    logged = [json.loads(line) for line in (tmp_path / "runs" / "ood" / "metrics.jsonl").read_text().splitlines()]
    terms = {k for rec in logged for k in rec if k.startswith("obj/")}
    assert {"obj/vlm_ood_coherence", "obj/taid", "obj/hard_label"} <= terms
    stored = torch.load(tmp_path / "runs" / "ood" / "student" / "class_text.pt")
    assert stored["descriptions"] == [["furry", "small"], ["loyal", "big"]]
