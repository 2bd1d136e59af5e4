"""Shared machinery for row-wise losses: flatten to rows, mask / labels, reduction, chunking.

A row is one position of the leading axes of a `[..., C]` tensor. A loss is described by a per-row
function `rows_fn(s, t) -> (n,)` float32 over `(n, C)` student / teacher rows; `rowwise` applies it to
the counted rows only, in one pass or `chunk_size` rows at a time, and reduces the result.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

RowsFn = Callable[[Tensor, Any], Tensor]  # (student rows, teacher rows: a Tensor or a tuple of them)

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


Teacher = Tensor | tuple[Tensor, ...]


def _call(rows_fn: Callable, s: Tensor, parts: list[Tensor], packed: bool) -> Tensor:
    return rows_fn(s, tuple(parts)) if packed else rows_fn(s, parts[0])


class _ChunkedRows(torch.autograd.Function):
    """Per-row values of `rows_fn`, `chunk_size` rows at a time.

    The teacher is one or more tensors (`packed` says whether `rows_fn` gets a tuple); each has the rows on
    its first axis and any width after it, so only the chunk's rows of every input are materialised. Teacher
    tensors that need no gradient are kept as constants, outside autograd's saved tensors, so a teacher run
    under `torch.inference_mode` can be used as it is (no copy).

    Gradient strategy. When only the student needs a gradient (training; `with_grad`: grad mode was on at the
    call), it is taken during forward: each chunk's values are differentiated right away, with a unit weight
    per row, into one float32 buffer of the student's size (0 at rows not selected). A row's value depends on
    that row only, so the gradient for incoming per-row weights `g` is that buffer with row `i` scaled by
    `g_i`, which is all backward does, in place. Against recomputing each chunk in backward this saves a second
    pass of the loss over every row, for no more memory: the student-sized gradient is held from the loss's
    forward instead of being allocated in its backward. A second backward through the same graph
    (`retain_graph=True`) raises autograd's in-place error instead of returning a wrong gradient.
    When a teacher tensor needs a gradient too, backward recomputes each chunk and differentiates it with the
    incoming weights, which keeps every input's gradient exactly that of the unchunked formula.
    """

    @staticmethod
    def forward(ctx, idx, rows_fn, chunk_size, packed, with_grad, student, *teacher):
        needs = [with_grad and need for need in ctx.needs_input_grad[5:]]
        ahead = needs[0] and not any(needs[1:])
        n = student.shape[0] if idx is None else idx.numel()
        out = torch.empty(n, dtype=torch.float32, device=student.device)
        buffer = _grad_buffer(student, idx is not None) if ahead else None
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            parts = [_take(t, idx, start, stop) for t in teacher]
            s = _take(student, idx, start, stop)
            if buffer is None:
                out[start:stop] = _call(rows_fn, s, parts, packed)
                continue
            s = _leaf(s)
            with torch.enable_grad():
                value = _call(rows_fn, s, parts, packed)
                (grad,) = torch.autograd.grad(value, s, torch.ones_like(value))
            out[start:stop] = value.detach()
            _put(buffer, idx, start, stop, grad)
        ctx.rows_fn, ctx.chunk_size, ctx.n, ctx.packed = rows_fn, chunk_size, n, packed
        if buffer is not None:
            ctx.save_for_backward(idx, buffer)
            ctx.student_dtype = student.dtype
        else:
            ctx.save_for_backward(idx, student, *(t for t in teacher if t.requires_grad))
            ctx.constants = [None if t.requires_grad else t for t in teacher]
        ctx.ahead = buffer is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.ahead:
            idx, buffer = ctx.saved_tensors
            scale = grad_out if idx is None else grad_out.new_zeros(buffer.shape[0]).index_copy_(0, idx, grad_out)
            grad = buffer.mul_(scale.reshape(-1, *([1] * (buffer.dim() - 1)))).to(ctx.student_dtype)
            return (None, None, None, None, None, grad, *([None] * (len(ctx.needs_input_grad) - 6)))
        idx, student, *tracked = ctx.saved_tensors
        tracked = iter(tracked)
        inputs = [student, *(next(tracked) if c is None else c for c in ctx.constants)]
        needs = list(ctx.needs_input_grad[5:])
        new = torch.empty_like if idx is None else torch.zeros_like
        full = [new(x) if need else None for x, need in zip(inputs, needs, strict=True)]
        if any(needs):
            for start in range(0, ctx.n, ctx.chunk_size):
                stop = min(start + ctx.chunk_size, ctx.n)
                rows = [
                    _take(x, idx, start, stop).detach().requires_grad_(need)
                    for x, need in zip(inputs, needs, strict=True)
                ]
                with torch.enable_grad():
                    value = _call(ctx.rows_fn, rows[0], rows[1:], ctx.packed)
                    wanted = [r for r, need in zip(rows, needs, strict=True) if need]
                    grads = list(torch.autograd.grad(value, wanted, grad_out[start:stop]))
                for target, need in zip(full, needs, strict=True):
                    if need:
                        assert target is not None
                        _put(target, idx, start, stop, grads.pop(0))
        return (None, None, None, None, None, *full)


def _leaf(rows: Tensor) -> Tensor:
    """The chunk's rows as a fresh leaf that records a gradient, upcast to float32 when of a lower precision
    (every row function computes in float32, so its value is the same; its gradient is then not rounded)."""
    rows = rows.detach()
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    return rows.requires_grad_(True)


def _grad_buffer(x: Tensor, sparse: bool) -> Tensor:
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return (torch.zeros_like if sparse else torch.empty_like)(x, dtype=dtype)


def _put(buffer: Tensor, idx: Tensor | None, start: int, stop: int, rows: Tensor) -> None:
    if idx is None:
        buffer[start:stop] = rows
    else:
        buffer.index_copy_(0, idx[start:stop], rows.to(buffer.dtype))


def apply_rows(
    rows_fn: RowsFn, student: Tensor, teacher: Teacher, idx: Tensor | None, chunk_size: int | None
) -> Tensor:
    """`rows_fn` over the rows of `(R, C)` inputs selected by `idx` (all when None), as a `(n,)` tensor.

    `teacher` is one `(R, C)` tensor, or a tuple of tensors with `R` rows each and any trailing shape; a
    tuple reaches `rows_fn` as a tuple of the selected rows of each.
    """
    packed = isinstance(teacher, tuple)
    parts: list[Tensor] = list(teacher) if isinstance(teacher, tuple) else [teacher]
    if chunk_size is None:
        if idx is not None:
            student = student.index_select(0, idx)
            parts = [t.index_select(0, idx) for t in parts]
        return _call(rows_fn, student, parts, packed)
    return _ChunkedRows.apply(idx, rows_fn, chunk_size, packed, torch.is_grad_enabled(), student, *parts)


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


def reduce_counted(per_row: Tensor, keep: Tensor | None, reduction: str) -> Tensor:
    """Reduce (N,) per-row values over the rows where `keep` (N,) is True (all rows when None); "none" gives 0
    at the rows not kept."""
    check_reduction(reduction)
    if keep is None:
        return reduce_rows(per_row, None, per_row.shape, reduction)
    idx = keep.to(per_row.device).bool().nonzero().flatten()
    return reduce_rows(per_row[idx], idx, per_row.shape, reduction)


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def rowwise(
    rows_fn: RowsFn,
    student: Tensor,
    teacher: Teacher,
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

    `teacher` is either a tensor of the student's shape, or a tuple of tensors whose leading axes are the
    student's row axes `shape[:-1]` (each may have any trailing shape, e.g. `[..., k]` ids and log-probs
    and a `[...]` tail); `rows_fn` then receives a tuple with the same rows of each, flattened to `(n, ...)`.
    """
    packed = isinstance(teacher, tuple)
    if not isinstance(teacher, tuple):
        check_same_shape(student, teacher, what)
    check_reduction(reduction)
    check_chunk_size(chunk_size)
    if student.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension (the class axis), got a scalar")
    row_shape = student.shape[:-1]
    if packed:
        for i, part in enumerate(teacher):
            if part.shape[: len(row_shape)] != row_shape:
                raise ValueError(
                    f"teacher tensor {i} must start with the student's row shape {tuple(row_shape)}, "
                    f"got {tuple(part.shape)}"
                )
    row_mask = resolve_mask(row_shape, mask, labels, student.device)
    idx = None
    if row_mask is not None and not bool(row_mask.all()):
        idx = row_mask.reshape(-1).nonzero().squeeze(1)
    n_rows = row_shape.numel()
    flat_teacher: Teacher = (
        tuple(t.reshape(n_rows, *t.shape[len(row_shape):]) for t in teacher)
        if isinstance(teacher, tuple)
        else teacher.reshape(-1, teacher.shape[-1])
    )
    values = apply_rows(rows_fn, student.reshape(-1, student.shape[-1]), flat_teacher, idx, chunk_size)
    return reduce_rows(values, idx, row_shape, reduction)
