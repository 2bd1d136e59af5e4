"""Cross-tokenizer logit distillation: ULD (sorted-probability L1) and GOLD's hybrid.

When teacher and student tokenize text differently their vocabularies have nothing in common index by index, so
the usual divergences (which compare p_t[k] with p_s[k]) do not apply. These losses compare one aligned position
(a span of text both models predict; `potstill.data.token_alignment` builds them) at a time:

- **ULD** (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss
  for LLMs"): sort each probability vector in decreasing order, zero-pad the shorter one to the longer width, and
  take the L1 distance, Σ_k |sort↓(p_s)_k − sort↓(p_t)_k|. It is blind to which token carries which mass, and
  0 when the two distributions are permutations of one another. Defaults as TRL's GOLD trainer: T = 1 for both.
- **GOLD's hybrid** (TRL's `GOLDTrainer` with `uld_use_hybrid_loss`): the ids whose token strings are the same in
  both vocabularies (`matched_ids`, M pairs; `potstill.data.token_alignment.vocab_mapping`) are compared entry by
  entry with the generalized JSD of GKD, β·KL(p_t^M ‖ m) + (1−β)·KL(p_s^M ‖ m), m = β·p_t^M + (1−β)·p_s^M, on the
  matched sub-vectors as they are (not renormalised, log taken of max(p, 1e-8) as TRL does; β = 0 is
  KL(p_t^M ‖ p_s^M), β = 1 is KL(p_s^M ‖ p_t^M)); the remaining ids of each side get the sorted L1 above. The
  two are mixed as w·JSD + (1 − w)·L1 with w = M / V_t by default (the matched share of the teacher's
  vocabulary), or a fixed `matched_weight`. Defaults: β = 0.5 (GOLDConfig.beta), T = 1.

Merged spans. When one side needs several tokens for a span the other covers with one, its distribution for the
span is the first token's distribution times the probabilities it gave the actual later tokens of the span
(GOLD's "observed" merge): p_span = softmax(z_first / T) · Π p(later token). That product is a per-row scalar, so
it is given here as a log factor, `student_log_scale` / `teacher_log_scale` (shape `[...]`, 0 = no merge):
p = softmax(z / T) · exp(log_scale). The vector is then not normalised, as in TRL; the student's factor carries
a gradient like its logits do.

Arguments as the other logit losses (`potstill.losses.divergences`), except that the two vocabularies differ:
`student_logits` `[..., V_s]`, `teacher_logits` `[..., V_t]` with the same leading (row) shape; `temperature`
divides both logits (`teacher_temperature`, when given, the teacher's instead); `mask` / `labels`, `reduction`
("mean": the sum over counted rows / their number) and `chunk_size` as there. Float32 throughout.
TRL averages per sequence and then over the batch; "mean" here averages over all counted rows (the project's
convention), which is the same for one sequence or sequences of equal length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import RowsFn, check_temperature, check_weight, rowwise

_PROB_FLOOR = 1e-8  # TRL's clamp before the log of matched probabilities


def sorted_l1(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Σ_k |sort↓(p_s)_k − sort↓(p_t)_k| per row of `(n, V_s)` and `(n, V_t)` probabilities, the narrower one
    zero-padded; `(n,)`.

    Past the narrower width w the padded side is 0, so those terms add up to the wider side's mass outside its
    w largest entries: only the w largest of the wider side are needed (`topk`, much cheaper than sorting a
    49k-wide teacher row), plus its total."""
    width = min(student_probs.shape[-1], teacher_probs.shape[-1])
    parts: list[tuple[Tensor, Tensor | None]] = []
    for probs in (student_probs, teacher_probs):
        if probs.shape[-1] == width:
            parts.append((probs.sort(dim=-1, descending=True).values, None))
        else:
            top = probs.topk(width, dim=-1, sorted=True).values
            parts.append((top, (probs.sum(-1) - top.sum(-1)).clamp_min(0.0)))
    (s, s_rest), (t, t_rest) = parts
    value = (s - t).abs().sum(-1)
    for rest in (s_rest, t_rest):
        if rest is not None:
            value = value + rest
    return value


