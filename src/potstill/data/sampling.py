"""Sampling completions from a causal LM: the student's for on-policy distillation (`potstill.data.on_policy`),
the teacher's for sequence-level KD (`potstill.teachers.seq_kd`), greedy labels for evaluation (`eval.lm`).

`sample_completions` is deterministic given `seed` (it forks the RNG), so a resumed run draws the same student
samples at the same step. It uses the model's own `generate` (KV cache) when it has one, else a plain loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn. `temperature=0` is greedy; `top_k=0` and `top_p=1.0` disable those filters.

    Defaults follow TRL's GKD: 128 new tokens, temperature 0.9, no top-k / top-p filtering."""

    max_new_tokens: int = 128
    temperature: float = 0.9
    top_k: int = 0
    top_p: float = 1.0


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _plain_loop(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, settings: SamplingSettings,
                eos_token_id: int | None) -> torch.Tensor:
    """Sampling without a KV cache, for modules without `generate`; returns only the new tokens."""
    new = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(settings.max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask)
        logits = (out.logits if hasattr(out, "logits") else out)[:, -1, :].float()
        if settings.temperature == 0:
            token = logits.argmax(-1)
        else:
            logits = _filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
            token = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        new.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(token[:, None])], 1)
        if eos_token_id is not None and bool(done.all()):
            break
    return torch.stack(new, 1) if new else ids[:, :0]


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: Sequence[Sequence[int]], *, settings: SamplingSettings,
                       pad_token_id: int, eos_token_id: int | None, seed: int) -> list[list[int]]:
    """Sample one completion per prompt (token ids; the first EOS is kept, nothing after it).

    Prompts are left-padded into one batch. The model is put in eval mode while sampling and restored after.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if len(prompt):
            ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[i, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if hasattr(model, "generate"):
                greedy = settings.temperature == 0
                sampling = {} if greedy else {"temperature": settings.temperature, "top_k": settings.top_k,
                                              "top_p": settings.top_p}
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=not greedy,
                                     max_new_tokens=settings.max_new_tokens, pad_token_id=pad_token_id,
                                     eos_token_id=eos_token_id, **sampling)
                new = out[:, width:]
            else:
                new = _plain_loop(model, ids, mask, settings, eos_token_id)
    finally:
        model.train(was_training)
    completions = []
    for row in new.tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        completions.append(row)
    return completions


def sampling_settings(generation: Any) -> SamplingSettings:
    """The recipe's `generation` section (max_new_tokens, temperature, top_k, top_p) as `SamplingSettings`."""
    return SamplingSettings(max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
                            top_k=generation.top_k, top_p=generation.top_p)
