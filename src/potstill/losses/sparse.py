"""Sparse (top-k) logit divergences: the teacher is known only at its k most likely tokens per row.

A top-k teacher (`TopKTeacher`) gives, per row, k token ids, the teacher's log-probabilities at those ids
(log-softmax over the full vocabulary at the cache temperature) and the log of the mass left outside them
(the tail). Every divergence here is the dense divergence of the same name applied to two (k+1)-way
distributions, "the k ids + one tail bucket":

    p = (exp ℓ_1, …, exp ℓ_k, exp ℓ_tail)                  teacher, renormalised to sum to 1
    q = (q_{id_1}, …, q_{id_k}, 1 − Σ_j q_{id_j})           student, q = softmax(z_s / T) over the vocabulary

The student's tail is computed as the log-sum-exp of its log-probs outside the k ids (no cancellation, so
a small tail stays accurate). When the ids cover the whole vocabulary (k = V) there is no tail bucket and
every function equals its dense counterpart in `potstill.losses.divergences`.

The teacher's buckets are renormalised before use: they sum to 1 up to storage rounding (float16 log-probs),
and renormalising keeps every KL ≥ 0 and the TVD in [0, 1].

Temperature: the stored log-probs were computed at the cache's temperature and cannot be re-tempered
(the tail is a single number), so `temperature` here divides the student logits only. A recipe must use the
cache's temperature (`TopKCache.temperature`); the caller checks that. `scale_t2` multiplies by T².

Common arguments, as in `divergences.py`: `mask` (bool, the row shape, True = counted) or `labels`
(-100 = ignored), `reduction` ("mean" | "sum" | "none"), `chunk_size` (rows per chunk, so the extra memory is
O(chunk_size × V) beyond the student-sized gradient)). Computed in float32, returned as float32.

Anchors: DistillKit's `symmetric_uniform` missing-mass bucket and TRL's server top-k tail bucket
log(1 − Σ_k exp ℓ_k) use the same (k+1)-way construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._rows import check_temperature, check_weight, rowwise
from .divergences import (
    _forward_kl_rows,
    _jsd_rows,
    _reverse_kl_rows,
    _skew_reverse_rows,
    _skew_rows,
    _soft_cross_entropy_rows,
    _tvd_rows,
)

__all__ = [
    "TopKTeacher",
    "sparse_forward_kl",
    "sparse_generalized_jsd",
    "sparse_reverse_kl",
    "sparse_skew_kl",
    "sparse_skew_reverse_kl",
    "sparse_soft_cross_entropy",
    "sparse_tvd",
    "sparse_version",
    "tail_from_logprobs",
]

# When the tail is derived from the top-k log-probs, 1 − Σ exp ℓ is floored at this mass: rounding can make
# the sum reach or pass 1, and a zero teacher tail would make reverse-type divergences infinite.
TAIL_MASS_FLOOR = 1e-6


def tail_from_logprobs(logprobs: Tensor) -> Tensor:
    """log(1 − Σ_k exp ℓ_k) over the last axis, in float32, with the mass floored at `TAIL_MASS_FLOOR`."""
    lse = torch.logsumexp(logprobs.float(), -1)
    return torch.log((-torch.expm1(lse)).clamp_min(TAIL_MASS_FLOOR))


@dataclass(frozen=True)
class TopKTeacher:
    """A teacher known at its top k tokens per row.

    - `ids`: int64 `[..., k]`, the token ids (distinct within a row).
    - `logprobs`: float `[..., k]`, the teacher's log-softmax over the full vocabulary at the cache
      temperature, at `ids`, sorted descending.
    - `tail_logprob`: float `[...]` or None, log of the teacher mass outside `ids` (-inf = none). When None,
      `tail()` derives it from the log-probs (`tail_from_logprobs`); a stored exact tail is better.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids.is_floating_point() or self.ids.is_complex() or self.ids.dtype == torch.bool:
            raise ValueError(f"TopKTeacher.ids must be an integer tensor, got {self.ids.dtype}")
        if not self.logprobs.is_floating_point():
            raise ValueError(f"TopKTeacher.logprobs must be a float tensor, got {self.logprobs.dtype}")
        if self.ids.dim() == 0 or self.ids.shape != self.logprobs.shape:
            raise ValueError(
                f"TopKTeacher.ids and .logprobs must have the same shape [..., k], got {tuple(self.ids.shape)} "
                f"and {tuple(self.logprobs.shape)}"
            )
        if self.tail_logprob is not None and self.tail_logprob.shape != self.shape:
            raise ValueError(
                f"TopKTeacher.tail_logprob must have the row shape {tuple(self.shape)}, "
                f"got {tuple(self.tail_logprob.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        """The row axes, `ids.shape[:-1]` (e.g. `[B, T]`)."""
        return self.ids.shape[:-1]

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def tail(self) -> Tensor:
        """The log tail mass `[...]`: `tail_logprob` when given, else derived from the log-probs."""
        return tail_from_logprobs(self.logprobs) if self.tail_logprob is None else self.tail_logprob

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TopKTeacher:
        """The same teacher on `device` (ids as int64)."""
        tail = self.tail_logprob
        return TopKTeacher(
            self.ids.to(device=device, dtype=torch.int64, non_blocking=non_blocking),
            self.logprobs.to(device=device, non_blocking=non_blocking),
            None if tail is None else tail.to(device=device, non_blocking=non_blocking),
        )


class _StudentBuckets(torch.autograd.Function):
    """The student's log-probs over the (k+1) buckets `[n, k+1]`: the k teacher ids, then everything else.

    Forward: one exp pass over `[n, V]` (the tail is the sum of exp outside the ids, exact: no 1 − Σ
    cancellation). Backward, with g the gradient on the buckets and G = Σ_b g_b per row:
    ∂/∂z_j = q_j·(g_tail / q_tail − G) outside the ids, g_i − q_{id_i}·G at id i, i.e. one exp pass that
    writes the gradient in place, then a scatter at the ids. A tail of zero mass gives log q_tail = -inf and
    no gradient through it (instead of NaN).
    """

    @staticmethod
    def forward(ctx, s: Tensor, ids: Tensor) -> Tensor:
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = (s - m).exp_()
        total = e.sum(-1, keepdim=True)
        rest = e.scatter_(-1, ids, 0.0).sum(-1, keepdim=True)
        del e
        log_total = total.log()
        lse = m + log_total
        q_rest = rest / total
        ctx.save_for_backward(s, lse, q_rest)
        ctx.ids = ids  # a constant (integers): kept outside autograd, so an inference-mode teacher is fine
        return torch.cat([s.gather(-1, ids) - lse, rest.log() - log_total], -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        s, lse, q_rest = ctx.saved_tensors
        ids = ctx.ids
        g_total = grad.sum(-1, keepdim=True)
        per_rest = torch.where(q_rest > 0, grad[:, -1:] / q_rest.clamp_min(torch.finfo(q_rest.dtype).tiny), 0.0)
        out = (s - lse).exp_().mul_(per_rest - g_total)
        q_top = (s.gather(-1, ids) - lse).exp()
        out.scatter_(-1, ids, grad[:, :-1] - q_top * g_total)
        return out, None


def _sparse_rows(dense_rows: Callable[[Tensor, Tensor], Tensor], temperature: float):
    """Per-row function of (student logits `(n, V)`, (ids, logprobs[, tail])) for `rowwise`."""

    def rows(s: Tensor, parts: tuple[Tensor, ...]) -> Tensor:
        ids, logprobs = parts[0], parts[1].float()
        s = s.float()
        if temperature != 1.0:
            s = s / temperature
        if ids.shape[-1] == s.shape[-1]:  # the ids are the whole vocabulary: no tail bucket
            return dense_rows(F.log_softmax(s, -1).gather(-1, ids), logprobs)
        tail_t = parts[2].float() if len(parts) > 2 else tail_from_logprobs(logprobs)
        student = _StudentBuckets.apply(s, ids)
        teacher = torch.cat([logprobs, tail_t.unsqueeze(-1)], -1)
        # The dense row functions take logits: their log-softmax renormalises the teacher's buckets and is
        # the identity (values and gradients) on the student's already normalised ones.
        return dense_rows(student, teacher)

    return rows


def _check_teacher(student_logits: Tensor, teacher: TopKTeacher) -> tuple[Tensor, ...]:
    if not isinstance(teacher, TopKTeacher):
        raise TypeError(f"teacher must be a TopKTeacher, got {type(teacher).__name__}")
    if student_logits.dim() == 0:
        raise ValueError("student logits must have at least one dimension (the vocabulary axis), got a scalar")
    rows, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if teacher.shape != rows:
        raise ValueError(
            f"the top-k teacher's row shape {tuple(teacher.shape)} must equal the student logits' row shape "
            f"{tuple(rows)} (student logits {tuple(student_logits.shape)})"
        )
    if teacher.k > vocab:
        raise ValueError(f"the top-k teacher has k={teacher.k} ids per row but the student vocabulary is {vocab}")
    ids = teacher.ids
    if ids.device != student_logits.device:
        raise ValueError(
            f"the top-k teacher is on {ids.device} but the student logits are on {student_logits.device}; "
            "use teacher.to(device)"
        )
    if ids.numel() and (bool((ids.min() < 0) | (ids.max() >= vocab))):
        raise ValueError(
            f"top-k teacher ids must be in [0, {vocab}), got ids from {int(ids.min())} to {int(ids.max())}"
        )
    parts: tuple[Tensor, ...] = (ids.long(), teacher.logprobs)
    if teacher.tail_logprob is not None:
        parts += (teacher.tail_logprob,)
    return parts


def _sparse_divergence(
    dense_rows: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher: TopKTeacher,
    temperature: float,
    mask: Tensor | None,
    labels: Tensor | None,
    reduction: str,
    scale_t2: bool,
    chunk_size: int | None,
) -> Tensor:
    temperature = check_temperature(temperature)
    parts = _check_teacher(student_logits, teacher)
    out = rowwise(
        _sparse_rows(dense_rows, temperature),
        student_logits,
        parts,
        mask=mask,
        labels=labels,
        reduction=reduction,
        chunk_size=chunk_size,
    )
    return out * temperature**2 if scale_t2 else out


def sparse_forward_kl(
    student_logits: Tensor,
    teacher: TopKTeacher,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Forward KL on the (k+1)-way buckets, KL(p ‖ q) = Σ p (log p − log q). Sparse `forward_kl`.

    Hinton et al. 2015; top-k form as in DistillKit / TRL. Defaults: temperature=1.0 (student only),
    reduction="mean", scale_t2=False, chunk_size=None.
    """
    return _sparse_divergence(
        _forward_kl_rows, student_logits, teacher, temperature, mask, labels, reduction, scale_t2, chunk_size
    )


def sparse_reverse_kl(
    student_logits: Tensor,
    teacher: TopKTeacher,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Reverse KL on the (k+1)-way buckets, KL(q ‖ p). Sparse `reverse_kl` (Gu et al. 2024, MiniLLM).

    Defaults: temperature=1.0 (student only), reduction="mean", scale_t2=False, chunk_size=None.
    """
    return _sparse_divergence(
        _reverse_kl_rows, student_logits, teacher, temperature, mask, labels, reduction, scale_t2, chunk_size
    )


def sparse_soft_cross_entropy(
    student_logits: Tensor,
    teacher: TopKTeacher,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Soft cross-entropy on the (k+1)-way buckets, H(p, q) = −Σ p log q. Sparse `soft_cross_entropy`.

    Defaults: temperature=1.0 (student only), reduction="mean", scale_t2=False, chunk_size=None.
    """
    return _sparse_divergence(
        _soft_cross_entropy_rows, student_logits, teacher, temperature, mask, labels, reduction, scale_t2,
        chunk_size,
    )


def sparse_generalized_jsd(
    student_logits: Tensor,
    teacher: TopKTeacher,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Generalized JSD on the (k+1)-way buckets, β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q.

    Agarwal et al. 2024 (GKD). β = 0 is exactly `sparse_forward_kl`, β = 1 exactly `sparse_reverse_kl`.
    Defaults: beta=0.5, temperature=1.0 (student only), reduction="mean", scale_t2=False, chunk_size=None.
    """
    rows_fn = _jsd_rows(check_weight("beta", beta))
    return _sparse_divergence(rows_fn, student_logits, teacher, temperature, mask, labels, reduction, scale_t2,
                              chunk_size)


def sparse_skew_kl(
    student_logits: Tensor,
    teacher: TopKTeacher,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Skew KL on the (k+1)-way buckets, KL(p ‖ α·p + (1−α)·q) (Ko et al. 2024, DistiLLM).

    Defaults: alpha=0.1, temperature=1.0 (student only), reduction="mean", scale_t2=False, chunk_size=None.
    """
    rows_fn = _skew_rows(check_weight("alpha", alpha))
    return _sparse_divergence(rows_fn, student_logits, teacher, temperature, mask, labels, reduction, scale_t2,
                              chunk_size)


def sparse_skew_reverse_kl(
    student_logits: Tensor,
    teacher: TopKTeacher,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Skew reverse KL on the (k+1)-way buckets, KL(q ‖ (1−α)·p + α·q) (Ko et al. 2024, DistiLLM).

    Defaults: alpha=0.1, temperature=1.0 (student only), reduction="mean", scale_t2=False, chunk_size=None.
    """
    rows_fn = _skew_reverse_rows(check_weight("alpha", alpha))
    return _sparse_divergence(rows_fn, student_logits, teacher, temperature, mask, labels, reduction, scale_t2,
                              chunk_size)


def sparse_tvd(
    student_logits: Tensor,
    teacher: TopKTeacher,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Total variation on the (k+1)-way buckets, ½ Σ |p − q|, in [0, 1]. Sparse `tvd` (Wen et al. 2023).

    A lower bound of the dense TVD (merging tokens into the tail bucket can only shrink it).
    Defaults: temperature=1.0 (student only), reduction="mean", scale_t2=False, chunk_size=None.
    """
    return _sparse_divergence(
        _tvd_rows, student_logits, teacher, temperature, mask, labels, reduction, scale_t2, chunk_size
    )


_SPARSE = {
    "forward_kl": sparse_forward_kl,
    "reverse_kl": sparse_reverse_kl,
    "soft_cross_entropy": sparse_soft_cross_entropy,
    "generalized_jsd": sparse_generalized_jsd,
    "skew_kl": sparse_skew_kl,
    "skew_reverse_kl": sparse_skew_reverse_kl,
    "tvd": sparse_tvd,
}


def sparse_version(name: str) -> Callable[..., Tensor] | None:
    """The sparse function for the dense divergence `name` ("forward_kl", …), or None when there is none.

    The sparse function takes the same keyword arguments as the dense one, with a `TopKTeacher` in place
    of the teacher logits.
    """
    return _SPARSE.get(name)
