"""Distilling step-by-step (Hsieh et al., 2023): train on the teacher's labels and its rationales, as two tasks.

Each record holds an input, a label and a rationale (the teacher's text, e.g. written by `potstill
generate`). It gives two aligned views, both text → text:

- the label view: label_prefix + input → label;
- the rationale view: rationale_prefix + input → rationale.

A micro-batch holds both views of the same records (the B label views, then the B rationale views in the
same order; `view` [2B] says which: 0 label, 1 rationale), and the loss mixes the two views' token-mean
cross-entropies:

    L = α · CE(label tokens) + (1 − α) · CE(rationale tokens)        (default α = 0.5)

α = 1 drops the rationale view: plain fine-tuning on (label_prefix + input → label). At inference only the
label prefix is used. This follows the official code (google-research/distilling-step-by-step:
`TaskPrefixDataCollator` feeds both views, `TaskPrefixTrainer.compute_loss` is
``alpha * pred_outputs.loss + (1 - alpha) * expl_outputs.loss``, prefixes `predict: ` / `explain: `).

The training loop divides a micro-batch's summed loss by its rows (`count_label_tokens`: the label view's
counted tokens), so `step_by_step_sum` scales the rationale sum to keep each term a mean over its own view.
The causal_lm task builds its views with `causal_lm_views`, the seq2seq task with `step_by_step_examples`;
both mix them with `step_by_step_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from potstill.data.lm_records import LMRecordEncoder, text_field


def required_columns(sbs: Any, *, train: bool) -> tuple[str, ...]:
    """The columns every record needs: input and label, plus the rationale in training unless alpha = 1."""
    rationale = (sbs.rationale_column,) if train and sbs.alpha < 1 else ()
    return (sbs.input_column, sbs.label_column, *rationale)


def has_rationales(records: list[dict], sbs: Any, *, train: bool) -> bool:
    """Whether the examples get a rationale view: in training unless alpha = 1; in evaluation when every
    record has a non-blank rationale."""
    if train:
        return sbs.alpha < 1
    return all(isinstance(rec.get(sbs.rationale_column), str) and rec[sbs.rationale_column].strip()
               for rec in records)


def step_by_step_examples(records: list[dict], sbs: Any, field: str,
                          make_view: Callable[[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Record i → example i: its label view `make_view(label_prefix + input, label)`, with the rationale view
    `make_view(rationale_prefix + input, rationale)` under `example["rationale"]` when `has_rationales`."""
    with_rationale = has_rationales(records, sbs, train=field == "data.train")
    examples = []
    for i, rec in enumerate(records):
        where = f"{field}, record {i}"
        text = text_field(rec[sbs.input_column], sbs.input_column, where)
        example = make_view(sbs.label_prefix + text, text_field(rec[sbs.label_column], sbs.label_column, where))
        if with_rationale:
            example["rationale"] = make_view(sbs.rationale_prefix + text, text_field(
                rec[sbs.rationale_column], sbs.rationale_column, where))
        examples.append(example)
    return examples


def causal_lm_views(records: list[dict], sbs: Any, field: str, encoder: LMRecordEncoder, *,
                    is_main: bool = True) -> list[dict[str, Any]]:
    """`step_by_step_examples` for a causal LM: each view is a prompt/completion example of `encoder` (cut to
    max_length) whose targets are the label's or the rationale's tokens."""
    truncated = 0

    def view(prompt: str, completion: str) -> dict[str, list[int]]:
        nonlocal truncated
        ids, counted = encoder.prompt_completion(prompt, completion)
        truncated += len(ids) > encoder.max_length
        return encoder.example(ids, counted)

    examples = step_by_step_examples(records, sbs, field, view)
    if is_main:
        from potstill.ui import console

        labels = sum(t != -100 for ex in examples for t in ex["targets"])
        rationales = sum(t != -100 for ex in examples for t in ex.get("rationale", {}).get("targets", ()))
        note = f" ({truncated:,} views cut to max_length {encoder.max_length})" if truncated else ""
        extra = f" + {rationales:,} rationale" if has_rationales(records, sbs, train=field == "data.train") else ""
        console.print(f"{field}: {len(records):,} step-by-step records → {labels:,} label{extra} target "
                      f"tokens{note}")
    return examples


