"""Logit divergences between a teacher and a student distribution over the last axis.

Notation: p_t = softmax(z_t / T), p_s = softmax(z_s / T), KL(p‖q) = Σ p (log p − log q) over the class axis.

Common arguments of every function here:

- `student_logits`, `teacher_logits`: `[..., C]`, same shape; every leading position is a row.
- `temperature` T > 0 divides both logits (default 1.0). `scale_t2=True` multiplies the result by T².
- `mask` (bool, shape `[...]`, True = counted) or `labels` (int, shape `[...]`, -100 = ignored), not both.
- `reduction`: "mean" (sum over counted rows / number of counted rows; 0 when none), "sum", or "none"
  (per-row values of shape `[...]`, 0 at masked rows).
- `chunk_size`: process this many rows at a time, forward and backward, so that the extra memory is bounded
  by one chunk; same values and gradients as the unchunked path.

Everything is computed in float32 whatever the input dtype, in log space, and returned as float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._rows import RowsFn, check_temperature, check_weight, float32_rows, rowwise

_LOG_FLOOR = -1e30


def _plogratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p (log p − log q) over the last axis, with 0 · log 0 = 0 (no NaN in values or gradients)."""
    return (p * (log_p - log_q).masked_fill_(p == 0, 0.0)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w · a + (1 − w) · b), computed from log a and log b."""
    if w == 1.0:
        return log_a
    if w == 0.0:
        return log_b
    # Flooring one side keeps logaddexp's gradient finite where both sides are -inf.
    return torch.logaddexp(log_a + math.log(w), (log_b + math.log1p(-w)).clamp_min_(_LOG_FLOOR))


class _ClosedFormRows(torch.autograd.Function):
    """Per-row values whose gradient with respect to the student logits is computed with them, in closed form.

    `value_and_grad(s, t)` returns the `(n,)` values and `∂values_i/∂s_i` `(n, C)` for a constant teacher;
    backward only scales that saved gradient by the incoming per-row gradient. Against autograd through the
    formula this saves most of the `(n, C)` temporaries autograd keeps, and the passes over them in backward.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, value_and_grad: Callable) -> Tensor:
        values, grad = value_and_grad(s, t)
        ctx.save_for_backward(grad)
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_values.unsqueeze(-1), None, None