def matched_jsd(student_probs: Tensor, teacher_probs: Tensor, beta: float) -> Tensor:
    """GKD's generalized JSD between the (unnormalised) matched sub-vectors, per row, with TRL's endpoints and
    log floor: β = 0 is KL(p_t ‖ p_s), β = 1 is KL(p_s ‖ p_t); `(n,)`."""
    log_s = student_probs.clamp_min(_PROB_FLOOR).log()
    log_t = teacher_probs.clamp_min(_PROB_FLOOR).log()
    if beta == 0.0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def _probs(logits: Tensor, log_scale: Tensor | None, temperature: float) -> Tensor:
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    if log_scale is not None:
        log_p = log_p + log_scale.float().unsqueeze(-1)
    return log_p.exp()


def _rows(
    per_row, temperature: float, teacher_temperature: float, has_s_scale: bool, has_t_scale: bool
) -> RowsFn:
    """A row function over student rows and the teacher tuple (teacher logits[, teacher scale][, student scale])."""

    def rows(s: Tensor, packed: tuple[Tensor, ...]) -> Tensor:
        parts = list(packed)
        t = parts.pop(0)
        t_scale = parts.pop(0) if has_t_scale else None
        s_scale = parts.pop(0) if has_s_scale else None
        return per_row(_probs(s, s_scale, temperature), _probs(t, t_scale, teacher_temperature))

    return rows


def _cross_vocab(
    per_row,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    teacher_temperature: float | None,
    student_log_scale: Tensor | None,
    teacher_log_scale: Tensor | None,
    mask: Tensor | None,
    labels: Tensor | None,
    reduction: str,
    chunk_size: int | None,
) -> Tensor:
    temperature = check_temperature(temperature)
    t_temperature = temperature if teacher_temperature is None else check_temperature(teacher_temperature)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student and teacher logits must have the same row shape (all but the vocabulary axis), got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    row_shape = student_logits.shape[:-1]
    for name, scale in (("student_log_scale", student_log_scale), ("teacher_log_scale", teacher_log_scale)):
        if scale is not None and scale.shape != row_shape:
            raise ValueError(f"{name} must have the row shape {tuple(row_shape)}, got {tuple(scale.shape)}")
    packed = tuple(x for x in (teacher_logits, teacher_log_scale, student_log_scale) if x is not None)
    rows_fn = _rows(per_row, temperature, t_temperature, student_log_scale is not None, teacher_log_scale is not None)
    return rowwise(rows_fn, student_logits, packed, mask=mask, labels=labels, reduction=reduction,
                   chunk_size=chunk_size)


