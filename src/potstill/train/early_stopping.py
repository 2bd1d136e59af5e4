"""Early stopping and best-checkpoint selection on an eval metric (`trainer.early_stopping`).

Every evaluation during training (`eval.every`) and the final one feed `EarlyStopping`: an evaluation improves
when its `metric` beats the best so far by more than `min_delta` (higher for `mode: max`, lower for `mode: min`);
the student's weights of the best evaluation are kept (a CPU copy). After `patience` evaluations in a row
without improvement the loop stops. At the end the best weights are loaded back into the student, so the saved
student is the best evaluation's, and `summary.json` names its step and value (`summary["best"]`).

State across `--resume`: the best value and step, the count of evaluations without improvement and whether the
run stopped are `early_stopping.json` in every checkpoint; the best weights are `best_student.safetensors` next
to it, so a resumed run selects the same checkpoint as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from potstill.config.common import EarlyStoppingConfig
from potstill.errors import UserError
from potstill.train.callbacks import Callback, FitState


class EarlyStopping(Callback):
    """Track `cfg.metric` over the evaluations; `stopped` turns True once `cfg.patience` in a row did not improve.
    `unwrap(student)` gives the plain module whose weights are kept (Accelerate's `unwrap_model`)."""

    state_file = "early_stopping.json"
    tensors_file = "best_student.safetensors"

    def __init__(self, cfg: EarlyStoppingConfig, unwrap: Callable[[Any], nn.Module]) -> None:
        self.cfg, self.unwrap = cfg, unwrap
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.bad_evaluations = 0
        self.last_step: int | None = None
        self.stopped_at: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.cfg.mode == "max":
            return value > self.best + self.cfg.min_delta
        return value < self.best - self.cfg.min_delta

    def on_evaluate(self, state: FitState, step: int, metrics: dict[str, float]) -> None:
        if not state.is_main or step == self.last_step:  # the final evaluation of a run stopped at an eval step
            return
        if self.cfg.metric not in metrics:
            raise UserError(f"field trainer.early_stopping.metric: this run's evaluation gives no "
                            f"{self.cfg.metric!r}; it gives: {', '.join(metrics) or 'nothing (no eval data?)'}")
        self.last_step, value = step, float(metrics[self.cfg.metric])
        if self.improves(value):
            self.best, self.best_step, self.best_metrics = value, step, dict(metrics)
            self.bad_evaluations = 0
            self.best_weights = {k: v.detach().to("cpu", copy=True)
                                 for k, v in self.unwrap(state.student).state_dict().items()}
            return
        self.bad_evaluations += 1
        if self.bad_evaluations >= self.cfg.patience and step < state.total and not self.stopped:
            from potstill.ui import console

            self.stopped_at = step
            console.print(f"early stopping at step {step}: {self.cfg.metric} has not improved by more than "
                          f"{self.cfg.min_delta:g} for {self.bad_evaluations} evaluations (best {self.best:.4g} at "
                          f"step {self.best_step})", soft_wrap=True, highlight=False)

    def restore_best(self, student: nn.Module) -> dict[str, float] | None:
        """Load the best evaluation's weights into `student`; its metrics, or None when nothing was kept."""
        if self.best_weights is None:
            return None
        student.load_state_dict(self.best_weights)
        return dict(self.best_metrics)

    def on_fit_end(self, state: FitState, summary: dict[str, Any]) -> None:
        summary["best"] = {"metric": self.cfg.metric, "mode": self.cfg.mode, "step": self.best_step,
                           "value": self.best, "stopped_early_at": self.stopped_at}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "best_metrics": self.best_metrics,
                "bad_evaluations": self.bad_evaluations, "last_step": self.last_step, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.best_metrics, self.bad_evaluations = dict(state["best_metrics"]), int(state["bad_evaluations"])
        self.last_step, self.stopped_at = state["last_step"], state["stopped_at"]

    def tensors(self) -> dict[str, torch.Tensor] | None:
        return self.best_weights

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.best_weights = tensors
