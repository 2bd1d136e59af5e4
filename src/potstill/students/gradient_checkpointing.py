"""Gradient checkpointing of a Hugging Face student (`trainer.gradient_checkpointing`).

Activations inside each transformer block are not kept for backward but recomputed, trading compute for
memory; transformers does it (`PreTrainedModel.gradient_checkpointing_enable`). The non-reentrant torch
implementation is used: it gives the same loss and gradients as a plain run, restores the RNG state for
dropout, and works when the inputs need no gradient (frozen embeddings, LoRA adapters).
"""

from __future__ import annotations

from torch import nn

from potstill.errors import UserError


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' gradient checkpointing for `model` (a peft model forwards it to its base model)."""
    # transformers 5 names it activation_checkpointing_enable (the old name is deprecated, removed in v6)
    enable = getattr(model, "activation_checkpointing_enable", None)
    keyword = "activation_checkpointing_kwargs"
    if enable is None:
        enable, keyword = getattr(model, "gradient_checkpointing_enable", None), "gradient_checkpointing_kwargs"
    if enable is None or not getattr(model, "supports_gradient_checkpointing", True):
        raise UserError(f"field trainer.gradient_checkpointing: needs a Hugging Face student that supports it "
                        f"(gradient_checkpointing_enable); this student is a {type(model).__name__}")
    enable(**{keyword: {"use_reentrant": False}})
