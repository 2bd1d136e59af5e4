"""Cross-tokenizer KL on the student's first token of each aligned span: the teacher's next-token distribution
mapped onto the student's vocabulary by the text its tokens start with.

GOLD's matched term (`potstill.losses.uld.gold`) compares p_t and p_s entry by entry on the tokens both
vocabularies hold. Where the teacher writes a span as one token that the student needs several for (teacher
" understanding", student " under" "stand" "ing"), it compares the student's " under" with the teacher's
probability of the *token* " under", which a teacher that means " understanding" gives almost nothing: the
target is far too small and pulls the student away from the right first token. The probability that the text
continues with the bytes " under" is the teacher's mass on every token that starts with them (Phan et al. 2024,
"Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles", the
prefix-covering view of a tokenized LM). So each teacher id t goes to the student token π(t) its text starts with
(`potstill.data.token_alignment.first_token_map`: the longest student token whose bytes begin t's), and

    q(s) = Σ_{t: π(t) = s} p_t(t),    p_t = softmax(z_t / T_t),
    L = KL(q ‖ p_s) = Σ_s q(s) (log q(s) − log p_s(s)),    p_s = softmax(z_s / T),

at the row that predicts the span's first token on each side (unmerged: the later tokens of the span are left to
the student's own cross-entropy). q is a distribution over the student's vocabulary (teacher ids with
π(t) = −1, special tokens the student lacks, are dropped, so it may sum to a little less than 1); L is 0 when the
student's first-token distribution is q. The map is exact for a teacher token that the student would start with
its longest-prefix token; a student whose BPE starts the same text with a shorter token gets that mass at the
longer one. This is potstill's own cross-tokenizer loss, not a published method; `benchmarks/cross_tokenizer.py`
measures it against GOLD and fine-tuning.

Top-k teacher (`first_token_kl_topk`, a cached teacher): the k cached probabilities go to their π, and the tail
mass is shared evenly by the other V_t − k teacher ids before the map (as `potstill.losses.uld_topk` spreads
it), so each student id s also gets tail / (V_t − k) for every uncached teacher id with π(t) = s. Equal to the
dense form on that spread teacher vector, and to the live teacher when k = V_t.

Arguments: `student_logits` `[..., V_s]`; `teacher_logits` `[..., V_t]` (or a `TopKTeacher` with rows `[...]`
and `teacher_vocab` V_t); `first_token_of` `[V_t]` long (π; −1 = dropped); `temperature` divides the student's
logits and the teacher's unless `teacher_temperature` is given (a cached teacher was taken at its cache's
temperature: the student's only); `mask` / `labels`, `reduction`, `chunk_size` as the other row losses.
Float32 throughout. Defaults: temperature=1.0, reduction="mean", chunk_size=None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import check_temperature, rowwise
from .sparse import TopKTeacher
from .uld_topk import check_topk_teacher, share_log

__all__ = ["first_token_kl", "first_token_kl_topk", "project_to_first_tokens"]


def _routes(first_token_of: Tensor, teacher_vocab: int, student_vocab: int, device: torch.device) -> Tensor:
    """π checked, with −1 sent to an extra column `student_vocab` (dropped after the sum)."""
    if first_token_of.dim() != 1 or first_token_of.is_floating_point() or len(first_token_of) != teacher_vocab:
        raise ValueError(f"first_token_of must be a 1-D integer tensor of the teacher's vocabulary size "
                         f"{teacher_vocab}, got {first_token_of.dtype} {tuple(first_token_of.shape)}")
    if len(first_token_of) and (int(first_token_of.min()) < -1 or int(first_token_of.max()) >= student_vocab):
        raise ValueError(f"first_token_of: ids must be -1 or within the student's vocabulary of {student_vocab}")
    routes = first_token_of.to(device)
    return torch.where(routes < 0, torch.full_like(routes, student_vocab), routes)


def project_to_first_tokens(teacher_probs: Tensor, first_token_of: Tensor, student_vocab: int) -> Tensor:
    """q `[n, V_s]`: q[:, s] = Σ_{t: π(t) = s} teacher_probs[:, t] for `(n, V_t)` probabilities."""
    routes = _routes(first_token_of, teacher_probs.shape[-1], student_vocab, teacher_probs.device)
    q = teacher_probs.new_zeros(teacher_probs.shape[0], student_vocab + 1)
    return q.index_add_(1, routes, teacher_probs)[:, :student_vocab]


def _kl_to_student(q: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """Σ_s q(s) (log q(s) − log p_s(s)) per row, 0 · log 0 = 0."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (torch.xlogy(q, q) - q * log_p_s).sum(-1)


def first_token_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    first_token_of: Tensor,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """KL(q ‖ p_s) per aligned span, q the teacher's next-token distribution summed onto the student token each
    teacher token's text starts with (`first_token_of`, π). See the module docstring.
    Defaults: temperature=1.0 (teacher_temperature=None: the same), reduction="mean", chunk_size=None."""
    temperature = check_temperature(temperature)
    t_temperature = temperature if teacher_temperature is None else check_temperature(teacher_temperature)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student and teacher logits must have the same row shape, got student "
                         f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}")
    v_s = student_logits.shape[-1]
    _routes(first_token_of, teacher_logits.shape[-1], v_s, student_logits.device)

    def rows(s: Tensor, t: tuple[Tensor]) -> Tensor:
        p_t = F.softmax(t[0].float() / t_temperature, dim=-1)
        return _kl_to_student(project_to_first_tokens(p_t, first_token_of, v_s), s, temperature)

    return rowwise(rows, student_logits, (teacher_logits,), mask=mask, labels=labels, reduction=reduction,
                   chunk_size=chunk_size)


def first_token_kl_topk(
    student_logits: Tensor,
    teacher: TopKTeacher,
    *,
    teacher_vocab: int,
    first_token_of: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """`first_token_kl` against a top-k teacher (normalised log-probs over V_t = `teacher_vocab`), its tail mass
    shared evenly by the other V_t − k ids before the map. Defaults: temperature=1.0 (the student's),
    reduction="mean", chunk_size=None."""
    temperature = check_temperature(temperature)
    check_topk_teacher(student_logits, teacher, teacher_vocab, {})
    v_s = student_logits.shape[-1]
    routes = _routes(first_token_of, teacher_vocab, v_s, student_logits.device)
    per_student_id = torch.bincount(routes, minlength=v_s + 1).float()  # teacher ids behind each student id
    share = share_log(teacher.tail().float(), teacher.k, teacher_vocab).exp()  # 0 when k = V_t

    def rows(s: Tensor, packed: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        ids, logprobs, share_n = packed
        q = share_n[:, None] * per_student_id[None, :]
        q = q.scatter_add_(1, routes[ids], logprobs.float().exp() - share_n[:, None])  # cached ids: p, not share
        return _kl_to_student(q[:, :v_s].clamp_min(0.0), s, temperature)

    return rowwise(rows, student_logits, (teacher.ids, teacher.logprobs, share), mask=mask, labels=labels,
                   reduction=reduction, chunk_size=chunk_size)