def step_by_step_rows(records: list[dict]) -> tuple[list[dict], torch.Tensor] | None:
    """The rows of a step-by-step micro-batch: the records' label views, then their rationale views (each
    record's `rationale`, same order), and the view of each row (0 label, 1 rationale); None when no record
    has a rationale view (plain records, or step-by-step with alpha = 1)."""
    with_view = sum("rationale" in ex for ex in records)
    if not with_view:
        return None
    if with_view != len(records):
        raise ValueError("a step-by-step micro-batch mixes records with and without a rationale view")
    view = torch.tensor([0] * len(records) + [1] * len(records), dtype=torch.long)
    return list(records) + [ex["rationale"] for ex in records], view


def split_views(targets: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`targets` [R, T] as (label-view targets, rationale-view targets), the other view's rows set to -100."""
    is_rationale = (view == 1)[:, None]
    return targets.masked_fill(is_rationale, -100), targets.masked_fill(~is_rationale, -100)


def count_label_tokens(targets: torch.Tensor, view: torch.Tensor | None) -> int:
    """Counted targets (≠ -100), of the label-view rows only when `view` is given."""
    keep = targets != -100
    if view is not None:
        keep &= (view == 0)[:, None]
    return int(keep.sum())


def view_sums(logits: torch.Tensor, targets: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed float32 token cross-entropy of the label-view rows and of the rationale-view rows, from one
    log-softmax over `logits` [R, T, V]."""
    per_token = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                            reduction="none").view_as(targets)
    is_rationale = (view == 1)[:, None]
    return per_token.masked_fill(is_rationale, 0.0).sum(), per_token.masked_fill(~is_rationale, 0.0).sum()


def step_by_step_sum(label_sum: torch.Tensor, label_tokens: int, rationale_sum: torch.Tensor,
                     rationale_tokens: int, alpha: float) -> torch.Tensor:
    """The micro-batch's summed step-by-step loss, to be divided by its label tokens (the loop's rows):

        α·S_label + (1 − α)·S_rationale · N_label / N_rationale,

    so that S / N_label = α·mean CE(label tokens) + (1 − α)·mean CE(rationale tokens), each a token mean over
    its own view: the official code's ``alpha * pred_outputs.loss + (1 - alpha) * expl_outputs.loss``
    (google-research/distilling-step-by-step, model_utils.py, TaskPrefixTrainer.compute_loss; default α 0.5).
    With gradient accumulation or several processes the label term is the token mean over the whole step
    (as plain fine-tuning) and each micro-batch's rationale mean is weighted by its share of label tokens.
    """
    if rationale_tokens == 0 or alpha == 1:
        return alpha * label_sum
    return alpha * label_sum + (1.0 - alpha) * rationale_sum * (label_tokens / rationale_tokens)


def step_by_step_loss(logits: Any, targets: torch.Tensor, view: torch.Tensor, alpha: float, *,
                      ce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """`step_by_step_sum` of a micro-batch with views: the label and rationale sums come from one
    log-softmax over `logits` [R, T, V] (`view_sums`), or from `ce_sum(targets of one view)` when given
    (e.g. the fused lm_head, which never makes the logits)."""
    label_targets, rationale_targets = split_views(targets, view)
    if ce_sum is not None:
        label_sum, rationale_sum = ce_sum(label_targets), ce_sum(rationale_targets)
    else:
        label_sum, rationale_sum = view_sums(logits, targets, view)
    return step_by_step_sum(label_sum, int((label_targets != -100).sum()), rationale_sum,
                            int((rationale_targets != -100).sum()), alpha)
