"""TAID: Temporally Adaptive Interpolated Distillation, a stateful logit objective.

Shing et al., ICLR 2025, "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge
Transfer in Language Models" (official code: SakanaAI/TAID, `src/distil_losses/taid.py`).

The student is trained towards a moving target that starts close to itself and drifts to the teacher. Per row,
with z = logits / T and sg = stop-gradient:

    p_t  = softmax((1 − t)·sg(z_s) + t·z_t)          (interpolation in logit space, student detached)
    loss = KL(p_t ‖ softmax(z_s)) = Σ p_t (log p_t − log softmax(z_s))

The interpolation weight t rises from `t_start` to `t_end` over training, faster while the loss keeps falling
(see `TAID.on_optimizer_step`). At t = 1 the loss is exactly `forward_kl`; at t = 0 the target is the student
itself, so the loss and its gradient are 0.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from ._rows import RowsFn, check_temperature, float32_rows, rowwise
from .divergences import _closed_form

_REL_EPS = 1e-15


def _check_unit(name: str, value: float) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    return float(value)


def _taid_rows(t: float) -> RowsFn:
    """Per-row KL(p_t ‖ softmax(s)) with p_t = softmax((1 − t)·sg(s) + t·z_t), float32 rows in, (n,) out.

    With a constant teacher the student gradient is taken in closed form, softmax(s) − p_t (the target is
    detached), in the same pass as the value; autograd through the formula below serves the other cases."""

    def target(s_fixed: Tensor, z_t: Tensor) -> Tensor:
        # The endpoints are taken as they are so that classes at -inf on both sides stay -inf (0·inf = nan).
        if t == 0.0:
            # Adding an exact zero keeps the teacher in the graph (with zero gradient), as chunked backward expects.
            return s_fixed + 0.0 * torch.where(torch.isfinite(z_t), z_t, 0.0)
        if t == 1.0:
            return z_t
        return (1.0 - t) * s_fixed + t * z_t

    def with_grad(s: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
        log_p = torch.log_softmax(target(s, z_t), -1)
        log_q = torch.log_softmax(s, -1)
        p = log_p.exp()
        values = (p * (log_p - log_q).masked_fill_(p == 0, 0.0)).sum(-1)
        return values, log_q.exp_().sub_(p)

    def rows(s: Tensor, z_t: Tensor) -> Tensor:
        mixed = target(s.detach(), z_t)
        log_p = mixed - torch.logsumexp(mixed, -1, keepdim=True)
        p = log_p.exp()
        lse_s = torch.logsumexp(s, -1, keepdim=True)
        with torch.no_grad():
            log_q = s - lse_s
            value = (p * (log_p - log_q).masked_fill_(p == 0, 0.0)).sum(-1)
        # The value is Σ p (log p − log q). The gradient comes from the equal (as Σ p = 1) expression
        # Σ p (log p − s) + logsumexp(s), whose student gradient softmax(s) − p_t has no stray Σ p_t factor and
        # so vanishes exactly at t = 0; its value is less precise (it cancels two terms of size logsumexp(s)).
        surrogate = (p * (log_p - s).masked_fill(p == 0, 0.0)).sum(-1) + lse_s.squeeze(-1)
        return value + (surrogate - surrogate.detach())

    return _closed_form(rows, with_grad)


class TAID(nn.Module):
    """TAID loss with its adaptive interpolation schedule; call it like a loss, step it once per optimizer step.

    `forward(student_logits, teacher_logits, *, mask=None, labels=None, reduction="mean")` returns
    KL(p_t ‖ p_s) per row with p_t = softmax((1 − t)·sg(z_s) + t·z_t), z = logits / temperature, reduced like
    the other divergences: `[..., C]` logits (token or classification), `mask` (bool, True = counted) or `labels`
    (-100 = ignored), reduction "mean" (over counted rows) | "sum" | "none" (0 at masked rows), float32 inside,
    `chunk_size` rows at a time when set. The official code minimises the cross-entropy H(p_t, p_s) instead:
    same gradient, value offset by the entropy of p_t. This value is the true KL (0 at a perfect match).

    Schedule. The training loop calls `on_optimizer_step(loss, step, total_steps)` once per optimizer step,
    after the step, with this objective's loss for that step. The first call only records the loss; every
    later call does

        rel      = (prev_loss − loss) / (prev_loss + 1e-15)
        momentum = β·momentum + (1 − β)·rel
        t_lin    = t_start + (t_end − t_start)·step / total_steps
        t        = min(t_end, max(t_lin, t + α·sigmoid(momentum)·(1 − t)))
        prev_loss = loss

    so t never falls behind the linear schedule and moves ahead of it while the loss improves. With
    `adaptive=False`, t = t_lin after every call. The official code updates t after every forward pass from the
    micro-batch loss; here it moves once per optimizer step from the loss of the whole step.

    State (buffers, saved by `state_dict()` and restored exactly by `load_state_dict()`): `t`, `prev_loss`,
    `momentum` (float64) and `has_prev_loss` (bool). The current t is readable as `current_t`.

    Defaults (paper / official code): t_start=0.4 (0.2 in some of the paper's pairs), t_end=1.0, alpha=5e-4,
    beta=0.99, adaptive=True; here also temperature=1.0, chunk_size=None.
    """

    t: Tensor
    prev_loss: Tensor
    momentum: Tensor
    has_prev_loss: Tensor
    t_start: float
    t_end: float
    alpha: float
    beta: float
    adaptive: bool
    temperature: float
    chunk_size: int | None

    def __init__(
        self,
        *,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
        temperature: float = 1.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.t_start = _check_unit("t_start", t_start)
        self.t_end = _check_unit("t_end", t_end)
        if self.t_end < self.t_start:
            raise ValueError(f"t_end must be >= t_start, got t_start={t_start!r} and t_end={t_end!r}")
        if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0.0 <= alpha < math.inf:
            raise ValueError(f"alpha must be a finite float >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.beta = _check_unit("beta", beta)
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be true or false, got {adaptive!r}")
        self.adaptive = adaptive
        self.temperature = check_temperature(temperature)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.register_buffer("t", torch.tensor(self.t_start, dtype=torch.float64))
        self.register_buffer("prev_loss", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("momentum", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("has_prev_loss", torch.tensor(False))

    @property
    def current_t(self) -> float:
        """The interpolation weight the next forward pass uses."""
        return float(self.t)

    def log_values(self) -> dict[str, float]:
        """What the training loop logs for this objective each step: the interpolation weight t."""
        return {"t": self.current_t}

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        *,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """KL(p_t ‖ softmax(z_s)) at the current t, reduced over the counted rows (see the class docstring)."""
        rows_fn = float32_rows(_taid_rows(self.current_t), self.temperature)
        return rowwise(
            rows_fn,
            student_logits,
            teacher_logits,
            mask=mask,
            labels=labels,
            reduction=reduction,
            chunk_size=self.chunk_size,
        )

    def on_optimizer_step(self, loss: float, step: int, total_steps: int) -> None:
        """Advance t after optimizer step `step` (1 after the first step) of `total_steps`.

        Call once per optimizer step, not per micro-batch, with this objective's unweighted loss averaged over
        all counted rows of the step (every micro-batch and process), so that every process computes the same t.
        """
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a single number, got a tensor of shape {tuple(loss.shape)}")
            loss = loss.item()
        if not isinstance(loss, numbers.Real) or isinstance(loss, bool) or not math.isfinite(loss):
            raise ValueError(f"loss must be a finite float, got {loss!r}")
        for name, value in (("step", step), ("total_steps", total_steps)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps!r}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        loss = float(loss)
        t_lin = self.t_start + (self.t_end - self.t_start) * min(step, total_steps) / total_steps
        if not self.adaptive:
            new_t = t_lin
        elif not bool(self.has_prev_loss):
            new_t = self.current_t
        else:
            prev = float(self.prev_loss)
            # A KL can come out a hair below 0 in float32; clamping keeps the denominator positive.
            rel = (prev - loss) / (max(prev, 0.0) + _REL_EPS)
            momentum = self.beta * float(self.momentum) + (1.0 - self.beta) * rel
            self.momentum.fill_(momentum)
            t = self.current_t
            delta = self.alpha * _sigmoid(momentum) * (1.0 - t)
            new_t = min(self.t_end, max(t_lin, t + delta))
        self.t.fill_(new_t)
        self.prev_loss.fill_(loss)
        self.has_prev_loss.fill_(True)

    def extra_repr(self) -> str:
        return (
            f"t={self.current_t:.6g}, t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, "
            f"beta={self.beta}, adaptive={self.adaptive}, temperature={self.temperature}, chunk_size={self.chunk_size}"
        )


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
