"""Self-J: the judge's training objective with self-distillation, and the expected score of a score distribution.

Paper: Ye & Ng 2024, "Self-Judge: Selective Instruction Following with Alignment Self-Evaluation"
(arXiv 2409.00935). What was checked against the authors' code (github.com/nusnlp/Self-J, `kd.py`, `judge.py`,
`bash/finetune.kd.sh`), since only the abstract is in the project's papers:

- The judge is the causal LM itself, fine-tuned (LoRA) to write a quality score 0–9 after a judging prompt.
  Every training example is shown twice, in two views of one model: the *reference-guided* view (the prompt holds
  the gold reference answer; the paper's "teacher") and the *reference-free* view (no reference; the "student",
  the only one used at test time). Both views are trained on the same label (the recalibrated self-evaluation of
  `potstill.data.self_judge`).
- The loss sums three terms at the score token(s):

      L = CE(z_ref, y) + α · CE(z_free, y) + β · KL(softmax(sg(z_ref)) ‖ softmax(z_free))

  with α = 0.3 (`noref_weight`) and β = 2 (`distill_weight`), the values of the authors' training script; sg is
  stop-gradient (the reference-guided view teaches, it is not pulled towards the reference-free one). The KL is
  the self-distillation regulariser; β = 0 gives the judge trained without it.
- At inference the score is the expectation of the score digits under the judge's next-token distribution,
  renormalised over the ten digit tokens: s = Σ_k k · p(k) / Σ_k p(k), k = 0..9 (`expected_score`).

Shapes follow the project's conventions: logits `[..., C]`; `mask` (True = counted) and integer `labels`
(-100 = not counted) have shape `logits.shape[:-1]`. C is the full vocabulary at the score position (the authors'
form) or only the K score classes (a judge head over the digits); `labels` then index that last axis. Soft
targets are accepted too: a float `labels` of shape `logits.shape` holds a target distribution per row (e.g. the
two-hot encoding of a fractional score from `score_targets`). Without `labels` only the distillation term is left.
The divergence is computed in float32; `reduction="mean"` divides by the number of counted rows.
"""

from __future__ import annotations

import torch

from ._rows import check_reduction

NOREF_WEIGHT = 0.3
DISTILL_WEIGHT = 2.0


def expected_score(score_logits: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k v_k · softmax(score_logits)_k over the last axis (the K score classes); `values` defaults to 0..K−1."""
    probs = torch.softmax(score_logits.float(), dim=-1)
    if values is None:
        values = torch.arange(score_logits.shape[-1], device=score_logits.device, dtype=probs.dtype)
    return (probs * values.to(probs)).sum(-1)


def score_targets(scores: torch.Tensor, num_classes: int, *, mode: str = "hard") -> torch.Tensor:
    """Targets for scores in [0, num_classes − 1]: `hard` rounds to the nearest class (long ids, as the authors'
    SFT on the written score does); `two_hot` splits the mass between the two neighbouring classes so that the
    target's expected score equals the score exactly (a float distribution `[..., num_classes]`)."""
    clipped = scores.float().clamp(0, num_classes - 1)
    if mode == "hard":
        return clipped.round().long()
    if mode != "two_hot":
        raise ValueError(f"score_targets: mode must be 'hard' or 'two_hot', got {mode!r}")
    low = clipped.floor().long()
    high = (low + 1).clamp(max=num_classes - 1)
    frac = clipped - low.float()
    target = torch.zeros(*scores.shape, num_classes, device=scores.device)
    target.scatter_add_(-1, low.unsqueeze(-1), (1 - frac).unsqueeze(-1))
    target.scatter_add_(-1, high.unsqueeze(-1), frac.unsqueeze(-1))
    return target


def _cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if labels.is_floating_point():
        return -(labels.float() * log_probs).sum(-1)
    safe = labels.clamp(min=0)
    return -log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)


def self_judge_terms(student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The per-row terms `ce_ref`, `ce_free` (absent without labels) and `distill` (KL(sg(p_ref) ‖ p_free))."""
    if student.shape != teacher.shape:
        raise ValueError(f"self_judge: student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ")
    counted = torch.ones(student.shape[:-1], dtype=torch.bool, device=student.device) if mask is None else mask
    log_free = torch.log_softmax(student.float(), dim=-1)
    log_ref = torch.log_softmax(teacher.detach().float(), dim=-1)
    terms = {"distill": (log_ref.exp() * (log_ref - log_free)).sum(-1)}
    if labels is not None:
        if not labels.is_floating_point():
            counted = counted & (labels != -100)
        terms["ce_ref"] = _cross_entropy_rows(teacher, labels)
        terms["ce_free"] = _cross_entropy_rows(student, labels)
    terms["counted"] = counted
    return terms


def self_judge(student: torch.Tensor, teacher: torch.Tensor, *, labels: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, noref_weight: float = NOREF_WEIGHT,
               distill_weight: float = DISTILL_WEIGHT, reduction: str = "mean") -> torch.Tensor:
    """Self-J's loss: CE(teacher, y) + noref_weight·CE(student, y) + distill_weight·KL(sg(p_teacher) ‖ p_student).

    `student`: the reference-free view's logits, `teacher`: the reference-guided view's (the same model; a
    frozen teacher's CE term is a constant). See the module docstring for the shapes and the paper's defaults.
    """
    check_reduction(reduction)
    terms = self_judge_terms(student, teacher, labels=labels, mask=mask)
    per_row = distill_weight * terms["distill"]
    if labels is not None:
        per_row = per_row + terms["ce_ref"] + noref_weight * terms["ce_free"]
    counted = terms["counted"]
    per_row = torch.where(counted, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / counted.sum().clamp(min=1) if reduction == "mean" else total
