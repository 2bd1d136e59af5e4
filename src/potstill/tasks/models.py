"""Loading teachers from recipe fields (shared by every task); building students lives in
`potstill.students.loading` (re-exported here)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.config import TeacherConfig
from potstill.errors import UserError
from potstill.students.loading import BUILTIN_MODELS, build_student, freeze_pooler, resolve_model_path
from potstill.teachers import freeze, load_callable

__all__ = ["BUILTIN_MODELS", "build_student", "freeze_pooler", "load_factory_teacher", "load_hf_teacher",
           "load_state_dict", "resolve_model_path", "snapshot"]


def load_hf_teacher(path: str, auto_cls: Any, *, field: str = "teacher.path",
                    tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """Load a frozen Hugging Face teacher and its tokenizer (None when `tokenizer` is False, e.g. images)
    from a local folder (offline)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(path, field=field)
    if not Path(path).exists():
        raise UserError(f"field {field}: model folder not found: {path} (models are not downloaded; give a "
                        f"local folder saved with save_pretrained, or one of "
                        f"{', '.join('builtin:' + k for k in BUILTIN_MODELS)})")
    try:
        model = auto_cls.from_pretrained(path)
        loaded = AutoTokenizer.from_pretrained(path) if tokenizer else None
    except (OSError, ValueError) as exc:
        raise UserError(f"field {field}: cannot load a model from {path}: {exc}") from None
    return freeze(model), loaded


def load_factory_teacher(cfg: TeacherConfig) -> nn.Module:
    model = load_callable(cfg.factory, field="teacher.factory")(**cfg.kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"field teacher.factory: {cfg.factory} returned {type(model).__name__}, "
                        f"expected a torch.nn.Module")
    if cfg.weights:
        model.load_state_dict(load_state_dict(cfg.weights, field="teacher.weights"))
    return freeze(model)


def load_state_dict(path: str, *, field: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise UserError(f"field {field}: weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def snapshot(model: nn.Module) -> nn.Module:
    """A frozen deep copy (used to score the untrained student while the real one trains)."""
    return freeze(copy.deepcopy(model))
