"""One weighted term of the loss, and how the loop feeds it each kind of signal.

An objective is a loss function of `potstill.losses` (or a small `nn.Module` with state), a weight and its
parameters. `Objective.__call__` picks the form the signals call for, one typed case each:

- an objective on internals (`InternalsObjective`: hidden states, q/k/v) reads that field of the two `Signals`
  and averages over real tokens;
- a student given as its lm_head inputs (`LMHeadInputs`, `trainer.fused_lm_head`) takes the fused form, which
  never builds the student's full logits;
- a cached top-k teacher (`TopKTeacher`) takes the sparse form over the teacher's top-k ids plus a tail bucket;
- aligned spans of two tokenizers (`SpanLogits`, cross-tokenizer runs) go to uld / gold with their merge factors,
  or to first_token_kl with the teacher's first-token map (their top-k forms, `CROSS_TOKENIZER_OBJECTIVES[name]`,
  when the teacher's spans come from a cache);
- otherwise the loss itself, on the main signal.

The protocols below are structural: the losses satisfy them by having the methods, without importing this file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from potstill.errors import UserError
from potstill.losses.catalogue import CROSS_TOKENIZER_OBJECTIVES, get_objective
from potstill.losses.fused import FUSED_DIVERGENCES, LMHeadInputs, fused_linear_divergence
from potstill.losses.sparse import TopKTeacher, sparse_version
from potstill.signals import Signal, Signals, SpanLogits

if TYPE_CHECKING:
    from potstill.tasks.base import Task


@runtime_checkable
class StatefulObjective(Protocol):
    """An objective with state that moves with training (TAID's t, a regulariser's warm-up): told of every
    optimizer step, logged, and checkpointed with the run."""

    def on_optimizer_step(self, loss: float, step: int, total_steps: int) -> None: ...

    def log_values(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@runtime_checkable
class BoundObjective(Protocol):
    """An objective fitted to the two models' shapes before training (layer pairs, learned projections)."""

    def bind(self, student: Any, teacher: Any) -> None: ...

    def needs(self) -> dict[str, list[int]]: ...


@runtime_checkable
class InternalsObjective(Protocol):
    """An objective on internals: compares `signal` ("hidden_states" or "qkv") of the two `Signals`, per `unit`
    ("tokens": divided by the step's real input tokens)."""

    signal: str
    unit: str

    def bind(self, student: Any, teacher: Any) -> None: ...

    def needs(self) -> dict[str, list[int]]: ...


