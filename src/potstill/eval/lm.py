"""Language-model metrics on held-out token sequences (the causal_lm and seq2seq tasks).

Over the counted targets (≠ -100) of the evaluation examples, teacher-forced:

- perplexity: exp of the mean token negative log-likelihood;
- token_accuracy: share of positions whose argmax is the target;
- with a teacher, token_agreement (same argmax as the teacher) and kl_to_teacher (mean per-token
  KL(teacher ‖ model) at temperature 1).

And generated: label_accuracy, the share of examples whose greedy continuation (up to EOS, at most as many
tokens as the longest reference) decodes to the reference's text (special tokens dropped, blanks at the ends
ignored); used for step-by-step and seq2seq labels.

Memory is bounded by evaluating at most `EVAL_TOKENS` padded tokens per forward pass and reducing
`EVAL_ROW_CHUNK` rows at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# Evaluation runs at most this many tokens per forward pass (bounds the [B, T, V] logits in memory).
EVAL_TOKENS = 1024
# Metric rows are reduced this many at a time (bounds the float32 log-softmax copies).
EVAL_ROW_CHUNK = 256

Batch = dict[str, Any]


def exp_or_inf(x: float) -> float:
    """exp(x), inf when it would overflow."""
    return math.exp(x) if x < 700 else math.inf


def length_batches(examples: list[dict], batch_size: int, max_tokens: int | None = EVAL_TOKENS
                   ) -> list[list[int]]:
    """Example indices, longest first, grouped `batch_size` at a time (and at most `max_tokens` padded tokens
    per group, when given)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    if max_tokens is None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for i in order:
        width = len(examples[batches[-1][0]]["input_ids"]) if batches else 0
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * width <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def token_stats(model: nn.Module, examples: list[dict], batches: list[list[int]], *,
                batch_of: Callable[[list[dict], list[int]], Batch], logits: Callable[[nn.Module, Batch], torch.Tensor],
                targets_key: str = "targets", teacher: nn.Module | None = None,
                row_chunk: int | None = EVAL_ROW_CHUNK) -> dict[str, float]:
    """Summed per-token statistics of `model` on `examples` (counted targets only): nll, correct, tokens;
    with `teacher` also kl (teacher ‖ model) and agree (same argmax).

    `batches` are groups of example indices, `batch_of(examples, indices)` the on-device batch of a group,
    `logits(model, batch)` its `[B, T, V]` logits aligned with `batch[targets_key]`. Rows are reduced
    `row_chunk` at a time (None: all of a batch at once). The models run in eval mode and get their mode
    back."""
    sums = {"nll": 0.0, "correct": 0.0, "tokens": 0.0, **({"kl": 0.0, "agree": 0.0} if teacher else {})}
    models = [m for m in (model, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    with torch.inference_mode():
        for idx in batches:
            batch = batch_of([examples[i] for i in idx], idx)
            keep = batch[targets_key] != -100
            if not keep.any():
                continue
            rows = keep.nonzero(as_tuple=True)
            gold = batch[targets_key][rows]
            s_all = logits(model, batch)
            t_all = logits(teacher, batch) if teacher is not None else None
            step = row_chunk or gold.numel()
            for start in range(0, gold.numel(), step):
                part = tuple(r[start:start + step] for r in rows)
                y = gold[start:start + step]
                log_s = torch.log_softmax(s_all[part].float(), -1)
                sums["nll"] -= float(log_s.gather(-1, y[:, None]).sum())
                sums["correct"] += float((log_s.argmax(-1) == y).sum())
                sums["tokens"] += y.numel()
                if t_all is not None:
                    log_t = torch.log_softmax(t_all[part].float(), -1)
                    sums["kl"] += float((log_t.exp() * (log_t - log_s)).sum())
                    sums["agree"] += float((log_t.argmax(-1) == log_s.argmax(-1)).sum())
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    return sums


def token_metrics(stats: dict[str, float]) -> dict[str, float]:
    """perplexity and token_accuracy from `token_stats`' sums; token_agreement and kl_to_teacher when they hold
    a teacher's."""
    n = max(stats["tokens"], 1.0)
    metrics = {"perplexity": exp_or_inf(stats["nll"] / n), "token_accuracy": stats["correct"] / n}
    if "kl" in stats:
        metrics.update(token_agreement=stats["agree"] / n, kl_to_teacher=stats["kl"] / n)
    return metrics


def same_text(tokenizer: Any, generated: list[int], reference: list[int]) -> bool:
    """Whether two token sequences decode to the same text (special tokens dropped, blanks at the ends
    ignored): exact match of a generated label."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    return text(generated) == text(reference)


def causal_label_accuracy(model: nn.Module, examples: list[dict[str, list[int]]], *, tokenizer: Any, pad_id: int,
                          batch_size: int) -> float:
    """Share of `examples` whose greedy continuation of the prompt by the causal LM `model` (up to EOS, at most
    as many tokens as the longest reference) decodes to the same text as the reference completion (the
    counted targets)."""
    from potstill.data.lm_records import prompt_of
    from potstill.data.sampling import SamplingSettings, sample_completions

    references = [[t for t in ex["targets"] if t != -100] for ex in examples]
    settings = SamplingSettings(max_new_tokens=max([1, *map(len, references)]), temperature=0.0)
    correct = 0
    for first in range(0, len(examples), batch_size):
        prompts = [prompt_of(ex) for ex in examples[first:first + batch_size]]
        outputs = sample_completions(model, prompts, settings=settings, pad_token_id=pad_id,
                                     eos_token_id=tokenizer.eos_token_id, seed=0)
        correct += sum(same_text(tokenizer, out, ref)
                       for out, ref in zip(outputs, references[first:first + batch_size], strict=True))
    return correct / len(examples)


def seq2seq_label_accuracy(model: nn.Module, examples: list[dict], batches: list[list[int]], *,
                           batch_of: Callable[[list[dict], list[int]], Batch], tokenizer: Any, pad_id: int) -> float:
    """Share of `examples` whose greedy generation by the encoder–decoder `model` (up to EOS, at most as many
    tokens as the longest reference) decodes to the same text as its `labels`."""
    eos = tokenizer.eos_token_id
    longest = max([1, *(len(ex["labels"]) for ex in examples)])
    correct = 0
    with torch.inference_mode():
        for idx in batches:
            chunk = [examples[i] for i in idx]
            batch = batch_of(chunk, list(range(len(chunk))))
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=longest, do_sample=False, num_beams=1, pad_token_id=pad_id,
                                 eos_token_id=eos)
            for row, ex in zip(out[:, 1:].tolist(), chunk, strict=True):  # drop the decoder start token
                if eos is not None and eos in row:
                    row = row[:row.index(eos) + 1]
                correct += same_text(tokenizer, row, ex["labels"])
    return correct / len(examples)
