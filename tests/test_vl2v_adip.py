"""VL2V-ADiP: the align/distil loss against hand values, its two-stage student, and both stages through the loop
on the vision_language task with a black-box teacher file (tiny config-built backbone)."""

from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.losses import get_objective
from potstill.losses.vl2v_adip import vl2v_adip, vl2v_adip_loss
from potstill.students.vl2v_adip import vl2v_student
from potstill.tasks import build_task
from potstill.teachers.vision_language import write_embedding_file

torch.set_num_threads(1)
BACKBONE = {"backbone": "potstill.students.cnn:small_cnn",
            "backbone_kwargs": {"width": 2, "depth": 1, "num_classes": 6, "image_size": 8}, "feature_dim": 6}


def test_loss_is_minus_one_when_p_equals_both_targets():
    p = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # any length: p is normalised
    unit = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert vl2v_adip_loss(p, unit, unit).item() == pytest.approx(-1.0)


def test_loss_hand_values_lambda_and_the_label_mixed_form():
    p, img = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    txt = torch.tensor([[1.0, 1.0]])  # cos(p, txt) = 1/√2, cos(p, img) = 0
    assert vl2v_adip_loss(p, img, txt, lam=0.5).item() == pytest.approx(-0.5 / math.sqrt(2))
    assert vl2v_adip_loss(p, img, txt, lam=1.0).item() == pytest.approx(0.0, abs=1e-7)
    # CutMix: 25 % of the image is class a (cos 1), 75 % class b (cos 0): text term 0.25
    mixed = vl2v_adip_loss(p, p, p, text_targets_b=img, mix=0.25, lam=0.5)
    assert mixed.item() == pytest.approx(-0.5 - 0.5 * 0.25)
    with pytest.raises(ValueError, match="lam"):
        vl2v_adip_loss(p, img, txt, lam=1.5)


def test_objective_form_reads_signals_and_labels_skipping_unlabelled_rows():
    student = SimpleNamespace(image=torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    teacher = SimpleNamespace(image=torch.tensor([[0.0, 1.0], [0.0, 1.0]]), class_text=torch.eye(2))
    labels = torch.tensor([0, -100])
    # row 0: −0.5·cos(p, e_img) − 0.5·cos(p, t_0) = −0.5·0 − 0.5·1; row 1 not counted
    assert vl2v_adip(student, teacher, labels=labels, reduction="sum").item() == pytest.approx(-0.5)
    assert vl2v_adip(student, teacher, labels=torch.tensor([0, 1])).item() == pytest.approx((-0.5 - 1.0) / 2)
    with pytest.raises(ValueError, match="labels"):
        vl2v_adip(student, teacher)
    info = get_objective("vl2v_adip")
    assert info.kind == "vision_language" and info.defaults == {"lam": 0.5, "reduction": "mean"}


def test_student_stages_train_only_their_part():
    align = vl2v_student(**BACKBONE, embed_dim=4, stage="align")
    assert {n for n, p in align.named_parameters() if p.requires_grad} == {"projection.weight", "projection.bias"}
    align.train()
    assert not align.backbone.training and align.projection.training
    distil = vl2v_student(**BACKBONE, embed_dim=4, stage="distil")
    assert not any(p.requires_grad for p in distil.projection.parameters())
    assert all(p.requires_grad for p in distil.backbone.parameters())
    assert align(torch.rand(3, 1, 8, 8)).shape == (3, 4)
    assert all(p.requires_grad for p in vl2v_student(**BACKBONE, embed_dim=4, stage="full").parameters())
    with pytest.raises(UserError, match="stage"):
        vl2v_student(**BACKBONE, embed_dim=4, stage="predict")


def adip_recipe(tmp_path, stage: str, **student: object) -> dict:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), y=np.arange(12) % 2)
    np.savez(tmp_path / "eval.npz", x=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), y=np.arange(6) % 2)
    gen = torch.Generator().manual_seed(0)
    write_embedding_file(tmp_path / "teacher.npz", torch.randn(12, 4, generator=gen), torch.randn(2, 4, generator=gen),
                         eval_image_embeddings=torch.randn(6, 4, generator=gen))
    return {"name": f"adip-{stage}", "task": "vision_language", "output_dir": str(tmp_path / "runs"),
            "teacher": {"embeddings": str(tmp_path / "teacher.npz")},
            "student": {"factory": "potstill.students.vl2v_adip:vl2v_student",
                        "kwargs": {**BACKBONE, "embed_dim": 4, "stage": stage, **student}},
            "data": {"train": str(tmp_path / "train.npz"), "eval": str(tmp_path / "eval.npz")},
            "vision_language": {"class_names": ["cat", "dog"], "templates": ["a photo of a {}."]},
            "objectives": [{"name": "vl2v_adip", "params": {"lam": 0.5}}, {"name": "forward_kl", "weight": 0.5}],
            "trainer": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "num_threads": 1, "log_every": 1},
            "eval": {"compare_before": False, "throughput": False}}