def uld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    student_log_scale: Tensor | None = None,
    teacher_log_scale: Tensor | None = None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Universal Logit Distillation: Σ_k |sort↓(p_s)_k − sort↓(p_t)_k| per aligned row, the narrower vocabulary
    zero-padded; p = softmax(z / T) · exp(log_scale) (a merged span's factor, see the module docstring).

    Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs".
    Defaults: temperature=1.0 (teacher_temperature=None: the same), reduction="mean", chunk_size=None.
    """
    return _cross_vocab(sorted_l1, student_logits, teacher_logits, temperature=temperature,
                        teacher_temperature=teacher_temperature, student_log_scale=student_log_scale,
                        teacher_log_scale=teacher_log_scale, mask=mask, labels=labels, reduction=reduction,
                        chunk_size=chunk_size)


def check_matched_ids(matched_ids: Tensor, student_vocab: int, teacher_vocab: int) -> None:
    """`matched_ids` must be `(M, 2)` integer (teacher id, student id) pairs, within both vocabularies, each id
    at most once (a one-to-one map)."""
    if matched_ids.dim() != 2 or matched_ids.shape[1] != 2 or matched_ids.is_floating_point():
        raise ValueError(f"matched_ids must be an (M, 2) integer tensor of (teacher id, student id) pairs, got "
                         f"{matched_ids.dtype} {tuple(matched_ids.shape)}")
    if matched_ids.numel():
        t_ids, s_ids = matched_ids[:, 0], matched_ids[:, 1]
        if int(t_ids.min()) < 0 or int(t_ids.max()) >= teacher_vocab:
            raise ValueError(f"matched_ids: a teacher id is outside the teacher's vocabulary of {teacher_vocab}")
        if int(s_ids.min()) < 0 or int(s_ids.max()) >= student_vocab:
            raise ValueError(f"matched_ids: a student id is outside the student's vocabulary of {student_vocab}")
        if t_ids.unique().numel() != len(t_ids) or s_ids.unique().numel() != len(s_ids):
            raise ValueError("matched_ids: every teacher id and every student id may appear at most once")


def gold_settings(beta: float, matched_weight: float | None, matched_ids: Tensor | None, student_vocab: int,
                  teacher_vocab: int) -> tuple[float, Tensor, float]:
    """GOLD's checked (β, matched ids, matched weight w): no `matched_ids` is none matched, w = M / V_t unless
    `matched_weight` is given."""
    beta = check_weight("beta", beta)
    if matched_ids is None:
        matched_ids = torch.zeros((0, 2), dtype=torch.long)
    check_matched_ids(matched_ids, student_vocab, teacher_vocab)
    if matched_weight is None:
        return beta, matched_ids, len(matched_ids) / teacher_vocab
    return beta, matched_ids, check_weight("matched_weight", matched_weight)


def gold(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    matched_ids: Tensor | None = None,
    beta: float = 0.5,
    matched_weight: float | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    student_log_scale: Tensor | None = None,
    teacher_log_scale: Tensor | None = None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """GOLD's hybrid: w·JSD_β(p_s^M, p_t^M) + (1 − w)·sorted-L1(p_s^U, p_t^U) per aligned row; M = the matched
    ids (`matched_ids`, `(M, 2)` (teacher id, student id) pairs), U = the rest of each vocabulary,
    w = M / V_t unless `matched_weight` is given. Without `matched_ids` (the task fills it in from the two
    tokenizers) every id counts as unmatched, which is `uld`.

    TRL `GOLDTrainer` (`uld_use_hybrid_loss=True`), after Boizard et al. 2024 (ULD) and Agarwal et al. 2024 (GKD).
    Defaults: beta=0.5, matched_weight=None (M / V_t), temperature=1.0, reduction="mean", chunk_size=None.
    """
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    beta, matched_ids, w = gold_settings(beta, matched_weight, matched_ids, v_s, v_t)
    device = student_logits.device
    t_matched = matched_ids[:, 0].to(device)
    s_matched = matched_ids[:, 1].to(device)
    t_rest = torch.ones(v_t, dtype=torch.bool, device=device).index_fill_(0, t_matched, False)
    s_rest = torch.ones(v_s, dtype=torch.bool, device=device).index_fill_(0, s_matched, False)

    def per_row(p_s: Tensor, p_t: Tensor) -> Tensor:
        value = p_s.new_zeros(p_s.shape[0])
        if len(t_matched):
            value = value + w * matched_jsd(p_s[:, s_matched], p_t[:, t_matched], beta)
        if bool(t_rest.any()) and bool(s_rest.any()):
            value = value + (1 - w) * sorted_l1(p_s[:, s_rest], p_t[:, t_rest])
        return value

    return _cross_vocab(per_row, student_logits, teacher_logits, temperature=temperature,
                        teacher_temperature=teacher_temperature, student_log_scale=student_log_scale,
                        teacher_log_scale=teacher_log_scale, mask=mask, labels=labels, reduction=reduction,
                        chunk_size=chunk_size)
