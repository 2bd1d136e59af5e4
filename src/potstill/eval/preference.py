"""Held-out preference accuracy of a language model on preference pairs (`data.format: preference`).

- preference_accuracy: share of pairs where the model's own sequence log-probability of the chosen completion
  is higher than that of the rejected one, log π(y_w | x) > log π(y_l | x) (summed over completion tokens);
  on the teacher this is the teacher's implicit ranking of the pairs;
- with a reference model (the teacher), reward_accuracy: share of pairs with a positive DPO reward margin,
  [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] > 0, and reward_margin, its mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from potstill.losses.preference import sequence_logps

Batch = dict[str, Any]


def pair_logps(model: nn.Module, examples: list[dict], *, batch_size: int,
               batch_of: Callable[[list[dict], list[int]], Batch],
               logits: Callable[[nn.Module, Batch], torch.Tensor]) -> torch.Tensor:
    """`[N, 2]` float32 sequence log-probs (chosen, rejected) of `model` on the pair `examples`; `batch_of` collates
    B pairs into 2B rows (chosen rows, then rejected rows) with `targets`. The model runs in eval mode and gets its
    mode back."""
    mode = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            idx = list(range(start, min(start + batch_size, len(examples))))
            batch = batch_of([examples[i] for i in idx], idx)
            logps = sequence_logps(logits(model, batch), batch["targets"]).cpu()
            out.append(torch.stack([logps[:len(idx)], logps[len(idx):]], dim=1))
    model.train(mode)
    return torch.cat(out) if out else torch.zeros(0, 2)


def preference_metrics(model_logps: torch.Tensor, reference_logps: torch.Tensor | None = None) -> dict[str, float]:
    """The module docstring's metrics from `[N, 2]` (chosen, rejected) log-probs; {} for no pairs."""
    if not len(model_logps):
        return {}
    metrics = {"preference_accuracy": float((model_logps[:, 0] > model_logps[:, 1]).float().mean())}
    if reference_logps is not None:
        margin = (model_logps[:, 0] - reference_logps[:, 0]) - (model_logps[:, 1] - reference_logps[:, 1])
        metrics["reward_accuracy"] = float((margin > 0).float().mean())
        metrics["reward_margin"] = float(margin.mean())
    return metrics
