"""Task adapters: one per kind of model output. The loop knows tasks only through `Task`."""

from __future__ import annotations

from pathlib import Path

import torch

from potstill.config import Recipe
from potstill.tasks.base import Task


def task_class(name: str) -> type[Task]:
    """The task adapter class of `recipe.task` = `name` (its `signal_kind` says what objectives it feeds)."""
    if name == "classification":
        from potstill.tasks.classification import ClassificationTask

        return ClassificationTask
    if name == "causal_lm":
        from potstill.tasks.causal_lm import CausalLMTask

        return CausalLMTask
    if name == "vision":
        from potstill.tasks.vision import VisionTask

        return VisionTask
    if name == "ranking":
        from potstill.tasks.ranking import RankingTask

        return RankingTask
    if name == "image_classification":
        from potstill.tasks.image_classification import ImageClassificationTask

        return ImageClassificationTask
    if name == "masked_lm":
        from potstill.tasks.masked_lm import MaskedLMTask

        return MaskedLMTask
    if name == "seq2seq":
        from potstill.tasks.seq2seq import Seq2SeqTask

        return Seq2SeqTask
    if name == "graph":
        from potstill.tasks.graph import GraphTask

        return GraphTask
    if name == "judge":
        from potstill.tasks.judge import JudgeTask

        return JudgeTask
    if name == "vision_language":
        from potstill.tasks.vision_language import VisionLanguageTask

        return VisionLanguageTask
    if name == "segmentation":
        from potstill.tasks.segmentation import SegmentationTask

        return SegmentationTask
    from potstill.tasks.embedding import EmbeddingTask

    return EmbeddingTask


def build_task(recipe: Recipe, *, run_dir: Path, device: torch.device | str = "cpu") -> Task:
    """The task adapter named by `recipe.task`."""
    return task_class(recipe.task)(recipe, run_dir=run_dir, device=device)


__all__ = ["Task", "build_task", "task_class"]
