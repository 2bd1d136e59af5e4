"""The recipe of `task: judge`: Self-J (Ye & Ng 2024), a judge that rates (instruction, response) pairs 0–9 without
a reference, trained from the same language model's reference-guided self-evaluation.

The teacher is the language model reading the gold reference (`teacher.path`, a causal LM); the student is a score
head on the same frozen model reading no reference (`student.factory: potstill.students.self_judge:score_head`).
The records are JSONL rows with `instruction`, `response` (a reply of the model being judged) and `reference` (the
gold answer); held-out rows may add `quality` (a true score, any scale), `correct` (a bool) and `group` (replies
to one instruction: best-of-n) for the judge's metrics (`potstill.eval.judge`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from potstill.config.common import (
    DataConfig,
    EvalConfig,
    NoDomains,
    NoTopKCache,
    RecipeBase,
    StudentConfig,
    TeacherConfig,
)
from potstill.config.paths import ModelPath

JUDGE_FACTORY = "potstill.students.self_judge:score_head"


class JudgeData(NoDomains, DataConfig):
    """The judged replies (JSONL: instruction, response, reference; held out also quality, correct, group) and
    how their labels are made."""

    max_length: int = Field(512, ge=1, description="token limit of a judging prompt (longer prompts are refused)")
    system: str | None = Field("You are a precise judge.", description="system turn of the judging prompts (chat "
                               "templates only; null: none)")
    similarity_weight: float = Field(0.5, ge=0.0, le=1.0, description="label = (1 − w)·self-evaluation with the "
                                     "reference + w·9·cosine(response, reference) (Self-J's recalibration; "
                                     "potstill.data.self_judge.recalibrated_label)")


class JudgeTeacherConfig(NoTopKCache, TeacherConfig):
    """The judging language model, which reads the reference: a causal LM folder, Hugging Face id or
    builtin:smollm2."""

    path: ModelPath | None = Field(None, description="the causal LM that judges (e.g. builtin:smollm2)")


class JudgeRecipe(RecipeBase):
    """task: judge: Self-J's score head on a frozen causal LM, trained on labels from the model's reference-guided
    self-evaluation (objective self_judge)."""

    task: Literal["judge"]
    teacher: JudgeTeacherConfig = Field(default_factory=JudgeTeacherConfig, description="the judging LM")
    student: StudentConfig = Field(description="the score head: init factory, factory "
                                   f"{JUDGE_FACTORY}, kwargs {{rank: 16}} (its width and the digit rows "
                                   "come from the teacher)")
    data: JudgeData
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def check(self) -> None:
        self.check_loss()
        if self.teacher.path is None:
            raise ValueError("the judge task needs teacher.path: the causal LM that judges (e.g. builtin:smollm2)")
        if self.student.init != "factory" or self.student.factory != JUDGE_FACTORY:
            raise ValueError(f"the judge task trains a score head: student.init factory with student.factory "
                             f"{JUDGE_FACTORY}")
        unknown = sorted(set(self.student.kwargs) - {"rank"})
        if unknown:
            raise ValueError(f"student.kwargs: {', '.join(unknown)} not read; the score head takes rank only (its "
                             f"width and scores come from the teacher)")
        if any(o.name != "self_judge" for o in self.objectives):
            others = ", ".join(o.name for o in self.objectives if o.name != "self_judge")
            raise ValueError(f"objectives: the judge task trains with self_judge only, got {others}")
        if self.trainer.hard_label_weight != 0:
            raise ValueError("trainer.hard_label_weight: the judge task's labels are in self_judge (its CE terms)")
        if self.data.prune is not None:
            raise ValueError("data.prune is not read by the judge task")
