"""Preference distillation in the causal_lm task (`data.format: preference`): how pair batches reach objectives.

LLaVA-MoD (Shu et al. 2024) ends with DPO against the frozen teacher (`potstill.losses.preference`). With
`data.format: preference` each micro-batch of B pairs has 2B rows, the chosen rows then the rejected rows
(`potstill.data.preference`), and both models' signals are `PairLogits`: the `[2B, T, V]` logits together with
the token ids they score. `PreferenceObjective` points each objective at it:

- a `preference` objective (`dpo_teacher_ref`) reads all 2B rows and gives one loss per pair;
- a logit divergence (e.g. `forward_kl`, the mimic loss) and the hard-label cross-entropy read the chosen rows only.

A row of the loop (what `count_rows` counts and the loop divides by) is a pair: the DPO term is the mean over
pairs, and a divergence or the hard-label term is the sum over the chosen completion's tokens, per pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from potstill.errors import UserError


@dataclass
class PairLogits:
    """A pair batch's logits `[2B, T, V]` (B chosen rows, then B rejected rows) and its `targets` `[2B, T]`."""

    logits: torch.Tensor
    targets: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.logits.shape[0] // 2

    def chosen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets of the chosen rows."""
        return self.logits[:self.pairs], self.targets[:self.pairs]


@dataclass
class PreferenceObjective:
    """Objective `name` (`fn` of kind `kind`, "preference" or "logits") on `PairLogits` (module docstring); called
    by the loop as `fn(student, teacher, mask=…, reduction="sum", **params)`, the mask being the pair batch's. On
    plain logits (records that are not pairs) a logit divergence is `fn` itself."""

    name: str
    fn: Callable[..., torch.Tensor]
    kind: str

    def __call__(self, student: Any, teacher: Any, *, mask: torch.Tensor | None = None, reduction: str = "sum",
                 **params: Any) -> torch.Tensor:
        if not isinstance(student, PairLogits) or not isinstance(teacher, PairLogits):
            if self.kind == "preference":
                raise RuntimeError(f"objective {self.name!r} reads preference pairs; the task gave "
                                   f"{type(student).__name__}")
            return self.fn(student, teacher, mask=mask, reduction=reduction, **params)
        if self.kind == "preference":
            return self.fn(student.logits, teacher.logits, labels=student.targets, reduction=reduction, **params)
        logits, targets = student.chosen()
        return self.fn(logits, teacher.chosen()[0], mask=targets != -100, reduction=reduction, **params)


def adapt_preference_objective(name: str, fn: Any) -> Any:
    """`fn` as a `PreferenceObjective` when it is a preference objective or a stateless logit divergence; other
    objectives unchanged (`check_preference_objectives` refuses them on pairs)."""
    from potstill.losses.catalogue import CROSS_TOKENIZER_OBJECTIVES, OBJECTIVES

    info = OBJECTIVES.get(name)
    if info is None or info.kind not in ("logits", "preference") or info.stateful:
        return fn
    if name in CROSS_TOKENIZER_OBJECTIVES:  # span losses, not for pairs
        return fn
    return PreferenceObjective(name, fn, info.kind)


def check_preference_objectives(objectives: list[Any], *, pairs: bool) -> None:
    """Refuse a preference objective on records that are not pairs or with an unknown `loss_type`, and on pairs any
    objective other than preference objectives and stateless logit divergences (`objectives`: the recipe's
    entries, with `name` and `params`; `pairs`: the training records are preference pairs)."""
    from potstill.losses.catalogue import OBJECTIVES
    from potstill.losses.preference import LOSS_TYPES

    for i, objective in enumerate(objectives):
        name = objective.name
        info = OBJECTIVES[name]
        loss_type = objective.params.get("loss_type", LOSS_TYPES[0])
        if info.kind == "preference" and loss_type not in LOSS_TYPES:
            raise UserError(f"field objectives.{i}.params.loss_type: expected one of {', '.join(LOSS_TYPES)}, got "
                            f"{loss_type!r}")
        if info.kind == "preference" and not pairs:
            raise UserError(f"field objectives.{i}.name: {name} trains on preference pairs; data.train needs "
                            f"prompt, chosen and rejected fields (data.format: preference)")
        if pairs and (info.kind not in ("logits", "preference") or info.stateful):
            raise UserError(f"field objectives.{i}.name: with preference pairs (data.format: preference) the "
                            f"objectives are dpo_teacher_ref and stateless logit divergences on the chosen "
                            f"completions (e.g. forward_kl), not {name}")


def check_preference_recipe(recipe: Any) -> None:
    """Refuse what a causal_lm recipe cannot combine with preference pairs (one line naming the field)."""
    refused = {"data.packing": recipe.data.packing, "data.domains": recipe.data.domains is not None,
               "teacher.cache": recipe.teacher.cache is not None, "trainer.fused_lm_head": recipe.trainer.fused_lm_head,
               "generation.lmbda": bool(recipe.generation.lmbda), "generation.seq_kd": recipe.generation.seq_kd}
    for field, used in refused.items():
        if used:
            raise UserError(f"field {field}: preference pairs (data.format: preference) are scored whole, by a live "
                            f"teacher, one sequence per completion; turn {field} off")


def chosen_ce_sum(signal: PairLogits, ce_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The hard-label term of a pair batch: `ce_sum(logits, targets)` on the chosen rows."""
    logits, targets = signal.chosen()
    return ce_sum(logits, targets)
