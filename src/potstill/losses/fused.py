"""Fused lm_head + divergence: the student's full `[tokens, V]` logits never exist.

`fused_linear_divergence(h, W, z_t)` equals `divergence(h @ W.T (+ b), z_t)` for the logit divergences of
`divergences.py` (same conventions: mask / labels, temperature, reduction, `scale_t2`, float32 math), but
computes the student logits `chunk_size` counted rows at a time (see the gradient strategy below), so the
largest live temporaries are a few `[chunk_size, V]` float32 tensors instead of several `[tokens, V]` ones.
With a `TopKTeacher` (a cached teacher) in place of `z_t` it equals the sparse divergence of `sparse.py`;
then no `[tokens, V]` tensor exists on either side. `fused_linear_cross_entropy(h, W, y)` is the hard-label
token cross-entropy by the same machinery. `LMHeadInputs` is the student signal that carries `h`, `W`, `b`
through the training loop (`trainer.fused_lm_head`).

Gradient strategy, for `reduction="sum"` or `"mean"` under grad mode (training): gradients taken in forward.
Each chunk's logits are formed, its per-row divergence differentiated with respect to them right away (`g`),
and turned into the chunk's hidden-state gradient (`g @ W`) and a contribution to the weight / bias gradients
(`gᵀ @ h`, `Σ g`); backward only scales these by the incoming scalar gradient. That is 3 matmuls per chunk
and one pass of the divergence, the same work as the unfused path (logits, then `g @ W` and `gᵀ @ h` in the
head's backward). The price is memory held from the loss's forward to its backward: the `[tokens, H]` and
`[V, H]` float32 gradients (for H=4096, V=128k, 2 GiB). The loss is the last thing a training step computes
before backward, whose first step (the head's) allocates a `[V, H]` weight gradient anyway, so the peak barely
moves; it stays far below the `[tokens, V]` logits and logit gradient that the unfused path holds there.
Backward scales the held gradients in place, so a second backward through the same graph (`retain_graph`)
raises autograd's in-place error rather than return a wrong gradient.

With `reduction="none"` the weight gradient `Σ_i g_i · (∂ℓ_i/∂z_i)ᵀ h_i` depends on per-row incoming gradients
`g_i` unknown until backward, so forward keeps only its inputs and backward recomputes each chunk's logits and
divergence (4 matmuls and two passes of the divergence per chunk). A forward-only use (evaluation,
`torch.no_grad`) pays for no gradient at all.

Numerics: the matmul and the divergence are done in float32 whatever the input dtypes (a bf16 weight is
upcast once per pass, `V × H` float32, small next to the logits it replaces); the returned gradients have the
dtypes of the inputs. The teacher logits are a constant (no gradient is returned for them).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._rows import (
    IGNORE_INDEX,
    RowsFn,
    _call,
    _take,
    check_reduction,
    check_temperature,
    check_weight,
    float32_rows,
    reduce_rows,
    resolve_mask,
)
from .divergences import (
    _forward_kl_rows,
    _jsd_rows,
    _reverse_kl_rows,
    _skew_reverse_rows,
    _skew_rows,
    _soft_cross_entropy_rows,
    _tvd_rows,
)
from .sparse import TopKTeacher, _sparse_rows

__all__ = ["FUSED_DIVERGENCES", "LMHeadInputs", "fused_linear_cross_entropy", "fused_linear_divergence"]


@dataclass(frozen=True)
class LMHeadInputs:
    """A student signal given as the inputs of its output layer instead of its logits.

    `hidden` `[..., H]` are the student's last hidden states, `weight` `[V, H]` / `bias` `[V]` (or None) its
    lm_head; `vocab_size` the real token ids compared (a padded vocabulary is cut to it; None = all V).
    The logits `hidden @ weight.T + bias` are never formed whole: the divergences take this signal through
    `fused_linear_divergence`, the hard-label loss through `fused_linear_cross_entropy`.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    vocab_size: int | None = None

    @property
    def shape(self) -> torch.Size:
        """The row axes, `hidden.shape[:-1]` (e.g. `[B, T]`)."""
        return self.hidden.shape[:-1]


