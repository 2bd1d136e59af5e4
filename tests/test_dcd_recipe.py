"""DCD on `task: vision_language`: the `dcd_logits` objective and the scorer student through the loop, on a
black-box teacher file and tiny images; and the packaged recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from potstill.config import load_recipe, validate_recipe
from potstill.data.digit_styles import STYLE_TEMPLATES, style_class_names

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def test_dcd_objective_and_scorer_student_train_through_the_loop(tmp_path):
    from potstill.teachers.vision_language import write_embedding_file
    from potstill.train import run_recipe

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), y=np.arange(12) % 4)
    np.savez(tmp_path / "eval.npz", x=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8), y=np.arange(8) % 4)
    gen = torch.Generator().manual_seed(0)
    write_embedding_file(tmp_path / "teacher.npz", torch.randn(12, 4, generator=gen), torch.randn(4, 4, generator=gen),
                         eval_image_embeddings=torch.randn(8, 4, generator=gen), logit_scale=20.0)
    raw = {"name": "dcd", "task": "vision_language", "output_dir": str(tmp_path / "runs"),
           "teacher": {"embeddings": str(tmp_path / "teacher.npz")},
           "student": {"factory": "potstill.students.image_text_scorer:image_text_scorer",
                       "kwargs": {"embed_dim": 4, "text_dim": 4, "width": 2, "hidden": 8, "image_size": 8}},
           "data": {"train": str(tmp_path / "train.npz"), "eval": str(tmp_path / "eval.npz")},
           "vision_language": {"class_names": ["a", "b", "c", "d"]},
           "objectives": [{"name": "dcd_logits", "params": {"negatives": 2}}],
           "trainer": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "num_threads": 1, "log_every": 1},
           "eval": {"compare_before": False, "throughput": False}}
    summary = run_recipe(validate_recipe(raw))
    assert summary["complete"]
    assert {"accuracy", "i2t_r@1", "t2i_r@5"} <= set(summary["table"][-1])


def test_packaged_recipe_lists_the_style_classes():
    recipe = load_recipe(REPO / "recipes" / "mnist-dcd.yaml")
    assert recipe.task == "vision_language" and recipe.objectives[0].name == "dcd_logits"
    assert recipe.vision_language.class_names == style_class_names()
    assert recipe.vision_language.templates == list(STYLE_TEMPLATES)