@dataclass
class Objective:
    """One weighted term of the loss: `weight · fn(student_signal, teacher_signal, mask=…, reduction="sum", **params)`.

    `fn` is a pure loss function, or an `nn.Module` whose `state_dict` is checkpointed with the run.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.internals: InternalsObjective | None = self.fn if isinstance(self.fn, InternalsObjective) else None
        self.stateful: StatefulObjective | None = self.fn if isinstance(self.fn, StatefulObjective) else None

    @property
    def unit(self) -> str:
        """What the loop divides this objective's sum by: "rows" (the task's counted rows: samples, sentences
        or target tokens) or "tokens" (real input tokens, for objectives on internals)."""
        return self.internals.unit if self.internals is not None else "rows"

    def __call__(self, student: Signal, teacher: Signal | None, mask: torch.Tensor | None,
                 batch: dict[str, Any] | None = None) -> torch.Tensor:
        """The objective's sum over the counted rows (see the module docstring for the forms). An objective
        with `batch_fields` ({batch key: keyword}, e.g. MGSR's DAC-KL reads the target tokens) also gets those
        fields of `batch` that are there."""
        if self.internals is not None:
            if not isinstance(student, Signals) or not isinstance(teacher, Signals):
                raise RuntimeError(f"objective {self.name!r} reads internals; the task gave no Signals")
            signal = self.internals.signal
            return self.fn(getattr(student, signal), getattr(teacher, signal), mask=student.token_mask,
                           reduction="sum")
        main_student = student.main if isinstance(student, Signals) else student
        main_teacher = teacher.main if isinstance(teacher, Signals) else teacher
        kwargs = dict(self.params)
        if mask is not None:
            kwargs["mask"] = mask
        for key, keyword in getattr(self.fn, "batch_fields", {}).items():
            if batch is not None and key in batch:
                kwargs[keyword] = batch[key]
        if isinstance(main_teacher, SpanLogits):
            return self._spans(main_student, main_teacher, kwargs)
        if isinstance(main_student, LMHeadInputs):
            return self._fused(main_student, main_teacher, kwargs)
        if isinstance(main_teacher, TopKTeacher):
            return self._sparse()(main_student, main_teacher, reduction="sum", **kwargs)
        return self.fn(main_student, main_teacher, reduction="sum", **kwargs)

    def _fused(self, student: LMHeadInputs, teacher: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.name not in FUSED_DIVERGENCES:
            raise UserError(f"objective {self.name!r} has no fused form; trainer.fused_lm_head works with "
                            f"{', '.join(FUSED_DIVERGENCES)}")
        if kwargs.get("chunk_size") is None:
            kwargs.pop("chunk_size", None)
        return fused_linear_divergence(student.hidden, student.weight, teacher, divergence=self.name,
                                       lm_head_bias=student.bias, vocab_size=student.vocab_size,
                                       reduction="sum", **kwargs)

    def _spans(self, student: Any, teacher: SpanLogits, kwargs: dict[str, Any]) -> torch.Tensor:
        params = inspect.signature(get_objective(self.name).fn).parameters
        merged = "student_log_scale" in params  # uld / gold read the merged spans; first_token_kl the first rows
        if not isinstance(student, SpanLogits) or self.name not in CROSS_TOKENIZER_OBJECTIVES:
            raise UserError(f"objective {self.name!r} compares logits over one shared vocabulary, and teacher and "
                            f"student tokenizers differ here; use the cross-tokenizer objectives "
                            f"{', '.join(CROSS_TOKENIZER_OBJECTIVES)}")
        kwargs.pop("mask", None)
        if "matched_ids" in params and teacher.matched_ids is not None:
            kwargs["matched_ids"] = teacher.matched_ids
        if "first_token_of" in params:
            kwargs["first_token_of"] = teacher.first_token_of
        if merged:
            kwargs.update(student_log_scale=student.log_scale, teacher_log_scale=teacher.log_scale)
        if isinstance(teacher.logits, TopKTeacher):  # a cached teacher: the objective's top-k form
            kwargs.pop("teacher_temperature", None)  # the cache's, checked against it at set-up
            return CROSS_TOKENIZER_OBJECTIVES[self.name](student.logits, teacher.logits, teacher_vocab=teacher.vocab,
                                                         reduction="sum", **kwargs)
        return self.fn(student.logits, teacher.logits, reduction="sum", **kwargs)

    def _sparse(self) -> Callable[..., torch.Tensor]:
        fn = sparse_version(self.name)
        if fn is None:
            raise UserError(f"objective {self.name!r} needs the teacher's full logits; a cached top-k "
                            f"teacher feeds only forward_kl, reverse_kl, soft_cross_entropy, "
                            f"generalized_jsd, skew_kl, skew_reverse_kl and tvd")
        return fn

    @classmethod
    def from_name(cls, name: str, weight: float = 1.0, **params: Any) -> Objective:
        from potstill.losses import get_objective

        return cls(name=name, fn=get_objective(name).fn, weight=weight, params=params)


def bind_objectives(objectives: list[Objective], task: Task, device: torch.device) -> None:
    """Bind objectives to the two models' shapes (layer pairs, projections), move stateful ones to `device`,
    and tell the task which internals to capture for each model (`Task.internals`)."""
    needs: dict[str, dict[str, Any]] = {}
    for o in objectives:
        if isinstance(o.fn, BoundObjective):
            try:
                o.fn.bind(task.model_shape("student"), task.model_shape("teacher"))
            except ValueError as err:
                raise UserError(f"objective {o.name!r}: {err}") from None
            for role, layers in o.fn.needs().items():
                want = needs.setdefault(role, {"hidden": False, "hidden_layers": set(), "qkv": set()})
                if o.internals is not None and o.internals.signal == "hidden_states":
                    want["hidden"] = True
                    want["hidden_layers"].update(layers)
                else:
                    want["qkv"].update(layers)
        if isinstance(o.fn, nn.Module):
            o.fn.to(device)
    task.internals = {role: {"hidden": w["hidden"], "hidden_layers": sorted(w["hidden_layers"]),
                             "qkv": sorted(w["qkv"])} for role, w in needs.items()}


def objective_parameters(objectives: list[Objective]) -> list[nn.Parameter]:
    """Trainable parameters of the objectives (learned projections), trained with the student."""
    return [p for o in objectives if isinstance(o.fn, nn.Module) for p in o.fn.parameters() if p.requires_grad]


def loss_terms(objectives: list[Objective], hard_label_weight: float) -> tuple[list[str], torch.Tensor,
                                                                              torch.Tensor]:
    """The terms of the loss in the loop's order: names, weights, and whether each is divided by real input
    tokens (else by counted rows); the hard-label term (`trainer.hard_label_weight`) last, when weighted."""
    hard = [("hard_label", hard_label_weight, "rows")] if hard_label_weight else []
    terms = [(o.name, o.weight, o.unit) for o in objectives] + hard
    return ([name for name, _, _ in terms], torch.tensor([weight for _, weight, _ in terms]),
            torch.tensor([unit == "tokens" for _, _, unit in terms]))
