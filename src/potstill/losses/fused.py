"""Fused lm_head + divergence: the student's full `[tokens, V]` logits never exist.

`fused_linear_divergence(h, W, z_t)` equals `divergence(h @ W.T (+ b), z_t)` for the logit divergences of
`divergences.py` (same conventions: mask / labels, temperature, reduction, `scale_t2`, float32 math), but
computes the student logits `chunk_size` counted rows at a time, in forward and again in backward, so the
largest live temporaries are a few `[chunk_size, V]` float32 tensors instead of several `[tokens, V]` ones.

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

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._rows import RowsFn, check_reduction, check_temperature, check_weight, float32_rows, reduce_rows, resolve_mask
from .divergences import (
    _forward_kl_rows,
    _jsd_rows,
    _reverse_kl_rows,
    _skew_reverse_rows,
    _skew_rows,
    _soft_cross_entropy_rows,
    _tvd_rows,
)

__all__ = ["FUSED_DIVERGENCES", "fused_linear_divergence"]


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


def _take(x: Tensor, idx: Tensor | None, start: int, stop: int) -> Tensor:
    return x[start:stop] if idx is None else x.index_select(0, idx[start:stop])


def _chunk_logits(h: Tensor, weight32: Tensor, bias32: Tensor | None) -> Tensor:
    h = h.float()
    return h @ weight32.t() if bias32 is None else torch.addmm(bias32, h, weight32.t())


class _FusedLinearRows(torch.autograd.Function):
    """Per-row divergence of `h @ W[:vocab].T (+ b)` against `teacher[:, :vocab]` over the rows `idx`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, idx, rows_fn, chunk_size, vocab):
        n = hidden.shape[0] if idx is None else idx.numel()
        weight32 = weight[:vocab].float()
        bias32 = None if bias is None else bias[:vocab].float()
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            logits = _chunk_logits(_take(hidden, idx, start, stop), weight32, bias32)
            out[start:stop] = rows_fn(logits, _take(teacher, idx, start, stop)[:, :vocab])
            del logits
        ctx.save_for_backward(hidden, weight, bias, teacher, idx)
        ctx.rows_fn, ctx.chunk_size, ctx.vocab, ctx.n = rows_fn, chunk_size, vocab, n
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, teacher, idx = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab = ctx.vocab
        weight32 = weight[:vocab].float()
        bias32 = None if bias is None else bias[:vocab].float()
        grad_h = None
        if need_h:
            grad_h = torch.empty_like(hidden) if idx is None else torch.zeros_like(hidden)
        # float32 accumulators over the full (possibly padded) vocab; ids >= vocab get 0.
        grad_w = weight.new_zeros(weight.shape, dtype=torch.float32) if need_w else None
        grad_b = bias.new_zeros(bias.shape, dtype=torch.float32) if need_b else None
        for start in range(0, ctx.n, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, ctx.n)
            h = _take(hidden, idx, start, stop).float()
            logits = _chunk_logits(h, weight32, bias32).requires_grad_(True)
            with torch.enable_grad():
                values = ctx.rows_fn(logits, _take(teacher, idx, start, stop)[:, :vocab])
                (g,) = torch.autograd.grad(values, logits, grad_out[start:stop])
            del logits, values
            if need_h:
                gh = g @ weight32
                if idx is None:
                    grad_h[start:stop] = gh
                else:
                    grad_h.index_copy_(0, idx[start:stop], gh.to(grad_h.dtype))
            if need_w:
                grad_w[:vocab].addmm_(g.t(), h)
            if need_b:
                grad_b[:vocab] += g.sum(0)
            del g
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def fused_linear_divergence(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_logits: Tensor,
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
    - `teacher_logits` `[..., V']` with the same leading shape as `student_hidden`; treated as a constant.
    - `divergence`: one of `FUSED_DIVERGENCES` (forward_kl, reverse_kl, soft_cross_entropy, generalized_jsd,
      skew_kl, skew_reverse_kl, tvd), with its parameters as keywords (`beta=` for generalized_jsd, default
      0.5; `alpha=` for the skew KLs, default 0.1) — same formulas as the functions of the same name.
    - `vocab_size`: compare only token ids `< vocab_size` (a padded vocab: student and teacher widths may
      differ and both are cut to it, never zero-padded). When None, `V` must equal `V'`.
    - `temperature`, `scale_t2`, `mask` / `labels`, `reduction` as in `divergences.py`: "mean" divides by the
      number of counted rows, "none" returns `[...]` with 0 at masked rows. Masked rows are never computed
      and their hidden-state gradient is 0.
    - `chunk_size`: counted rows per chunk (default 1024); peak extra memory ≈ a few `chunk_size × V` float32
      tensors plus the `V × H` float32 weight gradient.

    Returns a float32 tensor. Gradient strategy (recompute each chunk in backward) and its memory / time
    trade-off: see the module docstring.
    """
    rows_fn = _rows_fn(divergence, divergence_params)
    temperature = check_temperature(temperature)
    check_reduction(reduction)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
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
    row_shape = student_hidden.shape[:-1]
    if teacher_logits.dim() == 0 or teacher_logits.shape[:-1] != row_shape:
        raise ValueError(
            f"teacher_logits must be [..., V'] with leading shape {tuple(row_shape)} (student_hidden's), got "
            f"{tuple(teacher_logits.shape)}"
        )
    teacher_vocab = teacher_logits.shape[-1]
    if vocab_size is None:
        if teacher_vocab != vocab:
            raise ValueError(
                f"student vocab ({vocab}, lm_head_weight rows) and teacher vocab ({teacher_vocab}) differ; "
                f"pass vocab_size= to compare only the first vocab_size (real) token ids"
            )
        vocab_size = vocab
    vocab_size = _check_positive_int("vocab_size", vocab_size)
    if vocab_size > min(vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size ({vocab_size}) exceeds the student ({vocab}) or teacher ({teacher_vocab}) vocab"
        )

    row_mask = resolve_mask(row_shape, mask, labels, student_hidden.device)
    idx = None
    if row_mask is not None and not bool(row_mask.all()):
        idx = row_mask.reshape(-1).nonzero().squeeze(1)
    values = _FusedLinearRows.apply(
        student_hidden.reshape(-1, width),
        lm_head_weight,
        lm_head_bias,
        teacher_logits.detach().reshape(-1, teacher_vocab),
        idx,
        float32_rows(rows_fn, temperature),
        chunk_size,
        vocab_size,
    )
    out = reduce_rows(values, idx, row_shape, reduction)
    return out * temperature**2 if scale_t2 else out
