"""The task adapter: everything the Distiller loop knows about models and data goes through it.

A task turns records into batches, runs the teacher and the student on a batch, says which rows of the
batch count, scores a model, and saves the student in its native format. The loop itself is task-agnostic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from potstill.config import DataSource, PruneConfig, Recipe
from potstill.data import load_source
from potstill.encoder_inputs import ENCODER_INPUTS
from potstill.errors import UserError
from potstill.signals import Signal

EXPORT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "features", "pixels")  # `Task.export_inputs`


class Task(ABC):
    """Base class of task adapters (`classification`, `embedding`, ...).

    Subclasses set `signal_kind` to the kind of objective they feed ("logits", "embedding", "scores").
    """

    signal_kind: str = ""
    # objective kinds fed besides `signal_kind` (causal_lm: "preference", on preference pairs)
    extra_objective_kinds: tuple[str, ...] = ()
    captures_internals: bool = True  # hidden states / q, k, v for objectives on internals (`with_internals`)
    name: str = ""
    metric_names: tuple[str, ...] = ()  # every metric `evaluate` can give (which ones depends on the data)

    def __init__(self, recipe: Recipe, *, run_dir: Path, device: torch.device | str = "cpu") -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.teacher: torch.nn.Module | None = None
        self.student: torch.nn.Module | None = None
        self.train_records: list[dict] = []
        self.eval_records: list[dict] = []
        # Set by the loop when objectives read internals: {"student"|"teacher": {"hidden": bool, "qkv": [layers]}}
        self.internals: dict[str, dict[str, Any]] = {}

    # ---- set-up
    @abstractmethod
    def setup(self, *, is_main: bool = True, barrier: Callable[[], Any] = lambda: None) -> None:
        """Load data, teacher and student. `barrier` syncs processes around one-time work (caches)."""

    def check_records(self) -> None:
        """Read and check the records before the run folder is touched or any model loads, so that a bad data file
        is refused first; `setup` then uses them. Default: nothing here (`setup` reads the records)."""
        return None

    def load(self, source: DataSource, *, required: tuple[str, ...] = ()) -> list[dict]:
        """Records of `source`; the training records are pruned when the recipe says `data.prune`."""
        data = self.recipe.data
        field = "data.train.path" if source is data.train else "data.eval.path" if source is data.eval else "data"
        records = load_source(source.path, columns=source.columns or None, required=required, split=source.split,
                              limit=source.limit, field=field)
        prune = self.recipe.data.prune
        if prune is not None and source is self.recipe.data.train:
            records = prune_records(records, prune, seed=self.recipe.seed, where=f"data.train ({source.path})")
        return records

    def record_lengths(self) -> list[int] | None:
        """Tokens of each training record as the student sees it (what `trainer.group_by_length` sorts by);
        None when the records have no token length. Default: the task's tokenizer on the `text` (and
        `text_pair`) fields, truncated to data.max_length."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None or not self.train_records or "text" not in self.train_records[0]:
            return None
        texts = [rec["text"] for rec in self.train_records]
        pairs = [rec["text_pair"] for rec in self.train_records] if "text_pair" in self.train_records[0] else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=self.recipe.data.max_length)
        return [len(ids) for ids in enc["input_ids"]]

    def epoch_order(self, epoch: int, batch_size: int) -> list[int] | None:
        """Indices into `train_records` in the order epoch `epoch` visits them, when the task picks its own
        batches (e.g. TAS-Balanced topic batches): each consecutive `batch_size` indices (the global batch,
        trainer.batch_size × processes) are one micro-batch, every epoch has the same length, and the order
        is a pure function of (recipe, epoch) so that a resumed run sees the same batches. Default: None, the
        loop's seeded shuffle."""
        return None

    def domain_records(self, split: str) -> list[dict]:
        """The records whose `data.domains.column` gives each training (`train`) or held-out (`eval`) record's
        domain (DDK, `potstill.data.ddk`), aligned with `train_records` / `eval_records`. Default: those
        records themselves."""
        return self.train_records if split == "train" else self.eval_records

    def eval_loss(self, model: torch.nn.Module, indices: list[int]) -> float:
        """Mean cross-entropy of `model` on the held-out records `indices` (per token for language models), for
        DDK's per-domain perplexities (`data.domains`)."""
        raise UserError(f"data.domains: the {self.name} task cannot measure per-domain losses")

    # ---- per batch
    @abstractmethod
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        """Tensors for one micro-batch; `indices` are the records' positions in `train_records`."""

    def prepare_batch(self, batch: dict[str, Any], student: torch.nn.Module, micro_batch: int) -> dict[str, Any]:
        """Last change to a collated, on-device micro-batch before the forwards (e.g. on-policy sampling with
        the unwrapped `student`); `micro_batch` is its global number. Default: unchanged."""
        return batch

    @abstractmethod
    def count_rows(self, batch: dict[str, Any]) -> int:
        """Rows of the batch that count in the loss (samples, sentences or tokens)."""

    def count_tokens(self, batch: dict[str, Any]) -> int:
        """Real input tokens of the batch (what objectives on internals average over)."""
        if "attention_mask" not in batch:
            raise UserError(f"objectives on hidden states or attention need token inputs; the {self.name} task's "
                            f"batches have none")
        return int(batch["attention_mask"].sum())

    # ---- internals (hidden states, q/k/v) for intermediate objectives
    def model_shape(self, role: str) -> Any:
        """Layers, hidden width and heads of the teacher or the student (`potstill.losses.ModelShape`)."""
        from potstill.losses.intermediate import ModelShape, shape_of
        from potstill.tasks.internals import transformer_layers

        model = self.teacher if role == "teacher" else self.student
        if model is None:
            raise UserError(f"objectives on hidden states or attention need a {role} model; this run has none")
        own_shape = getattr(model, "model_shape", None)
        if callable(own_shape):  # e.g. a static-embedding student
            return own_shape()
        config = getattr(model, "config", None)
        if config is None:
            raise UserError(f"objectives on hidden states or attention need Hugging Face transformer models; the "
                            f"{role} is a {type(model).__name__} without a config")
        try:
            shape = shape_of(config)
        except ValueError as err:
            raise UserError(f"{role}: {err}") from None
        layers = transformer_layers(model, self._layers_path(role))
        return ModelShape(layers=len(layers), hidden=shape.hidden, heads=shape.heads)

    def _layers_path(self, role: str) -> str | None:
        side = self.recipe.teacher if role == "teacher" else self.recipe.student
        return getattr(side, "layers_path", None)

    def internal_needs(self, role: str) -> dict[str, Any] | None:
        """What to capture from the teacher / student (`self.internals[role]`, set by the loop), with the
        recipe's module path of its blocks when given."""
        needs = self.internals.get(role)
        path = self._layers_path(role)
        return {**needs, "layers_path": path} if needs and path else needs

    def with_internals(self, role: str, fn: Callable[..., Any], model: torch.nn.Module,
                       batch: dict[str, Any]) -> Signal:
        """`fn(model, batch)`, as `Signals` carrying the internals the loop asked for (`internal_needs`); the
        token mask is the batch's attention mask (every token, when it has none)."""
        from potstill.tasks.internals import run_with_internals

        needs = self.internal_needs(role)
        if not needs:
            return fn(model, batch)
        return run_with_internals(fn, model, needs, batch.get("attention_mask"), model, batch)

    @abstractmethod
    def teacher_signal(self, batch: dict[str, Any]) -> Signal:
        """The teacher's signal for the batch (no autograd)."""

    @abstractmethod
    def student_signal(self, model: torch.nn.Module, batch: dict[str, Any]) -> Signal:
        """The student's signal for the batch, with autograd."""

    def signal_mask(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return None

    def adapt_objective(self, name: str, fn: Any) -> Any:
        """The loss function the loop calls for objective `name`: `fn` itself, or `fn` pointed at the part of
        this task's signal it compares (e.g. the ranking task's candidate or in-batch scores). Default: `fn`."""
        return fn

    def hard_label_loss(self, student_signal: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Summed cross-entropy on gold labels (normalised by the loop); `student_signal` is the main part of
        the student's `Signal` (logits, or lm_head inputs with `trainer.fused_lm_head`)."""
        raise UserError(f"trainer.hard_label_weight > 0 needs gold labels, which the {self.name} task has not")

    # ---- evaluation and output
    @abstractmethod
    def evaluate(self, model: torch.nn.Module, *, role: str = "student") -> dict[str, float]:
        """Metrics of `model` on the held-out data; `role` is "teacher" or "student"."""

    def measure(self, student: torch.nn.Module) -> dict[str, dict[str, float]]:
        """Size and speed of teacher and student: {"teacher": {...}, "student": {...}}."""
        return {}

    def compare_speed(self, student: torch.nn.Module, items: list, runner: Callable[[torch.nn.Module], Any], *,
                      unit: str, batch_size: int, rounds: int = 7, min_seconds: float = 0.25, per_item: float = 1.0,
                      teacher: torch.nn.Module | None = None) -> dict[str, dict[str, float]]:
        """Parameters, `unit` (the median items/s × `per_item`) and `<unit>_spread` (the relative interquartile
        range of the rates of the `rounds` timed blocks) of the teacher and the student, measured in interleaved
        blocks of ≥ `min_seconds` (`eval.compare_throughput_stats`) in eval mode; `runner(model)` returns the
        function that runs one chunk. Without a teacher model (e.g. teacher scores from a file) only the student
        is measured."""
        from potstill.eval import compare_throughput_stats, count_parameters

        teacher = self.teacher if teacher is None else teacher
        models = {"teacher": teacher, "student": student} if teacher is not None else {"student": student}
        modes = {role: m.training for role, m in models.items()}
        for m in models.values():
            m.eval()
        speed = compare_throughput_stats({role: runner(m) for role, m in models.items()}, items,
                                         batch_size=batch_size, repeats=rounds, block_seconds=min_seconds)
        for role, m in models.items():
            m.train(modes[role])
        return {role: {"params": count_parameters(m), unit: speed[role].median * per_item,
                       f"{unit}_spread": speed[role].spread} for role, m in models.items()}

    # `potstill export`: what a deployed student returns ("logits", "embedding", "token_logits", "pixel_logits";
    # None: the task's students are not exported), its inputs, and the forward that computes it from a batch
    export_kind: str | None = None

    def export_inputs(self, batch: dict[str, Any]) -> dict[str, dict[int, str]]:
        """The deployed student's inputs, in order, each with its variable axes (axis → size name; inputs whose
        axes share a name share that size). Default: the tensors of `EXPORT_INPUTS` that `batch` holds, a batch
        axis on each and a sequence axis on token inputs."""
        return {name: {0: "batch", 1: "sequence"} if name in ENCODER_INPUTS else {0: "batch"}
                for name in EXPORT_INPUTS if name in batch}

    def export_output(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The deployed student's output for `batch` (the graph `potstill export` writes)."""
        raise NotImplementedError(f"{type(self).__name__} students are not exported")

    @abstractmethod
    def save_student(self, model: torch.nn.Module, path: Path) -> None:
        """Save the student so that it loads without potstill."""

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}


def prune_records(records: list[dict], prune: PruneConfig, *, seed: int, where: str) -> list[dict]:
    """The records `data.prune` keeps (in their original order): a seeded random share, or the hardest /
    easiest by `score_column` (potstill.data.prune_indices)."""
    from potstill.data.pruning import prune_indices

    scores = None
    if prune.score_column is not None:
        scores = []
        for i, rec in enumerate(records):
            value = rec.get(prune.score_column)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise UserError(f"{where}: record {i + 1}: data.prune.score_column {prune.score_column!r} must be a "
                                f"number, got {value!r}")
            scores.append(float(value))
    keep = prune_indices(len(records), prune.fraction, scores=scores, keep=prune.keep, seed=seed)
    return [records[i] for i in keep]
