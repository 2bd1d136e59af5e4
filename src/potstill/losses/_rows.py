"""Shared machinery for row-wise losses: flatten to rows, mask / labels, reduction, chunking.

A row is one position of the leading axes of a `[..., C]` tensor. A loss is described by a per-row
function `rows_fn(s, t) -> (n,)` float32 over `(n, C)` student / teacher rows; `rowwise` applies it to
the counted rows only, in one pass or `chunk_size` rows at a time, and reduces the result.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

RowsFn = Callable[[Tensor, Tensor], Tensor]

REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_temperature(temperature: float) -> float:
    if not _is_real(temperature) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    return float(temperature)


def check_weight(name: str, value: float) -> float:
    if not _is_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_same_shape(student: Tensor, teacher: Tensor, what: str = "logits") -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} must have the same shape, got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )


def resolve_mask(row_shape: torch.Size, mask: Tensor | None, labels: Tensor | None, device) -> Tensor | None:
    """Bool mask of `row_shape` (True = counted) from `mask` or `labels` (-100 = ignored), or None."""
    if mask is not None and labels is not None:
        raise ValueError("give either mask or labels, not both")
    if labels is not None:
        if labels.shape != row_shape:
            raise ValueError(f"labels must have shape {tuple(row_shape)}, got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        return (labels != IGNORE_INDEX).to(device)
    if mask is None:
        return None
    if mask.shape != row_shape:
        raise ValueError(f"mask must have shape {tuple(row_shape)}, got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"mask must be a bool (or integer 0/1) tensor, got {mask.dtype}")
    return mask.to(device=device, dtype=torch.bool)


def float32_rows(rows_fn: RowsFn, temperature: float = 1.0) -> RowsFn:
    """Wrap `rows_fn` so that it sees float32 rows divided by `temperature` (no division when T == 1)."""
    if temperature == 1.0:
        return lambda s, t: rows_fn(s.float(), t.float())
    return lambda s, t: rows_fn(_div(s, temperature), _div(t, temperature))


def _div(x: Tensor, temperature: float) -> Tensor:
    y = x.float()
    return y / temperature if y is x else y.div_(temperature)


def _take(x: Tensor, idx: Tensor | None, start: int, stop: int) -> Tensor:
    return x[start:stop] if idx is None else x.index_select(0, idx[start:stop])


class _ChunkedRows(torch.autograd.Function):
    """Per-row values of `rows_fn`, `chunk_size` rows at a time; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, student, teacher, idx, rows_fn, chunk_size):
        n = student.shape[0] if idx is None else idx.numel()
        out = torch.empty(n, dtype=torch.float32, device=student.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            out[start:stop] = rows_fn(_take(student, idx, start, stop), _take(teacher, idx, start, stop))
        ctx.save_for_backward(student, teacher, idx)
        ctx.rows_fn, ctx.chunk_size, ctx.n = rows_fn, chunk_size, n
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        student, teacher, idx = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        new = torch.empty_like if idx is None else torch.zeros_like
        grad_s = new(student) if need_s else None
        grad_t = new(teacher) if need_t else None
        for start in range(0, ctx.n, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, ctx.n)
            s = _take(student, idx, start, stop).detach().requires_grad_(need_s)
            t = _take(teacher, idx, start, stop).detach().requires_grad_(need_t)
            inputs = [x for x, need in ((s, need_s), (t, need_t)) if need]
            with torch.enable_grad():
                grads = list(torch.autograd.grad(ctx.rows_fn(s, t), inputs, grad_out[start:stop]))
            for full, need in ((grad_s, need_s), (grad_t, need_t)):
                if need:
                    g = grads.pop(0)
                    if idx is None:
                        full[start:stop] = g
                    else:
                        full.index_copy_(0, idx[start:stop], g)
        return grad_s, grad_t, None, None, None


def apply_rows(
    rows_fn: RowsFn, student: Tensor, teacher: Tensor, idx: Tensor | None, chunk_size: int | None
) -> Tensor:
    """`rows_fn` over the rows of `(R, C)` inputs selected by `idx` (all when None), as a `(n,)` tensor."""
    if chunk_size is None:
        if idx is not None:
            student, teacher = student.index_select(0, idx), teacher.index_select(0, idx)
        return rows_fn(student, teacher)
    return _ChunkedRows.apply(student, teacher, idx, rows_fn, chunk_size)


def reduce_rows(values: Tensor, idx: Tensor | None, row_shape: torch.Size, reduction: str) -> Tensor:
    """Reduce per-row `values` of the counted rows `idx` (all rows when None)."""
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        total = values.sum()
        return total / values.numel() if values.numel() else total * 0
    if idx is not None:
        values = values.new_zeros(row_shape.numel()).index_copy(0, idx, values)
    return values.reshape(row_shape)


def rowwise(
    rows_fn: RowsFn,
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    what: str = "logits",
) -> Tensor:
    """Apply a per-row loss to `[..., C]` inputs over the counted rows and reduce it.

    `mask` (bool, `shape[:-1]`, True = counted) or `labels` (-100 = ignored) select the rows; masked rows
    are never computed, so garbage in them cannot leak NaN into values or gradients.
    """
    check_same_shape(student, teacher, what)
    check_reduction(reduction)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if student.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension (the class axis), got a scalar")
    row_shape = student.shape[:-1]
    row_mask = resolve_mask(row_shape, mask, labels, student.device)
    idx = None
    if row_mask is not None and not bool(row_mask.all()):
        idx = row_mask.reshape(-1).nonzero().squeeze(1)
    width = student.shape[-1]
    values = apply_rows(rows_fn, student.reshape(-1, width), teacher.reshape(-1, width), idx, chunk_size)
    return reduce_rows(values, idx, row_shape, reduction)
