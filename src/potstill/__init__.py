"""potstill: distil a large teacher model into a small, fast student.

    import potstill as ps
    loss = ps.forward_kl(student_logits, teacher_logits, temperature=2.0, labels=labels)
    summary = ps.run_recipe(ps.load_recipe("recipes/digits.yaml"))

Loss functions are imported eagerly (torch only); the training stack is imported on first use.
"""

from __future__ import annotations

from typing import Any

from potstill.errors import UserError
from potstill.losses import (
    OBJECTIVES,
    embedding_cosine,
    embedding_mse,
    forward_kl,
    generalized_jsd,
    get_objective,
    listwise_kl,
    margin_mse,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    tvd,
)

__version__ = "0.2.0"

_LAZY = {
    "Distiller": "potstill.train", "Objective": "potstill.train", "TrainingDiverged": "potstill.train",
    "run_recipe": "potstill.train", "build_objectives": "potstill.train",
    "Recipe": "potstill.config", "load_recipe": "potstill.config", "validate_recipe": "potstill.config",
    "build_task": "potstill.tasks", "Task": "potstill.tasks",
    "layers_from_teacher": "potstill.students", "from_config": "potstill.students",
    "save_sentence_transformer": "potstill.students", "save_hf_student": "potstill.students",
    "load_records": "potstill.data", "load_source": "potstill.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'potstill' has no attribute {name!r}")


__all__ = ["OBJECTIVES", "UserError", "embedding_cosine", "embedding_mse", "forward_kl", "generalized_jsd",
           "get_objective", "listwise_kl", "margin_mse", "reverse_kl", "skew_kl", "skew_reverse_kl",
           "soft_cross_entropy", "tvd", *_LAZY]
