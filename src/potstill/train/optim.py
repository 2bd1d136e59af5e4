"""The optimizer of a run (`trainer.optimizer`), its parameter groups, and the learning-rate schedule.

Each optimizer is the library's own: torch's AdamW (plain or `fused=True`) and SGD, transformers' Adafactor
(with an external learning rate, so the run's schedule drives it), bitsandbytes' AdamW8bit when that imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from potstill.errors import UserError


class ParameterBag(nn.Module):
    """A bag of parameters (objective projections), so that `param_groups` can split them like a model's."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after `step` optimizer steps: linear warm-up, then decay to 0."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(name: str, groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float],
                    momentum: float = 0.0) -> torch.optim.Optimizer:
    """The `trainer.optimizer` named `name` over parameter `groups` (each with its weight_decay) at peak `lr`."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "adamw_fused":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError as err:
            raise UserError(f"trainer.optimizer: adamw_8bit needs bitsandbytes, which does not import here "
                            f"({type(err).__name__}); pip install bitsandbytes, or choose adamw") from None
        return bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=betas)
    raise UserError(f"trainer.optimizer: unknown optimizer {name!r}; valid: adamw, adamw_fused, adafactor, sgd, "
                    f"adamw_8bit")