def _closed_form(reference: RowsFn, value_and_grad: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> RowsFn:
    """A per-row function that takes the closed-form gradient when only the student needs one, and autograd
    through `reference` (the same formula) otherwise: no gradient wanted, or the teacher needs one too."""

    def rows(s: Tensor, t: Tensor) -> Tensor:
        if s.requires_grad and not t.requires_grad and torch.is_grad_enabled():
            return _ClosedFormRows.apply(s, t, value_and_grad)
        return reference(s, t)

    return rows


def _centred(q: Tensor, a: Tensor) -> Tensor:
    """The logit gradient q ⊙ (a − Σ q a) of a loss whose gradient in the probabilities q is `a` (in place on a);
    entries where q = 0 are 0 whatever `a` holds there."""
    a = a.masked_fill_(q == 0, 0.0)
    return a.sub_((q * a).sum(-1, keepdim=True)).mul_(q)


def _forward_kl_reference(s: Tensor, t: Tensor) -> Tensor:
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return _plogratio(log_t.exp(), log_t, log_s)


def _forward_kl_grad(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    # ∂/∂s KL(p ‖ q) = q − p
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    p = log_t.exp()
    values = _plogratio(p, log_t, log_s)
    return values, log_s.exp_().sub_(p)


def _reverse_kl_reference(s: Tensor, t: Tensor) -> Tensor:
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return _plogratio(log_s.exp(), log_s, log_t)


def _reverse_kl_grad(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    # ∂KL(q ‖ p)/∂q = log q − log p + 1; the constant cancels in q ⊙ (a − Σ q a)
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    q = log_s.exp()
    d = log_s.sub_(log_t)
    values = (q * d).masked_fill_(q == 0, 0.0).sum(-1)
    return values, _centred(q, d)


def _soft_cross_entropy_reference(s: Tensor, t: Tensor) -> Tensor:
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    p_t = log_t.exp()
    return -(p_t * log_s.masked_fill(p_t == 0, 0.0)).sum(-1)


def _soft_cross_entropy_grad(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    # ∂/∂s H(p, q) = q − p
    log_s, p = F.log_softmax(s, -1), F.softmax(t, -1)
    values = -(p * log_s.masked_fill(p == 0, 0.0)).sum(-1)
    return values, log_s.exp_().sub_(p)


_forward_kl_rows = _closed_form(_forward_kl_reference, _forward_kl_grad)
_reverse_kl_rows = _closed_form(_reverse_kl_reference, _reverse_kl_grad)
_soft_cross_entropy_rows = _closed_form(_soft_cross_entropy_reference, _soft_cross_entropy_grad)


def _jsd_rows(beta: float) -> RowsFn:
    if beta == 0.0:
        return _forward_kl_rows
    if beta == 1.0:
        return _reverse_kl_rows

    def reference(s: Tensor, t: Tensor) -> Tensor:
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        log_m = _log_mix(log_t, log_s, beta)
        kl_t = _plogratio(log_t.exp(), log_t, log_m)
        return beta * kl_t + (1 - beta) * _plogratio(log_s.exp(), log_s, log_m)

    def with_grad(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # ∂/∂q [β·KL(p‖m) + (1−β)·KL(q‖m)] = (1−β)·(log q − log m) + const, m = β·p + (1−β)·q
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        log_m = _log_mix(log_t, log_s, beta)
        kl_t = _plogratio(log_t.exp(), log_t, log_m)
        q = log_s.exp()
        d = log_s.sub_(log_m)
        kl_s = (q * d).masked_fill_(q == 0, 0.0).sum(-1)
        return beta * kl_t + (1 - beta) * kl_s, _centred(q, d.mul_(1 - beta))

    return _closed_form(reference, with_grad)


def _skew_rows(alpha: float) -> RowsFn:
    if alpha == 0.0:
        return _forward_kl_rows

    def reference(s: Tensor, t: Tensor) -> Tensor:
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        return _plogratio(log_t.exp(), log_t, _log_mix(log_t, log_s, alpha))

    def with_grad(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # ∂/∂q KL(p ‖ m) = −(1−α)·p / m, m = α·p + (1−α)·q; q ⊙ that = −(1−α)·p·exp(log q − log m)
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        log_m = _log_mix(log_t, log_s, alpha)
        p = log_t.exp()
        values = _plogratio(p, log_t, log_m)
        qa = (log_s - log_m).exp_().mul_(p).mul_(alpha - 1.0).masked_fill_(p == 0, 0.0)
        q = log_s.exp_()
        return values, qa.sub_(q * qa.sum(-1, keepdim=True))

    return _closed_form(reference, with_grad)


def _skew_reverse_rows(alpha: float) -> RowsFn:
    if alpha == 0.0:
        return _reverse_kl_rows

    def reference(s: Tensor, t: Tensor) -> Tensor:
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        return _plogratio(log_s.exp(), log_s, _log_mix(log_s, log_t, alpha))

    def with_grad(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # ∂/∂q KL(q ‖ m) = log q − log m + 1 − α·q / m, m = α·q + (1−α)·p
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        log_m = _log_mix(log_s, log_t, alpha)
        q = log_s.exp()
        d = log_s.sub_(log_m)
        values = (q * d).masked_fill_(q == 0, 0.0).sum(-1)
        a = d.sub_(d.exp().mul_(alpha))
        return values, _centred(q, a)

    return _closed_form(reference, with_grad)


def _tvd_reference(s: Tensor, t: Tensor) -> Tensor:
    return 0.5 * (F.softmax(t, -1) - F.softmax(s, -1)).abs().sum(-1)


def _tvd_grad(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    # ∂/∂q ½·Σ|p − q| = ½·sign(q − p)
    q, p = F.softmax(s, -1), F.softmax(t, -1)
    diff = q - p
    values = 0.5 * diff.abs().sum(-1)
    return values, _centred(q, diff.sign_().mul_(0.5))


_tvd_rows = _closed_form(_tvd_reference, _tvd_grad)


def _divergence(
    rows_fn: RowsFn,
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    mask: Tensor | None,
    labels: Tensor | None,
    reduction: str,
    scale_t2: bool,
    chunk_size: int | None,
) -> Tensor:
    temperature = check_temperature(temperature)
    out = rowwise(
        float32_rows(rows_fn, temperature),
        student_logits,
        teacher_logits,
        mask=mask,
        labels=labels,
        reduction=reduction,
        chunk_size=chunk_size,
    )
    return out * temperature**2 if scale_t2 else out


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Forward KL, KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s): mean-seeking, the classic KD loss.

    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network". The true KL (0 when the student
    matches the teacher), not the cross-entropy. With `reduction="mean"` and `scale_t2=True` on `(B, C)`
    logits it equals `KLDivLoss(reduction="batchmean")(log_softmax(z_s/T), softmax(z_t/T)) · T²`.
    Defaults: temperature=1.0, reduction="mean", scale_t2=False, chunk_size=None.
    """
    return _divergence(
        _forward_kl_rows, student_logits, teacher_logits, temperature, mask, labels, reduction, scale_t2, chunk_size
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Reverse KL, KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t): mode-seeking.

    Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models" (token-level form).
    Defaults: temperature=1.0, reduction="mean", scale_t2=False, chunk_size=None.
    """
    return _divergence(
        _reverse_kl_rows, student_logits, teacher_logits, temperature, mask, labels, reduction, scale_t2, chunk_size
    )


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Soft cross-entropy, H(p_t, p_s) = −Σ p_t log p_s = KL(p_t ‖ p_s) + H(p_t).

    Hinton et al. 2015; the form TextBrewer and DistiLLM call "KD". Same gradient as `forward_kl` for the
    student, but its value does not go to 0 (it is offset by the teacher entropy).
    Defaults: temperature=1.0, reduction="mean", scale_t2=False, chunk_size=None.
    """
    return _divergence(
        _soft_cross_entropy_rows, student_logits, teacher_logits, temperature, mask, labels, reduction, scale_t2,
        chunk_size,
    )


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Generalized Jensen-Shannon divergence, β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m), m = β·p_t + (1−β)·p_s.

    Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes" (GKD). β in [0, 1]; following TRL's GKD convention the endpoints are special-cased:
    β = 0 is exactly `forward_kl` and β = 1 exactly `reverse_kl` (the formula itself vanishes there).
    Defaults: beta=0.5, temperature=1.0, reduction="mean", scale_t2=False, chunk_size=None.
    """
    rows_fn = _jsd_rows(check_weight("beta", beta))
    return _divergence(
        rows_fn, student_logits, teacher_logits, temperature, mask, labels, reduction, scale_t2, chunk_size
    )


def js_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Jensen-Shannon divergence, ½·KL(p_t ‖ m) + ½·KL(p_s ‖ m), m = (p_t + p_s) / 2.

    SSLD's only loss (Cui et al. 2021, "Beyond Self-Supervision: A Simple Yet Effective Network Distillation
    Alternative to Improve Backbones"): symmetric, bounded by log 2, and 0 only when the two distributions are
    equal; with no label term it trains on unlabelled images. It is `generalized_jsd` at β = ½, named for the
    paper. Defaults: temperature=1.0 (the paper uses none), reduction="mean", scale_t2=False, chunk_size=None.
    """
    return _divergence(
        _jsd_rows(0.5), student_logits, teacher_logits, temperature, mask, labels, reduction, scale_t2, chunk_size
    )


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Skew KL, KL(p_t ‖ α·p_t + (1−α)·p_s).

    Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models" (as a true KL,
    not a cross-entropy). α in [0, 1]; α = 0 gives `forward_kl`, α = 1 gives 0.
    Defaults: alpha=0.1, temperature=1.0, reduction="mean", scale_t2=False, chunk_size=None.
    """
    rows_fn = _skew_rows(check_weight("alpha", alpha))
    return _divergence(
        rows_fn, student_logits, teacher_logits, temperature, mask, labels, reduction, scale_t2, chunk_size
    )


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Skew reverse KL, KL(p_s ‖ (1−α)·p_t + α·p_s).

    Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models" (as a true KL,
    not a cross-entropy). α in [0, 1]; α = 0 gives `reverse_kl`, α = 1 gives 0.
    Defaults: alpha=0.1, temperature=1.0, reduction="mean", scale_t2=False, chunk_size=None.
    """
    rows_fn = _skew_reverse_rows(check_weight("alpha", alpha))
    return _divergence(
        rows_fn, student_logits, teacher_logits, temperature, mask, labels, reduction, scale_t2, chunk_size
    )


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Total variation distance, ½ Σ |p_t − p_s|, in [0, 1] per row.

    Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation".
    Defaults: temperature=1.0, reduction="mean", scale_t2=False, chunk_size=None.
    """
    return _divergence(
        _tvd_rows, student_logits, teacher_logits, temperature, mask, labels, reduction, scale_t2, chunk_size
    )
