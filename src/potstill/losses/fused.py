"""Fused lm_head + divergence: the student's full `[tokens, V]` logits never exist.

`fused_linear_divergence(h, W, z_t)` equals `divergence(h @ W.T (+ b), z_t)` for the logit divergences of
`divergences.py` (same conventions: mask / labels, temperature, reduction, `scale_t2`, float32 math), but
computes the student logits `chunk_size` counted rows at a time, in forward and again in backward, so the
largest live temporaries are a few `[chunk_size, V]` float32 tensors instead of several `[tokens, V]` ones.
With a `TopKTeacher` (a cached teacher) in place of `z_t` it equals the sparse divergence of `sparse.py`;
then no `[tokens, V]` tensor exists on either side. `fused_linear_cross_entropy(h, W, y)` is the hard-label
token cross-entropy by the same machinery. `LMHeadInputs` is the student signal that carries `h`, `W`, `b`
through the training loop (`trainer.fused_lm_head`).

Gradient strategy: recompute in backward. Forward computes each chunk's logits and per-row divergence
without a graph and keeps only its inputs; backward recomputes the chunk's logits, takes the gradient of the
per-row divergence with respect to them (weighted by the incoming per-row gradient), and turns it into the
chunk's hidden-state gradient (`g @ W`) and a contribution to the weight / bias gradient (`gᵀ @ h`, `Σ g`).

Why not the other common design, gradients computed during forward and merely rescaled in backward?
- It cannot serve `reduction="none"`: the weight gradient `Σ_i g_i · (∂ℓ_i/∂z_i)ᵀ h_i` depends on the
  per-row incoming gradients `g_i`, unknown until backward; only a scalar `grad_output` can be applied
  afterwards. Recomputing handles every reduction, and any `grad_output`, the same way.
- Memory: it must hold `[tokens, H]` + `[V, H]` float32 gradients from the loss's forward until its backward,
  i.e. across the rest of the model's forward (for H=4096, V=128k that is 2 GiB before the model's own
  backward even starts); recomputing keeps nothing but the inputs autograd saves anyway. The peak inside the
  backward is the same for both: one chunk's temporaries plus the `[V, H]` weight gradient being summed.
- Cost: recomputing adds one `[chunk, H] × [H, V]` matmul (4 matmuls instead of 3) and a second divergence
  forward per chunk. Measured on CPU (docs/benchmarks.md: forward KL and JSD, 4096 tokens, H=576): forward +
  backward takes 1.2-1.3× the time of "full matmul + chunked divergence" (which also recomputes the
  divergence) and 1.4-1.9× that of the unchunked naive path, for 14-15% of its extra memory. A
  forward-only use (evaluation, `torch.no_grad`) pays for no gradient at all.

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
    """

    @staticmethod
    def forward(ctx, idx, rows_fn, chunk_size, packed, vocab, hidden, weight, bias, *teacher):
        n = hidden.shape[0] if idx is None else idx.numel()
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            weight32 = weight[:vocab].float()
            bias32 = None if bias is None else bias[:vocab].float()
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                logits = _chunk_logits(_take(hidden, idx, start, stop), weight32, bias32)
                out[start:stop] = _call(rows_fn, logits, [_take(t, idx, start, stop) for t in teacher], packed)
                del logits
        ctx.save_for_backward(idx, hidden, weight, bias)
        ctx.teacher = teacher  # constants (no gradient): kept outside autograd, so inference tensors are fine
        ctx.rows_fn, ctx.chunk_size, ctx.vocab, ctx.n, ctx.packed = rows_fn, chunk_size, vocab, n, packed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        idx, hidden, weight, bias = ctx.saved_tensors
        teacher = ctx.teacher
        need_h, need_w, need_b = ctx.needs_input_grad[5:8]
        vocab = ctx.vocab
        grad_h = None
        if need_h:
            grad_h = torch.empty_like(hidden) if idx is None else torch.zeros_like(hidden)
        # float32 accumulators over the full (possibly padded) vocab; ids >= vocab get 0.
        grad_w = weight.new_zeros(weight.shape, dtype=torch.float32) if need_w else None
        grad_b = bias.new_zeros(bias.shape, dtype=torch.float32) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            weight32 = weight[:vocab].float()
            bias32 = None if bias is None else bias[:vocab].float()
            for start in range(0, ctx.n, ctx.chunk_size):
                stop = min(start + ctx.chunk_size, ctx.n)
                h = _take(hidden, idx, start, stop).float()
                logits = _chunk_logits(h, weight32, bias32).requires_grad_(True)
                parts = [_take(t, idx, start, stop) for t in teacher]
                with torch.enable_grad():
                    values = _call(ctx.rows_fn, logits, parts, ctx.packed)
                    (g,) = torch.autograd.grad(values, logits, grad_out[start:stop])
                del logits, values
                if grad_h is not None:
                    gh = g @ weight32
                    if idx is None:
                        grad_h[start:stop] = gh
                    else:
                        grad_h.index_copy_(0, idx[start:stop], gh.to(grad_h.dtype))
                if grad_w is not None:
                    grad_w[:vocab].addmm_(g.t(), h)
                if grad_b is not None:
                    grad_b[:vocab] += g.sum(0)
                del g
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return (None, None, None, None, None, grad_h, grad_w, grad_b, *([None] * len(teacher)))


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
    values = _FusedLinearRows.apply(
        idx,
        rows_fn,
        chunk_size,
        packed,
        vocab_size,
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        lm_head_weight,
        lm_head_bias,
        *teacher,
    )
    return reduce_rows(values, idx, row_shape, reduction)


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

    Returns a float32 tensor. Gradient strategy (recompute each chunk in backward) and its memory / time
    trade-off: see the module docstring.
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
