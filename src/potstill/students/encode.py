"""Sentence vectors of an encoder: pooling its token states, and encoding a list of texts in batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence vector from token states: mean over tokens with attention_mask == 1, or the first token."""
    if mode == "cls":
        return hidden[:, 0]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def encode_texts(model: nn.Module, texts: list[str], embed: Callable[[list[str]], torch.Tensor], *,
                 batch_size: int, width: int | None = None, progress: Any = None) -> torch.Tensor:
    """`embed(chunk)` over `texts` in chunks of similar length (sorted by characters, so little padding),
    `model` in eval mode under inference_mode: float32 CPU rows in the input order, (0, width) when empty.
    `progress(n)` is called after each chunk."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = embed([texts[i] for i in idx]).float().cpu()
            if out is None:
                out = torch.empty(len(texts), rows.shape[-1])
            out[idx] = rows
            if progress is not None:
                progress(len(idx))
    model.train(was_training)
    return out if out is not None else torch.empty(0, width or 0)