def test_two_stages_through_the_loop_align_then_distil(tmp_path):
    from potstill.students.save import load_factory_student
    from potstill.train import run_recipe

    raw = adip_recipe(tmp_path, "align")
    task = build_task(validate_recipe(raw), run_dir=tmp_path / "probe")
    task.setup()
    batch = task.collate(task.train_records[:3], [0, 1, 2])
    signal = task.teacher_signal(batch)
    assert torch.allclose(signal.image, task.embedding_file.image_embeddings[:3])
    assert torch.allclose(signal.logits, 100.0 * signal.image @ task.class_text.T, atol=1e-4)
    start = {k: v.clone() for k, v in task.student.state_dict().items()}
    assert run_recipe(validate_recipe(raw))["complete"]
    aligned = load_factory_student(tmp_path / "runs" / "adip-align" / "student")
    assert not torch.equal(aligned.projection.weight, start["projection.weight"])
    for k, v in aligned.backbone.state_dict().items():
        assert torch.equal(v, start["backbone." + k]), k
    folder = str(tmp_path / "runs" / "adip-align" / "student")
    summary = run_recipe(validate_recipe(adip_recipe(tmp_path, "distil", init_from=folder)))
    assert summary["complete"] and "accuracy" in summary["table"][-1]
    shutil.rmtree(folder)  # the saved stage-2 student does not need the stage-1 folder any more
    distilled = load_factory_student(tmp_path / "runs" / "adip-distil" / "student")
    assert torch.equal(distilled.projection.weight, aligned.projection.weight)
    assert not torch.equal(distilled.backbone.state_dict()["0.weight"], aligned.backbone.state_dict()["0.weight"])


def test_unlabelled_images_and_a_wrong_init_folder_are_refused(tmp_path):
    raw = adip_recipe(tmp_path, "align")
    raw["data"]["train"] = {"path": raw["data"]["train"], "drop_labels": True}
    with pytest.raises(UserError, match="vl2v_adip needs labelled"):
        build_task(validate_recipe(raw), run_dir=tmp_path / "a").setup()
    with pytest.raises(UserError, match="init_from"):
        vl2v_student(**BACKBONE, embed_dim=4, init_from=str(tmp_path))


def test_packaged_recipes_load():
    from potstill.config import load_recipe
    from potstill.recipes import packaged_recipe

    align, distil = (load_recipe(packaged_recipe(f"mnist-vl2v-{s}")) for s in ("align", "distil"))
    assert align.student.kwargs["stage"] == "align" and distil.student.kwargs["stage"] == "distil"
    assert distil.student.kwargs["init_from"] == "runs/mnist-vl2v-align/student"
    ood = load_recipe(packaged_recipe("mnist-vlm-ood"))
    assert {o.name for o in ood.objectives} == {"vlm_ood_label_ce", "vlm_ood_coherence", "vlm_ood_visual_mse",
                                                "vlm_ood_visual_contrastive"}
    assert ood.vision_language.descriptions == "builtin:digits"
