"""Models of the language-model tasks (causal_lm, seq2seq): the tokenizer teacher and student share, the text
student, the forward pass to logits, and the fused lm_head.

Teacher and student share the tokenizer, except in a cross-tokenizer run (`potstill.tasks.cross_tokenizer`,
which compares the two vocabularies and refuses a differing one for other objectives than uld / gold); a model whose
output has more ids than the tokenizer (a padded vocabulary) has its logits cut to the tokenizer's ids, so only
real tokens are compared (`check_vocab`).

With `trainer.fused_lm_head` the student is run up to its lm_head (`lm_head_inputs`): the loss gets its last
hidden states and the head's weight (`potstill.losses.fused.LMHeadInputs`) and never makes the `[B, T, V]`
logits; `check_fused_head` refuses a model whose logits are not exactly `hidden @ lm_head.weight.T (+ bias)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from potstill.config import Recipe
from potstill.data.lm_records import tokenizer_name
from potstill.errors import UserError
from potstill.losses.fused import LMHeadInputs, fused_linear_cross_entropy
from potstill.students.loading import with_recipe_dropout
from potstill.students.pruning import Calibration
from potstill.tasks.models import build_student, resolve_model_path

RawLogits = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_builtin_paths(recipe: Recipe, *, is_main: bool, barrier: Callable[[], None]) -> None:
    """Convert the `builtin:` models of teacher.path, teacher.tokenizer and student.path once, on the main
    process, before any process loads them."""
    tokenizer = getattr(recipe.teacher, "tokenizer", None)  # a task without its own tokenizer field: None
    for field, path in (("teacher.path", recipe.teacher.path), ("teacher.tokenizer", tokenizer),
                        ("student.path", recipe.student.path)):
        if path and path.startswith("builtin:"):
            if is_main:
                resolve_model_path(path, field=field)
            barrier()


def text_tokenizer(recipe: Recipe, teacher_tokenizer: Any, *, task: str) -> Any:
    """The tokenizer teacher and student share: teacher.tokenizer, else the teacher's own, else (no teacher)
    a pretrained student's (student.path)."""
    from transformers import AutoTokenizer

    field, path = None, None
    if recipe.teacher.tokenizer:
        field, path = "teacher.tokenizer", recipe.teacher.tokenizer
    elif teacher_tokenizer is not None:
        return teacher_tokenizer
    elif recipe.teacher.path is None and recipe.teacher.factory is None and recipe.student.init == "pretrained":
        field, path = "student.path", recipe.student.path
    if path is None:
        raise UserError(f"field teacher.tokenizer: the {task} task needs a tokenizer; a factory teacher has none, so "
                        f"give teacher.tokenizer (a tokenizer folder or builtin:smollm2)")
    path = resolve_model_path(path, field=field)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        hint = "; give teacher.tokenizer" if field == "student.path" else ""
        raise UserError(f"field {field}: cannot load a tokenizer from {path}: {exc}{hint}") from None


def build_text_student(recipe: Recipe, teacher: nn.Module | None, tokenizer: Any, auto_cls: Any,
                       calibration: Calibration | None = None) -> nn.Module:
    """The recipe's student; without a teacher, or with a `student.config.model_type` other than the teacher's
    (e.g. a Mixtral / Qwen2-MoE student of a dense teacher), `init: from_config` builds that model type from
    transformers' default config with the tokenizer's vocabulary size and special ids (student.config wins),
    its weights drawn from the recipe's seed. `calibration`: the data of `init: pruned`."""
    cfg = recipe.student
    own_type = cfg.config.get("model_type")
    teacher_type = getattr(getattr(teacher, "config", None), "model_type", None)
    if cfg.init != "from_config" or (teacher is not None and own_type in (None, teacher_type)):
        if teacher is not None and own_type is not None and cfg.init == "from_config":
            cfg = cfg.model_copy(update={"config": {k: v for k, v in cfg.config.items() if k != "model_type"}})
        return build_student(cfg, teacher, seed=recipe.seed, auto_cls=auto_cls, calibration=calibration)
    from potstill.students.build import from_model_type

    fields = dict(cfg.config)
    model_type = fields.pop("model_type")
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    defaults = {"vocab_size": len(tokenizer), **{k: v for k, v in special.items() if v is not None}}
    if getattr(auto_cls, "__name__", "") == "AutoModelForSeq2SeqLM":
        # the decoder starts from the pad token, as T5 does
        defaults["decoder_start_token_id"] = pad_id_of(tokenizer)
    try:
        student = from_model_type(str(model_type), auto_cls, seed=recipe.seed, defaults=defaults, **fields)
    except (ValueError, TypeError) as exc:
        raise UserError(f"field student.config: cannot build the student: {exc}") from None
    for p in student.parameters():
        p.requires_grad_(True)
    return with_recipe_dropout(student, cfg)


