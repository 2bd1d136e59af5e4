"""Self-J (Ye & Ng 2024): a judge that rates responses without a reference, trained from the same language model's
reference-guided self-evaluation.

The teacher is a frozen causal LM (`teacher.path`) that reads a judging prompt and writes a digit 0–9; its score is
the expected digit (`potstill.losses.self_judge.expected_score`). The student is a `ScoreHead` on the same frozen
LM (`potstill.students.self_judge`), started as the LM's own digit rows: untrained, it is the model's raw
reference-free self-evaluation. For each record (instruction, response, reference) the task builds the two views
of the judging prompt (with and without the reference) and runs the LM once on each, in setup: the LM is frozen,
so a step trains the head on cached last-token hidden states and costs almost nothing.

Labels (`potstill.data.self_judge`): the teacher's score with the reference, recalibrated by the MiniLM cosine of
response and reference (`data.similarity_weight`). The teacher signal of a batch is the labels as two-hot targets
over the digits; the student signal is the head's logits on both views (`JudgeViews`), which `self_judge` reads
as CE(z_ref, y) + α·CE(z_free, y) + β·KL(sg(p_ref) ‖ p_free).

Metrics on the held-out records (`potstill.eval.judge`): correlation with `quality`, best-of-n and 50 %-abstention
accuracy from `correct` and `group`, Spearman with the held-out labels; the "teacher" row is the reference-guided
self-evaluation (it reads the gold answer), the "before" row the raw self-evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.config.judge import JUDGE_FACTORY
from potstill.errors import UserError
from potstill.tasks.base import Task
from potstill.tasks.lm_models import resolve_builtin_paths
from potstill.tasks.models import load_hf_teacher

TEXT_FIELDS = ("instruction", "response", "reference")


@dataclass
class JudgeViews:
    """Score logits `[B, 10]` of the reference-free (`free`) and reference-guided (`ref`) views of B records."""

    free: torch.Tensor
    ref: torch.Tensor


def check_judge_records(records: list[dict], where: str) -> None:
    """Text fields are strings; `quality` a number, `correct` a bool, `group` text or an int, where given: else one
    line naming the row."""
    for i, rec in enumerate(records):
        for name in TEXT_FIELDS:
            if not isinstance(rec[name], str):
                raise UserError(f"{where}: record {i + 1}: field {name!r} must be text, got {rec[name]!r}")
        quality = rec.get("quality")
        if quality is not None and (isinstance(quality, bool) or not isinstance(quality, (int, float))
                                    or quality != quality):
            raise UserError(f"{where}: record {i + 1}: field 'quality' must be a number, got {quality!r}")
        if rec.get("correct") is not None and not isinstance(rec["correct"], bool):
            raise UserError(f"{where}: record {i + 1}: field 'correct' must be true or false, got {rec['correct']!r}")
        group = rec.get("group")
        if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))):
            raise UserError(f"{where}: record {i + 1}: field 'group' must be text or a whole number (the "
                            f"instruction's id), got {group!r}")


def column(records: list[dict], name: str) -> list[Any] | None:
    """The values of `name` when every record has one, else None (the metrics that need it are left out)."""
    values = [rec.get(name) for rec in records]
    return values if records and all(v is not None for v in values) else None


class JudgeTask(Task):
    signal_kind = "logits"
    captures_internals = False
    name = "judge"
    metric_names = ("mean_score", "spearman", "pearson", "best_of_n_acc", "selective_acc_50", "spearman_vs_label")

    def check_records(self) -> None:
        r = self.recipe
        self.train_records = self.load(r.data.train, required=TEXT_FIELDS)
        check_judge_records(self.train_records, f"data.train ({r.data.train.path})")
        self.eval_records = self.load(r.data.eval, required=TEXT_FIELDS) if r.data.eval else []
        if r.data.eval is not None:
            check_judge_records(self.eval_records, f"data.eval ({r.data.eval.path})")
        self._checked = True

    def setup(self, *, is_main: bool = True, barrier: Any = lambda: None) -> None:
        from transformers import AutoModelForCausalLM

        from potstill.data.program_exemplars import minilm_embedder
        from potstill.students.self_judge import SelfJudge

        r = self.recipe
        if not getattr(self, "_checked", False):
            self.check_records()
        resolve_builtin_paths(r, is_main=is_main, barrier=barrier)
        self.teacher, self.tokenizer = load_hf_teacher(r.teacher.path, AutoModelForCausalLM)
        self.teacher.to(self.device).eval().requires_grad_(False)
        rank = int(r.student.kwargs.get("rank", 16))
        self.judge = SelfJudge(self.teacher, self.tokenizer, system=r.data.system, rank=rank)
        embed = minilm_embedder()
        self.views: dict[str, dict[str, torch.Tensor]] = {}
        self.self_eval: dict[str, torch.Tensor] = {}  # the teacher's score: the LM's own, with the reference
        self.labels: dict[str, torch.Tensor] = {}
        for split, rows in (("train", self.train_records), ("eval", self.eval_records)):
            if rows:
                self.views[split] = self._views(rows, f"data.{split}")
                self.self_eval[split] = self.judge.scores_from_features(self.views[split]["ref"])
                self.labels[split] = self._labels(rows, self.self_eval[split], embed)
        self.student = self._build_student(rank)

    def _views(self, records: list[dict], field: str) -> dict[str, torch.Tensor]:
        """The LM's last hidden state on each record's reference-free and reference-guided prompt, [N, D]."""
        instructions, responses, references = ([rec[name] for rec in records] for name in TEXT_FIELDS)
        out = {}
        for view, refs in (("free", None), ("ref", references)):
            prompts = self.judge.prompts(instructions, responses, refs)
            self._check_lengths(prompts, field)
            out[view] = self.judge.features(prompts, batch_size=self.recipe.eval.batch_size).cpu()
        return out

    def _check_lengths(self, prompts: list[str], field: str) -> None:
        limit = self.recipe.data.max_length
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        over = [i for i, n in enumerate(lengths) if n > limit]
        if over:
            raise UserError(f"{field}: record {over[0] + 1}: its judging prompt is {lengths[over[0]]} tokens, over "
                            f"data.max_length {limit} ({len(over)} records are; the longest {max(lengths)} tokens): "
                            f"the score is read at the prompt's end, so prompts are not cut; raise data.max_length")

    def _labels(self, records: list[dict], self_eval: torch.Tensor, embed: Any) -> torch.Tensor:
        """Self-J's labels: the teacher's reference-guided score recalibrated by cosine(response, reference)."""
        from potstill.data.self_judge import cosine_similarities, recalibrated_label

        similarity = cosine_similarities([rec["response"] for rec in records], [rec["reference"] for rec in records],
                                         embed)
        label = recalibrated_label(self_eval.numpy(), similarity, similarity_weight=self.recipe.data.similarity_weight,
                                   max_score=self.judge.max_score)
        return torch.as_tensor(label, dtype=torch.float32).reshape(-1)

    def _build_student(self, rank: int) -> nn.Module:
        """The score head (`student.factory`), started as the judging LM's digit rows."""
        from potstill.students.loading import build_student
        from potstill.students.self_judge import ScoreHead

        r = self.recipe
        hidden = self.judge.head.linear.in_features
        self.student_kwargs = {"hidden": hidden, "num_scores": self.judge.max_score + 1, "rank": rank}
        torch.manual_seed(r.seed)
        student = build_student(r.student.model_copy(update={"kwargs": self.student_kwargs}), self.teacher,
                                seed=r.seed)
        if not isinstance(student, ScoreHead) or student.linear.in_features != hidden:
            raise UserError(f"field student: expected a score head of width {hidden} (the judging LM's), got "
                            f"{type(student).__name__}")
        student.linear.load_state_dict(self.judge.head.linear.state_dict())  # untrained = the LM's own digits
        return student.to(self.device)

    # ---- batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        return {"index": torch.tensor(indices, dtype=torch.long)}

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def teacher_signal(self, batch: dict[str, Any]) -> torch.Tensor:
        from potstill.losses.self_judge import score_targets

        labels = self.labels["train"][batch["index"].cpu()]
        return score_targets(labels, self.judge.max_score + 1, mode="two_hot").to(self.device)

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> JudgeViews:
        rows, views = batch["index"].cpu(), self.views["train"]
        return JudgeViews(model(views["free"][rows].to(self.device)), model(views["ref"][rows].to(self.device)))

    def adapt_objective(self, name: str, fn: Any) -> Any:
        """`self_judge` on the head's two views, the labels as its targets."""
        def on_views(student: JudgeViews, teacher: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            kwargs.pop("mask", None)
            return fn(student.free, student.ref, labels=teacher, **kwargs)

        return on_views

    # ---- evaluation and output
    def scores(self, model: nn.Module, split: str = "eval") -> torch.Tensor:
        """Expected scores of a score head on a split's records, read from the reference-free view."""
        from potstill.losses.self_judge import expected_score

        with torch.no_grad():
            features = self.views[split]["free"].to(next(model.parameters()).device)
            return expected_score(model(features)).float().cpu()

    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        from potstill.eval.judge import judge_metrics

        if not self.eval_records:
            return {}
        scores = self.self_eval["eval"] if role == "teacher" else self.scores(model)
        records = self.eval_records
        groups = column(records, "group") or [rec["instruction"] for rec in records]
        return judge_metrics(scores.numpy(), quality=column(records, "quality"), correct=column(records, "correct"),
                             groups=groups, labels=self.labels["eval"].numpy())

    def save_student(self, model: nn.Module, path: Path) -> None:
        from potstill.students.save import save_factory_student

        save_factory_student(model, path, factory=JUDGE_FACTORY, kwargs=self.student_kwargs, tokenizer=self.tokenizer,
                             extra={"judge_model": self.recipe.teacher.path, "system": self.recipe.data.system,
                                    "score_token_ids": self.judge.token_ids})
