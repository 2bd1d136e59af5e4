"""A live teacher: any `torch.nn.Module`, frozen and run without autograd."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from potstill.errors import UserError


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put `model` in eval mode with every parameter's `requires_grad` off."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_outputs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn` under `torch.inference_mode` and return its outputs as they are (no copy).

    Inference tensors cannot be saved for backward; potstill's losses never save the teacher's tensors
    themselves (only values derived from them, or constants kept outside autograd), so the teacher's outputs
    feed them directly. A test runs every objective of the catalogue on an inference-mode teacher.
    """
    with torch.inference_mode():
        return fn(*args, **kwargs)


def load_callable(spec: str, *, field: str) -> Callable[..., Any]:
    """Import `'package.module:function'`; errors name the recipe field."""
    if ":" not in spec:
        raise UserError(f"field {field}: expected 'module:function', got {spec!r}")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"field {field}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"field {field}: module {module_name!r} has no callable {attr!r}")
    return fn