def pad_id_of(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS, else 0."""
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP-style wrappers (their `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def causal_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's raw output logits for `ids`: a Hugging Face model with `use_cache=False`, any other module
    with the attention mask when its forward takes one."""
    inner = unwrap(model)  # DDP's forward takes (*inputs, **kwargs): ask the model it wraps
    if hasattr(inner, "config") and hasattr(inner, "save_pretrained"):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    else:
        try:
            takes_mask = "attention_mask" in inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            takes_mask = False
        out = model(ids, attention_mask=mask) if takes_mask else model(ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def check_vocab(model: nn.Module, role: str, *, tokenizer: Any, pad_id: int, raw_logits: RawLogits) -> None:
    """A causal LM must return `[batch, tokens, vocab]` logits over at least the tokenizer's ids."""
    probe = torch.tensor([[pad_id, pad_id]], device=device_of(model))
    with torch.inference_mode():
        logits = raw_logits(model, probe, torch.ones_like(probe))
    if logits.ndim != 3 or logits.shape[:2] != probe.shape:
        raise UserError(f"{role}: a causal_lm model must return logits [batch, tokens, vocab] (or an object "
                        f"with .logits); got shape {tuple(logits.shape)} for input {tuple(probe.shape)}")
    if logits.shape[-1] < len(tokenizer):
        raise UserError(f"{role}: the model predicts {logits.shape[-1]} token ids but the tokenizer "
                        f"{tokenizer_name(tokenizer)} has {len(tokenizer)}; they do not belong together")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def lm_head_inputs(model: nn.Module, forward: Callable[[], torch.Tensor], vocab_size: int) -> LMHeadInputs:
    """The model run up to its lm_head: hidden states `[B, T, H]` and the head's weight and bias.

    `forward()` runs the model's own forward (through a DDP wrapper, so gradients still synchronise) with the
    head answering its input unchanged for the duration of the call, so the `[B, T, V]` logits are never made.
    """
    head = unwrap(model).get_output_embeddings()
    own_forward = head.__dict__.get("forward")  # e.g. a hook that replaced it
    head.forward = _identity
    try:
        hidden = forward()
    finally:
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward
    return LMHeadInputs(hidden, head.weight, head.bias, vocab_size)


def check_fused_head(model: nn.Module, vocab_size: int, raw_logits: RawLogits) -> None:
    """trainer.fused_lm_head needs a student whose logits are exactly `hidden @ lm_head.weight.T (+ bias)`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UserError(f"trainer.fused_lm_head needs a Hugging Face causal LM student with a linear output "
                        f"layer (get_output_embeddings()); this student ({type(model).__name__}) has "
                        f"{type(head).__name__ if head is not None else 'none'}. Turn fused_lm_head off")
    # distinct real ids (a padding id may embed to zeros, which hides any post-processing)
    probe = (torch.arange(8, device=device_of(model)) * 7919 % vocab_size)[None]
    mask = torch.ones_like(probe)
    mode = model.training
    model.eval()
    with torch.inference_mode():
        want = raw_logits(model, probe, mask).float()
        got = lm_head_inputs(model, lambda: raw_logits(model, probe, mask), vocab_size)
        logits = nn.functional.linear(got.hidden.float(), head.weight.float(),
                                      None if head.bias is None else head.bias.float())
    model.train(mode)
    if got.hidden.shape[-1] != head.in_features or not torch.allclose(logits, want, rtol=1e-4, atol=1e-4):
        raise UserError(f"trainer.fused_lm_head: the student's ({type(model).__name__}) logits are not its "
                        f"hidden states times its lm_head (the model post-processes them, e.g. soft-capping "
                        f"or scaling); turn fused_lm_head off for this model")


def token_ce_sum(student_signal: torch.Tensor | LMHeadInputs, targets: torch.Tensor, *,
                 chunk_size: int = 1024) -> torch.Tensor:
    """Summed float32 token cross-entropy on `targets` (-100 ignored), from logits `[B, T, V]` or from the
    fused lm_head's inputs (`chunk_size` tokens at a time)."""
    if isinstance(student_signal, LMHeadInputs):
        return fused_linear_cross_entropy(student_signal.hidden, student_signal.weight, targets,
                                          lm_head_bias=student_signal.bias, vocab_size=student_signal.vocab_size,
                                          reduction="sum", chunk_size=chunk_size)
    return nn.functional.cross_entropy(student_signal.flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=-100, reduction="sum")


def fused_chunk_size(recipe: Recipe) -> int:
    """The fused lm_head's chunk of tokens: the first objective's `chunk_size`, else 1024."""
    return next((o.params["chunk_size"] for o in recipe.objectives if o.params.get("chunk_size")), 1024)
