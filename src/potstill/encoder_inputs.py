"""The keyword inputs a Hugging Face text encoder takes, picked out of a tokenizer's output or a batch.

Tokenizers and collators add fields an encoder's forward refuses (`offset_mapping`, `special_tokens_mask`,
labels, record fields); every place that calls an encoder passes only these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

Value = TypeVar("Value")


def encoder_inputs(batch: Mapping[str, Value], *, extra: tuple[str, ...] = ()) -> dict[str, Value]:
    """The entries of `batch` an encoder's forward takes (plus the `extra` names), in the batch's order."""
    keep = ENCODER_INPUTS + extra
    return {key: value for key, value in batch.items() if key in keep}


def encoder_inputs_on(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """`encoder_inputs(batch)` moved to `device`."""
    return {key: value.to(device) for key, value in encoder_inputs(batch).items()}
