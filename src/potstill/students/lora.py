"""LoRA students through `peft` (`student.lora`).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes the student's weights and
learns, next to each targeted linear layer W, a low-rank update ΔW = (alpha / r) · B·A with A of shape r × in and
B of shape out × r; B starts at zero, so the wrapped student starts equal to the student as built. Only A and B
(and the modules listed in `modules_to_save`, e.g. a classifier head) train. Defaults here: r = 8, alpha = 16,
dropout 0 on the adapter's input, and peft's per-architecture target modules (e.g. BERT's query and value).

`with_lora` wraps the built student in a `peft.PeftModel`; at the end of the run `save_adapter_and_merge` saves
the adapter (loadable with `peft.PeftModel.from_pretrained(base, folder)`) and folds ΔW into W, so the saved
student is a plain model that transformers loads without peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from potstill.errors import UserError


def with_lora(model: nn.Module, lora: Any) -> nn.Module:
    """`model` wrapped with LoRA adapters as `lora` (the recipe's `student.lora`) says; only they train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("field student.lora: LoRA students need peft: pip install peft (or 'potstill[lora]')") from None

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, modules_to_save=lora.modules_to_save)
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # no default targets for this architecture, or a target that is not there
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"field student.lora.target_modules: peft cannot place LoRA on this "
                        f"{type(model).__name__}: {first[:300]}; name its linear layers, e.g. [query, value]") from None


def save_adapter_and_merge(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Save the adapter of the `peft.PeftModel` `model` in `adapter_dir`, then return its base model with the
    adapter merged into the weights (the LoRA layers replaced by plain ones)."""
    model.save_pretrained(str(adapter_dir))  # type: ignore[operator]  # a PeftModel
    return model.merge_and_unload()  # type: ignore[operator]
