"""Orders in which the Distiller visits the training records.

The loop draws a permutation of the records per epoch and takes consecutive global micro-batches from it;
the functions here rearrange that permutation, deterministically, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Global micro-batches per window of `length_grouped_order` (the "megabatch" of HF Trainer's group_by_length).
LENGTH_GROUP_WINDOW = 50


def length_grouped_order(order: torch.Tensor, lengths: Sequence[int], batch_size: int, *,
                         window: int = LENGTH_GROUP_WINDOW, generator: torch.Generator | None = None) -> torch.Tensor:
    """`order` rearranged so that each run of `batch_size` consecutive records has similar lengths.

    The shuffled `order` is cut into windows of `window × batch_size` records; inside a window the records are
    sorted by `lengths` (longest first, ties kept in shuffled order), cut into batches, and the batches are
    shuffled with `generator`. Every record keeps its window, so the randomness of the epoch order survives,
    while a batch pads to the length of its longest record instead of the window's. A trailing partial
    batch stays last.
    """
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be >= 1, got {batch_size} and {window}")
    if len(lengths) < (int(order.max()) + 1 if order.numel() else 0):
        raise ValueError(f"lengths has {len(lengths)} entries but order refers to record {int(order.max())}")
    key = torch.as_tensor(list(lengths), dtype=torch.long)
    span = window * batch_size
    pieces: list[torch.Tensor] = []
    for start in range(0, order.numel(), span):
        part = order[start:start + span]
        part = part[torch.sort(key[part], descending=True, stable=True).indices]
        full = part.numel() // batch_size
        batches = list(part[:full * batch_size].split(batch_size))
        pieces += [batches[i] for i in torch.randperm(full, generator=generator).tolist()]
        if part.numel() > full * batch_size:
            pieces.append(part[full * batch_size:])
    return torch.cat(pieces) if pieces else order.clone()


def padding_fraction(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> float:
    """Share of the padded tokens in the full batches of `order`: 1 − Σ length / Σ (batch × its longest)."""
    real = padded = 0
    order = list(order)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        sizes = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(sizes)
        padded += max(sizes) * len(sizes)
    return 1.0 - real / padded if padded else 0.0