def _no_params(rows_fn: RowsFn) -> Callable[..., RowsFn]:
    def build() -> RowsFn:
        return rows_fn

    return build


def _build_jsd(beta: float = 0.5) -> RowsFn:
    return _jsd_rows(check_weight("beta", beta))


def _build_skew(alpha: float = 0.1) -> RowsFn:
    return _skew_rows(check_weight("alpha", alpha))


def _build_skew_reverse(alpha: float = 0.1) -> RowsFn:
    return _skew_reverse_rows(check_weight("alpha", alpha))


# name -> builder(**divergence_params) -> per-row function; defaults match divergences.py.
FUSED_DIVERGENCES: dict[str, Callable[..., RowsFn]] = {
    "forward_kl": _no_params(_forward_kl_rows),
    "reverse_kl": _no_params(_reverse_kl_rows),
    "soft_cross_entropy": _no_params(_soft_cross_entropy_rows),
    "generalized_jsd": _build_jsd,
    "skew_kl": _build_skew,
    "skew_reverse_kl": _build_skew_reverse,
    "tvd": _no_params(_tvd_rows),
}


def _rows_fn(divergence: str, params: dict) -> RowsFn:
    if divergence not in FUSED_DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(FUSED_DIVERGENCES)}, got {divergence!r}")
    try:
        return FUSED_DIVERGENCES[divergence](**params)
    except TypeError:
        raise ValueError(
            f"unknown parameter(s) {sorted(params)} for divergence {divergence!r}"
        ) from None


def _chunk_logits(h: Tensor, weight32: Tensor, bias32: Tensor | None) -> Tensor:
    h = h.float()
    return h @ weight32.t() if bias32 is None else torch.addmm(bias32, h, weight32.t())


class _FusedLinearRows(torch.autograd.Function):
    """Per-row values of `rows_fn(h @ W[:vocab].T (+ b), teacher rows)` over the rows `idx`, a chunk at a time.

    The teacher is one or more constant tensors with the rows on their first axis (`packed` says whether
    `rows_fn` gets them as a tuple). Autocast is off inside: the matmul and the loss run in float32.
    `summed`: return the sum of the values and take the gradients during forward (see the module docstring);
    otherwise return the `(n,)` values and recompute each chunk in backward.
    """

    @staticmethod
    def forward(ctx, idx, rows_fn, chunk_size, packed, vocab, summed, hidden, weight, bias, *teacher):
        n = hidden.shape[0] if idx is None else idx.numel()
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        needs = ctx.needs_input_grad[6:9] if summed else (False, False, False)
        grads = _HeadGrads(hidden, weight, bias, idx, needs, vocab, float32_h=True)
        with torch.autocast(hidden.device.type, enabled=False):
            weight32 = weight[:vocab].float()
            bias32 = None if bias is None else bias[:vocab].float()
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                h = _take(hidden, idx, start, stop).float()
                parts = [_take(t, idx, start, stop) for t in teacher]
                if not any(needs):
                    logits = _chunk_logits(h, weight32, bias32)
                    out[start:stop] = _call(rows_fn, logits, parts, packed)
                    del logits
                    continue
                out[start:stop] = grads.add_chunk(rows_fn, packed, h, weight32, bias32, parts, start, stop, None)
        ctx.rows_fn, ctx.chunk_size, ctx.vocab, ctx.n, ctx.packed, ctx.summed = (
            rows_fn, chunk_size, vocab, n, packed, summed)
        if summed:
            ctx.save_for_backward(*(g for g in (grads.h, grads.w, grads.b) if g is not None))
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            ctx.needs = needs
            return out.sum()
        ctx.save_for_backward(idx, hidden, weight, bias)
        ctx.teacher = teacher  # constants (no gradient): kept outside autograd, so inference tensors are fine
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.summed:  # gradients of the sum, taken in forward: scale them in place (a second backward raises)
            saved = iter(ctx.saved_tensors)
            scaled = [next(saved).mul_(grad_out).to(dtype) if need else None
                      for need, dtype in zip(ctx.needs, ctx.dtypes, strict=True)]
            return (None, None, None, None, None, None, *scaled, *([None] * (len(ctx.needs_input_grad) - 9)))
        idx, hidden, weight, bias = ctx.saved_tensors
        teacher = ctx.teacher
        grads = _HeadGrads(hidden, weight, bias, idx, ctx.needs_input_grad[6:9], ctx.vocab)
        with torch.autocast(hidden.device.type, enabled=False):
            weight32 = weight[:ctx.vocab].float()
            bias32 = None if bias is None else bias[:ctx.vocab].float()
            for start in range(0, ctx.n, ctx.chunk_size):
                stop = min(start + ctx.chunk_size, ctx.n)
                h = _take(hidden, idx, start, stop).float()
                parts = [_take(t, idx, start, stop) for t in teacher]
                grads.add_chunk(ctx.rows_fn, ctx.packed, h, weight32, bias32, parts, start, stop,
                                grad_out[start:stop])
        done = (
            grads.h,
            None if grads.w is None else grads.w.to(weight.dtype),
            None if grads.b is None else grads.b.to(bias.dtype),
        )
        return (None, None, None, None, None, None, *done, *([None] * len(teacher)))


