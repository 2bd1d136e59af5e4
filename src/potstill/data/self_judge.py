"""Self-J's training labels: reference-guided self-evaluation, recalibrated by similarity to the gold answer.

Paper: Ye & Ng 2024, "Self-Judge: Selective Instruction Following with Alignment Self-Evaluation"
(arXiv 2409.00935; the authors' code: github.com/nusnlp/Self-J). No human quality score is used. For an
instruction x with a gold reference answer r (labelled instruction-tuning data) and a response y sampled from the
model being judged:

1. *Self-evaluation with the reference*: the same model reads a judging prompt that holds x, r and y and is asked
   for an integer 0–9. Its score is the expectation of the digit under its next-token distribution, renormalised
   over the ten digit tokens (`potstill.losses.self_judge.expected_score`; the authors' `judge.py` reads it the
   same way from the first generated token). Prompts: `judge_prompt` (our wording of the authors' two templates,
   "with reference" and "without reference": same fields, same 0–9 scale). The score itself comes from an
   untrained `potstill.students.self_judge.SelfJudge` (its head starts as the LM's digit rows):
   `SelfJudge(model, tokenizer).score(instructions, responses, references=references)`.
2. *Recalibration by semantic similarity*: the cosine similarity of sentence embeddings of y and r
   (the paper's "cosine" score; here the packaged all-MiniLM-L6-v2, `minilm_embedder`).
3. *Combination*: the authors' released training data holds "the combination of the model's self-evaluation and
   cosine similarity"; the exact weighting is not in the code we could read, so `recalibrated_label` uses the mean
   of the two on one scale (cosine clipped to [0, 1] and stretched to 0–9):

       label = (1 − w) · s_self + w · 9 · clip(cos(e_y, e_r), 0, 1),   w = similarity_weight = 0.5

The label then trains both views of the judge (`potstill.losses.self_judge.self_judge`); the judge itself
(a score head on the causal LM, scoring best-of-n and abstention) is `potstill.students.self_judge`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from potstill.errors import UserError

MAX_SCORE = 9
SIMILARITY_WEIGHT = 0.5

_ASK = "Judge the answer to the question: rate it from 0 to {top}, higher is better.{ref_note} Reply with one digit."
_REF_NOTE = " Use the reference answer."


def judge_prompt(instruction: str, response: str, reference: str | None = None, *, max_score: int = MAX_SCORE) -> str:
    """The judging request (the user turn) for one response; with `reference` it is the reference-guided view."""
    head = _ASK.format(top=max_score, ref_note=_REF_NOTE if reference is not None else "")
    parts = [head, "", f"[Question]\n{instruction}", ""]
    if reference is not None:
        parts += [f"[Reference]\n{reference}", ""]
    parts.append(f"[Answer]\n{response}")
    return "\n".join(parts)


def recalibrated_label(self_eval: float | np.ndarray, similarity: float | np.ndarray, *,
                       similarity_weight: float = SIMILARITY_WEIGHT, max_score: int = MAX_SCORE) -> Any:
    """(1 − w)·self_eval + w·max_score·clip(similarity, 0, 1): the self-evaluation recalibrated by the cosine
    similarity to the gold reference, on the self-evaluation's 0–max_score scale (scalars or arrays)."""
    if not 0.0 <= similarity_weight <= 1.0:
        raise UserError(f"similarity_weight: expected a number in [0, 1], got {similarity_weight!r}")
    cos = np.clip(np.asarray(similarity, dtype=np.float64), 0.0, 1.0)
    label = (1.0 - similarity_weight) * np.asarray(self_eval, dtype=np.float64) + similarity_weight * max_score * cos
    return float(label) if label.ndim == 0 else label


def cosine_similarities(responses: Sequence[str], references: Sequence[str],
                        embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """cos(e_response, e_reference) per pair; `embed` maps texts to rows (e.g. `minilm_embedder()`)."""
    if len(responses) != len(references):
        raise UserError(f"cosine_similarities: {len(responses)} responses but {len(references)} references")
    if not responses:
        return np.zeros(0)
    a = np.asarray(embed(list(responses)), dtype=np.float64)
    b = np.asarray(embed(list(references)), dtype=np.float64)
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


@dataclass(frozen=True)
class SelfJudgeRecord:
    """One judge-training example: the (instruction, response) pair, its gold reference, the model's
    reference-guided self-evaluation (0–9), the response-reference cosine similarity and the combined label."""

    instruction: str
    response: str
    reference: str
    self_eval: float
    similarity: float
    label: float

    def record(self) -> dict[str, Any]:
        """The JSONL record."""
        return asdict(self)


def build_records(instructions: Sequence[str], responses: Sequence[str], references: Sequence[str],
                  self_evals: Sequence[float], similarities: Sequence[float], *,
                  similarity_weight: float = SIMILARITY_WEIGHT, max_score: int = MAX_SCORE) -> list[SelfJudgeRecord]:
    """Typed records with their recalibrated labels; every column must have one value per response."""
    columns = {"instructions": instructions, "references": references, "self_evals": self_evals,
               "similarities": similarities}
    for name, column in columns.items():
        if len(column) != len(responses):
            raise UserError(f"build_records: {name} has {len(column)} values, expected one per response "
                            f"({len(responses)})")
    labels = recalibrated_label(np.asarray(self_evals, dtype=np.float64), np.asarray(similarities, dtype=np.float64),
                                similarity_weight=similarity_weight, max_score=max_score)
    return [SelfJudgeRecord(x, y, r, float(s), float(c), float(label))
            for x, y, r, s, c, label in zip(instructions, responses, references, self_evals, similarities,
                                            np.atleast_1d(labels), strict=True)]
