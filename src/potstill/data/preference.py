"""Preference pairs for preference distillation (`data.format: preference`, LLaVA-MoD's DPO stage).

A record is ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (JSONL, CSV, Parquet or a `datasets` folder; other
column names map through `columns:`): the completion `chosen` is preferred to `rejected` after `prompt`.

Each record becomes one example: the chosen sequence as the example itself (``input_ids``, ``targets``: the
targets are the chosen completion's tokens, -100 on the prompt) and the rejected sequence under ``rejected`` in the
same layout. A micro-batch of B pairs is collated as 2B rows, the B chosen rows then the B rejected rows in the
same order (`pair_rows`), which is the layout `potstill.losses.preference.dpo_teacher_ref` reads.

Pairs from an endpoint teacher (`verified_pairs`): run `potstill generate` with a `match` or `verifier` filter
(its endpoint client brings the response cache, retries and resume) once per sample, e.g. with temperature > 0
and a different seed into a different output each time; each prompt with at least one kept completion and one
rejected response becomes a pair (chosen = the first kept, rejected = the first rejected, in the outputs' order).

Pairs from plain text, offline (`continuation_pairs`, `builtin:bbc-continuations`): the prompt is a passage's
first 40 words, chosen its next 12 words, rejected the words at the same place of another passage: the
language model's "which span follows?" judgement, in the same layout as the LM suite's held-out continuation
items (`potstill.data.lm_suite_sources`), which are drawn from other sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from potstill.data.lm_records import LMRecordEncoder, text_field
from potstill.errors import UserError

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def preference_examples(records: list[dict], encoder: LMRecordEncoder, field: str, *,
                        is_main: bool = True) -> list[dict[str, Any]]:
    """One example per record (module docstring); records whose two completions are the same text, or whose
    completions both fall beyond data.max_length, are refused with the record's number."""
    examples = []
    cut = 0
    for i, rec in enumerate(records):
        where = f"{field}, record {i}"
        prompt = text_field(rec["prompt"], "prompt", where)
        chosen = text_field(rec["chosen"], "chosen", where)
        rejected = text_field(rec["rejected"], "rejected", where)
        if chosen == rejected:
            raise UserError(f"{where}: 'chosen' and 'rejected' are the same text; a preference pair needs two "
                            f"different completions")
        views = []
        for completion in (chosen, rejected):
            ids, counted = encoder.prompt_completion(prompt, completion)
            cut += len(ids) > encoder.max_length
            views.append(encoder.example(ids, counted))
        if not any(t != -100 for view in views for t in view["targets"]):
            raise UserError(f"{where}: the prompt fills data.max_length ({encoder.max_length} tokens), so neither "
                            f"completion is scored; raise data.max_length or shorten the prompt")
        examples.append({**views[0], "rejected": views[1]})
    if not examples:
        raise UserError(f"{field}: no preference pairs (records with prompt, chosen and rejected)")
    if is_main:
        from potstill.ui import console

        note = f" ({cut:,} sequences cut to max_length {encoder.max_length})" if cut else ""
        console.print(f"{field}: {len(records):,} preference pairs → {2 * len(examples):,} sequences{note}")
    return examples


def pair_rows(records: list[dict]) -> list[dict] | None:
    """The rows of a pair micro-batch: the chosen sequences, then the rejected ones in the same order; None when
    the records are not pairs."""
    pairs = sum("rejected" in ex for ex in records)
    if not pairs:
        return None
    if pairs != len(records):
        raise ValueError("a micro-batch mixes preference pairs with single sequences")
    return list(records) + [ex["rejected"] for ex in records]


def verified_pairs(outputs: list[str | Path], *, column: str = "prompt") -> list[dict[str, str]]:
    """Preference pairs from `potstill generate` outputs (`out.jsonl` with its `out.rejected.jsonl`; module
    docstring), in the order prompts first appear. Prompts read from chat `messages` are left out."""
    kept: dict[str, str] = {}
    refused: dict[str, str] = {}
    for out in map(Path, outputs):
        rejected_file = out.with_name(out.name.removesuffix(".jsonl") + ".rejected.jsonl")
        for path, key, into in ((out, "completion", kept), (rejected_file, "response", refused)):
            if not path.exists():
                raise UserError(f"{path}: no such file; verified_pairs reads the outputs of `potstill generate` "
                                f"with a match or verifier filter (out.jsonl and out.rejected.jsonl)")
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise UserError(f"{path}, line {n}: not JSON") from None
                prompt = row.get(column, row.get("input"))
                if isinstance(prompt, str) and isinstance(row.get(key), str):
                    into.setdefault(prompt, row[key])
    return [{"prompt": p, "chosen": kept[p], "rejected": refused[p]} for p in kept
            if p in refused and kept[p] != refused[p]]


def continuation_pairs(texts: list[str], *, context_words: int = 40, option_words: int = 12,
                       seed: str = "continuation-pairs") -> list[dict[str, str]]:
    """One preference pair per passage of at least `context_words + option_words` words (module docstring):
    the rejected span comes from another passage drawn with a seeded generator (never the same span), and both
    completions start with a space, as the LM suite scores options."""
    import random

    from potstill.data.lm_suite_sources import passage_spans

    prompts, spans = passage_spans(texts, context_words=context_words, option_words=option_words)
    rng = random.Random(seed)
    pairs = []
    for i, prompt in enumerate(prompts):
        others = [j for j in range(len(spans)) if spans[j] != spans[i]]
        if others:
            pairs.append({"prompt": prompt, "chosen": " " + spans[i], "rejected": " " + spans[rng.choice(others)]})
    return pairs