class _HeadGrads:
    """Gradients of a weighted sum of per-row values with respect to the lm_head's input, weight and bias,
    accumulated a chunk at a time: `g @ W` for the chunk's hidden rows, `gᵀ @ h` and `Σ g` summed over chunks,
    where `g` is the gradient of the weighted values with respect to the chunk's logits."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor | None,
                 needs: tuple[bool, ...], vocab: int, float32_h: bool = False) -> None:
        need_h, need_w, need_b = needs
        self.idx, self.vocab = idx, vocab
        self.h = None
        if need_h:
            dtype = torch.float32 if float32_h and hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
            self.h = (torch.empty_like if idx is None else torch.zeros_like)(hidden, dtype=dtype)
        # float32 accumulators over the full (possibly padded) vocab; ids >= vocab get 0.
        self.w = weight.new_zeros(weight.shape, dtype=torch.float32) if need_w else None
        self.b = bias.new_zeros(bias.shape, dtype=torch.float32) if need_b and bias is not None else None

    def add_chunk(self, rows_fn: Callable, packed: bool, h: Tensor, weight32: Tensor, bias32: Tensor | None,
                  parts: list[Tensor], start: int, stop: int, row_weights: Tensor | None) -> Tensor:
        """Add the chunk of rows `start:stop` (hidden `h`, float32) with per-row weights (None: 1 each);
        return its per-row values."""
        logits = _chunk_logits(h, weight32, bias32).requires_grad_(True)
        with torch.enable_grad():
            values = _call(rows_fn, logits, parts, packed)
            weights = torch.ones_like(values) if row_weights is None else row_weights
            (g,) = torch.autograd.grad(values, logits, weights)
        del logits
        if self.h is not None:
            gh = g @ weight32
            if self.idx is None:
                self.h[start:stop] = gh
            else:
                self.h.index_copy_(0, self.idx[start:stop], gh.to(self.h.dtype))
        if self.w is not None:
            self.w[:self.vocab].addmm_(g.t(), h)
        if self.b is not None:
            self.b[:self.vocab] += g.sum(0)
        return values.detach()


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_head(student_hidden: Tensor, lm_head_weight: Tensor, lm_head_bias: Tensor | None) -> tuple[int, int]:
    if student_hidden.dim() == 0:
        raise ValueError("student_hidden must have at least one dimension (the hidden axis), got a scalar")
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be [V, H], got shape {tuple(lm_head_weight.shape)}")
    vocab, width = lm_head_weight.shape
    if student_hidden.shape[-1] != width:
        raise ValueError(
            f"student_hidden's last axis ({student_hidden.shape[-1]}) must equal lm_head_weight's H ({width})"
        )
    if lm_head_bias is not None and lm_head_bias.shape != (vocab,):
        raise ValueError(f"lm_head_bias must have shape ({vocab},), got {tuple(lm_head_bias.shape)}")
    return vocab, width


def _check_vocab_size(vocab_size: int | None, vocab: int, teacher_vocab: int) -> int:
    if vocab_size is None:
        if teacher_vocab != vocab:
            raise ValueError(
                f"student vocab ({vocab}, lm_head_weight rows) and teacher vocab ({teacher_vocab}) differ; "
                f"pass vocab_size= to compare only the first vocab_size (real) token ids"
            )
        return vocab
    vocab_size = _check_positive_int("vocab_size", vocab_size)
    if vocab_size > min(vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size ({vocab_size}) exceeds the student ({vocab}) or teacher ({teacher_vocab}) vocab"
        )
    return vocab_size


def _teacher_parts(
    teacher: Tensor | TopKTeacher, row_shape: torch.Size, vocab: int, vocab_size: int | None
) -> tuple[int, tuple[Tensor, ...]]:
    """(vocab_size, flat teacher tensors with one row per student row) for a dense or top-k teacher."""
    n = row_shape.numel()
    if isinstance(teacher, TopKTeacher):
        if teacher.shape != row_shape:
            raise ValueError(
                f"the top-k teacher's row shape {tuple(teacher.shape)} must equal student_hidden's leading shape "
                f"{tuple(row_shape)}"
            )
        vocab_size = vocab if vocab_size is None else _check_vocab_size(vocab_size, vocab, vocab)
        ids = teacher.ids
        if teacher.k > vocab_size:
            raise ValueError(f"the top-k teacher has k={teacher.k} ids per row but the vocabulary is {vocab_size}")
        if ids.numel() and bool((ids.min() < 0) | (ids.max() >= vocab_size)):
            raise ValueError(
                f"top-k teacher ids must be in [0, {vocab_size}), got ids from {int(ids.min())} to {int(ids.max())}"
            )
        parts: tuple[Tensor, ...] = (ids.long().reshape(n, -1), teacher.logprobs.detach().reshape(n, -1))
        if teacher.tail_logprob is not None:
            parts += (teacher.tail_logprob.detach().reshape(n),)
        return vocab_size, parts
    if teacher.dim() == 0 or teacher.shape[:-1] != row_shape:
        raise ValueError(
            f"teacher_logits must be [..., V'] with leading shape {tuple(row_shape)} (student_hidden's), got "
            f"{tuple(teacher.shape)}"
        )
    vocab_size = _check_vocab_size(vocab_size, vocab, teacher.shape[-1])
    return vocab_size, (teacher.detach().reshape(n, -1)[:, :vocab_size],)


def _fused_rows(
    rows_fn: Callable,
    packed: bool,
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Tensor | None,
    teacher: tuple[Tensor, ...],
    row_mask: Tensor | None,
    chunk_size: int,
    vocab_size: int,
    reduction: str,
) -> Tensor:
    row_shape = student_hidden.shape[:-1]
    idx = None
    if row_mask is not None and not bool(row_mask.all()):
        idx = row_mask.reshape(-1).nonzero().squeeze(1)
    summed = reduction != "none" and torch.is_grad_enabled()
    values = _FusedLinearRows.apply(
        idx,
        rows_fn,
        chunk_size,
        packed,
        vocab_size,
        summed,
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        lm_head_weight,
        lm_head_bias,
        *teacher,
    )
    if not summed:
        return reduce_rows(values, idx, row_shape, reduction)
    if reduction == "sum":
        return values
    n = row_shape.numel() if idx is None else idx.numel()
    return values / n if n else values * 0


def fused_linear_divergence(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_logits: Tensor | TopKTeacher,
    *,
    divergence: str = "forward_kl",
    lm_head_bias: Tensor | None = None,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    **divergence_params: float,
) -> Tensor:
    """`divergence(student_hidden @ lm_head_weight.T + lm_head_bias, teacher_logits)` without the full logits.

    - `student_hidden` `[..., H]`: the student's last hidden states (before its lm_head).
    - `lm_head_weight` `[V, H]`, `lm_head_bias` `[V]` or None: the student's output layer.
    - `teacher_logits` `[..., V']` with the same leading shape as `student_hidden`, treated as a constant; or a
      `TopKTeacher` (cached top-k log-probs + tail), which gives the sparse form of the divergence (the same
      values as `sparse_<divergence>` on the full logits).
    - `divergence`: one of `FUSED_DIVERGENCES` (forward_kl, reverse_kl, soft_cross_entropy, generalized_jsd,
      skew_kl, skew_reverse_kl, tvd), with its parameters as keywords (`beta=` for generalized_jsd, default
      0.5; `alpha=` for the skew KLs, default 0.1) — same formulas as the functions of the same name.
    - `vocab_size`: compare only token ids `< vocab_size` (a padded vocab: student and teacher widths may
      differ and both are cut to it, never zero-padded). When None, `V` must equal `V'`.
    - `temperature`, `scale_t2`, `mask` / `labels`, `reduction` as in `divergences.py`: "mean" divides by the
      number of counted rows, "none" returns `[...]` with 0 at masked rows. Masked rows are never computed
      and their hidden-state gradient is 0. With a `TopKTeacher` the temperature divides the student only
      (the cached log-probs are already at the cache's temperature), as in `sparse.py`.
    - `chunk_size`: counted rows per chunk (default 1024); peak extra memory ≈ a few `chunk_size × V` float32
      tensors plus the `V × H` float32 weight gradient.

    Returns a float32 tensor. Gradient strategy (taken in forward for "sum" / "mean", recomputed in backward
    for "none") and its memory / time trade-off: see the module docstring.
    """
    dense_rows = _rows_fn(divergence, divergence_params)
    temperature = check_temperature(temperature)
    check_reduction(reduction)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    vocab, _ = _check_head(student_hidden, lm_head_weight, lm_head_bias)
    row_shape = student_hidden.shape[:-1]
    vocab_size, parts = _teacher_parts(teacher_logits, row_shape, vocab, vocab_size)
    sparse = isinstance(teacher_logits, TopKTeacher)
    rows_fn = _sparse_rows(dense_rows, temperature) if sparse else float32_rows(dense_rows, temperature)
    row_mask = resolve_mask(row_shape, mask, labels, student_hidden.device)
    out = _fused_rows(rows_fn, sparse, student_hidden, lm_head_weight, lm_head_bias, parts, row_mask, chunk_size,
                      vocab_size, reduction)
    return out * temperature**2 if scale_t2 else out


def _cross_entropy_rows(s: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(s, targets, reduction="none")


def fused_linear_cross_entropy(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 1024,
    vocab_size: int | None = None,
) -> Tensor:
    """Token cross-entropy −log softmax(h @ W.T + b)[y] without the full logits (the hard-label loss).

    `targets` has `student_hidden`'s leading shape; -100 marks rows that do not count (never computed).
    `vocab_size` cuts a padded vocabulary to the real ids (default: all V); `reduction` and `chunk_size` as
    in `fused_linear_divergence`. Equals `F.cross_entropy(logits[..., :vocab_size], targets,
    ignore_index=-100)` for "mean".
    """
    check_reduction(reduction)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    vocab, _ = _check_head(student_hidden, lm_head_weight, lm_head_bias)
    row_shape = student_hidden.shape[:-1]
    if targets.shape != row_shape:
        raise ValueError(f"targets must have shape {tuple(row_shape)} (student_hidden's), got {tuple(targets.shape)}")
    vocab_size = vocab if vocab_size is None else _check_vocab_size(vocab_size, vocab, vocab)
    flat = targets.reshape(-1).long()
    counted = flat != IGNORE_INDEX
    if bool(((flat[counted] < 0) | (flat[counted] >= vocab_size)).any()):
        raise ValueError(f"targets must be -100 or token ids in [0, {vocab_size})")
    return _fused_rows(_cross_entropy_rows, False, student_hidden, lm_head_weight, lm_head_bias, (flat,),
                       counted.reshape(row_shape), chunk_size, vocab_size, reduction)
