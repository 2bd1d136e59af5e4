"""Loading teachers from recipe fields (shared by every task); building students lives in
`potstill.students.loading` (re-exported here)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.config import StudentConfig, TeacherConfig
from potstill.errors import UserError, one_line
from potstill.students.loading import BUILTIN_MODELS, build_student, freeze_pooler, resolve_model_path
from potstill.teachers import call_factory, freeze

__all__ = ["BUILTIN_MODELS", "build_student", "freeze_pooler", "load_factory_teacher", "load_hf_teacher",
           "load_ranking_teacher", "load_state_dict", "resolve_model_path", "snapshot"]


def load_hf_teacher(path: str, auto_cls: Any, *, field: str = "teacher.path",
                    tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """Load a frozen Hugging Face teacher and its tokenizer (None when `tokenizer` is False, e.g. images)
    from a local folder, `builtin:<name>`, or a Hugging Face id read through the HF cache (`potstill.hub`)."""
    from transformers import AutoTokenizer

    given, path = path, resolve_model_path(path, field=field)
    try:
        model, info = auto_cls.from_pretrained(path, output_loading_info=True)
        loaded = AutoTokenizer.from_pretrained(path) if tokenizer else None
    except (OSError, ValueError) as exc:
        raise UserError(f"field {field}: cannot load a model from {path}: {exc}") from None
    warn_fresh_weights(sorted(info.get("missing_keys") or ()), given, field=field)
    return freeze(model), loaded


def warn_fresh_weights(missing: list[str], path: str, *, field: str) -> None:
    """One warning line when the teacher has weights its checkpoint lacks (transformers initialised them at random,
    e.g. a classifier head on a plain encoder): such a teacher's outputs are noise, and the CLI silences
    transformers' own report. A warning, not an error: a teacher is sometimes loaded only for its encoder."""
    if not missing:
        return
    from potstill.ui import console

    shown = ", ".join(missing[:4]) + (f", ... ({len(missing)} in all)" if len(missing) > 4 else "")
    console.print(f"warning: field {field}: {path} lacks weights the model needs ({shown}); they were freshly "
                  f"initialised at random, so the teacher's outputs there are noise; give a teacher fine-tuned for "
                  f"the task (e.g. saved with save_pretrained after fine-tuning)", highlight=False, markup=False,
                  soft_wrap=True)


def load_ranking_teacher(path: str | None, teacher_type: str, student: StudentConfig,
                         device: torch.device) -> tuple[nn.Module | None, Any, str]:
    """A ranking teacher on `device`, its tokenizer and its kind: a cross-encoder (a sequence classifier with one
    logit) or a bi-encoder (an encoder); `teacher_type` "auto" reads the folder's config architecture. Without
    a teacher `path` (scores only from ranking.teacher_scores): no model, the pretrained `student`'s tokenizer,
    kind "scores"."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from potstill.students.ranking import is_cross_encoder_folder

    if path is None:
        if student.init != "pretrained":
            raise UserError(f"field student.init: {student.init} builds the student from the teacher model, but the "
                            f"recipe gives only ranking.teacher_scores; use init: pretrained with student.path, or "
                            f"give teacher.path too")
        return None, AutoTokenizer.from_pretrained(resolve_model_path(student.path, field="student.path")), "scores"
    path = resolve_model_path(path, field="teacher.path")
    if teacher_type == "auto":
        teacher_type = "cross_encoder" if is_cross_encoder_folder(path) else "bi_encoder"
    teacher_cls = AutoModelForSequenceClassification if teacher_type == "cross_encoder" else AutoModel
    teacher, tokenizer = load_hf_teacher(path, teacher_cls)
    if teacher_type == "cross_encoder" and teacher.config.num_labels != 1:
        raise UserError(f"field teacher.path: a cross-encoder teacher must have one output logit "
                        f"(num_labels=1); {path} has {teacher.config.num_labels}")
    return teacher.to(device), tokenizer, teacher_type


def load_factory_teacher(cfg: TeacherConfig) -> nn.Module:
    model = call_factory(cfg.factory, cfg.kwargs, field="teacher.factory")
    if not isinstance(model, nn.Module):
        raise UserError(f"field teacher.factory: {cfg.factory} returned {type(model).__name__}, "
                        f"expected a torch.nn.Module")
    if cfg.weights:
        try:
            model.load_state_dict(load_state_dict(cfg.weights, field="teacher.weights"))
        except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
            raise UserError(f"field teacher.weights: {cfg.weights} does not fit {cfg.factory}'s module: "
                            f"{one_line(str(exc), 400)}") from None
    return freeze(model)


def load_state_dict(path: str, *, field: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file; a missing, truncated or corrupt file is a UserError."""
    if not Path(path).is_file():
        raise UserError(f"field {field}: weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle, zipfile and torch each raise their own type for a bad file
        raise UserError(f"field {field}: {path} is not a readable state dict ({type(exc).__name__}: "
                        f"{one_line(str(exc), 200)})") from None
    if not isinstance(state, dict):
        raise UserError(f"field {field}: {path} holds a {type(state).__name__}, expected a state dict")
    return state


def snapshot(model: nn.Module) -> nn.Module:
    """A frozen deep copy (used to score the untrained student while the real one trains)."""
    return freeze(copy.deepcopy(model))
