"""Logit objectives on `VisionLanguageSignal`s: when a vision_language recipe mixes objectives that read
embeddings (VL2V-ADiP, the large-VLM OOD losses) with logit objectives (forward_kl, TAID, ...), both signals carry
the logits, the image vectors and the class text, and `on_logits` points a logit objective at the logits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class LogitsOf(nn.Module):
    """A stateful logit objective (an `nn.Module`: TAID, DAC-KL) called on the `logits` of both signals; its
    state, step hook and logged values are the inner objective's."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batch_fields = getattr(inner, "batch_fields", {})

    def forward(self, student: Any, teacher: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner(student.logits, teacher.logits, **kwargs)

    def on_optimizer_step(self, loss: float, step: int, total_steps: int) -> None:
        hook = getattr(self.inner, "on_optimizer_step", None)
        if callable(hook):
            hook(loss=loss, step=step, total_steps=total_steps)

    def log_values(self) -> dict[str, float]:
        values = getattr(self.inner, "log_values", None)
        return values() if callable(values) else {}


def on_logits(fn: Callable[..., Any], *, stateful: bool) -> Callable[..., Any]:
    """`fn` reading the `logits` of the two signals: a loss function wrapped, or for a stateful objective's
    class a constructor of the wrapped instance (the loop calls it with the objective's params)."""
    if stateful:
        def build(**params: Any) -> LogitsOf:
            return LogitsOf(fn(**params))

        return build

    def objective(student: Any, teacher: Any, **kwargs: Any) -> torch.Tensor:
        return fn(student.logits, teacher.logits, **kwargs)

    objective.batch_fields = getattr(fn, "batch_fields", {})  # type: ignore[attr-defined]
    return objective
