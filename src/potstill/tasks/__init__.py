"""Task adapters: one per kind of model output. The loop knows tasks only through `Task`."""

from __future__ import annotations

from pathlib import Path

import torch

from potstill.config import Recipe
from potstill.tasks.base import Task


def build_task(recipe: Recipe, *, run_dir: Path, device: torch.device | str = "cpu") -> Task:
    """The task adapter named by `recipe.task`."""
    if recipe.task == "classification":
        from potstill.tasks.classification import ClassificationTask

        return ClassificationTask(recipe, run_dir=run_dir, device=device)
    if recipe.task == "causal_lm":
        from potstill.tasks.causal_lm import CausalLMTask

        return CausalLMTask(recipe, run_dir=run_dir, device=device)
    if recipe.task == "vision":
        from potstill.tasks.vision import VisionTask

        return VisionTask(recipe, run_dir=run_dir, device=device)
    if recipe.task == "ranking":
        from potstill.tasks.ranking import RankingTask

        return RankingTask(recipe, run_dir=run_dir, device=device)
    if recipe.task == "seq2seq":
        from potstill.tasks.seq2seq import Seq2SeqTask

        return Seq2SeqTask(recipe, run_dir=run_dir, device=device)
    from potstill.tasks.embedding import EmbeddingTask

    return EmbeddingTask(recipe, run_dir=run_dir, device=device)


__all__ = ["Task", "build_task"]
