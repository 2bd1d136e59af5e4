"""In-context learning records with a demonstration pool, and the M demonstration-set variants BiAlign reads.

A record is ``{"query": str, "target": str, "pool": [{"input": str, "output": str}, ...]}``: the query of one task,
its answer, and the candidate demonstrations of that task. For each record `DemoSetCollator` draws M sets of
`shots` demonstrations from the pool (distinct sets where the pool allows; draws seeded by the collator's seed and
the record's index, so teacher and student, and every epoch, see the same strings). A record may instead give its
own sets, ``"demo_sets": [[{"input": str, "output": str}, ...], ...]`` (exactly M of them, any number of demos
each), which are used as they are. Each set becomes one prompt

    demo_1 · sep · demo_2 · sep · … · sep · query      (each demo: `PromptTemplate.demo`, the query: `.query`)

and appends the target. A micro-batch of B records becomes B·M rows, the M variants of record 0 first: the layout
`potstill.losses.bialign.bialign` reads. ``targets[j]`` is the token to predict at position j (the project's
causal-LM convention), -100 everywhere but the target's tokens.

Tokenization is a callable `encode(text) -> list[int]` (an HF tokenizer: ``lambda s: tok(s,
add_special_tokens=False).input_ids``); prompt and target are encoded apart so the target's tokens do not depend on
the demonstrations before it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from potstill.errors import UserError


@dataclass(frozen=True)
class Demo:
    input: str
    output: str


@dataclass(frozen=True)
class ICLQuery:
    """One query of a task, its answer and the task's candidate demonstrations."""

    query: str
    target: str
    pool: tuple[Demo, ...]
    sets: tuple[tuple[int, ...], ...] | None = None  # given demo sets (indices into `pool`); None: drawn


@dataclass(frozen=True)
class PromptTemplate:
    """How a demonstration and the query are written; `{input}` / `{output}` are filled in."""

    demo: str = "{input} {output}"
    query: str = "{input}"
    separator: str = " "
    target_prefix: str = " "


def _demos(items: Any, where: str, name: str) -> list[Demo]:
    if not isinstance(items, list) or not items:
        raise UserError(f"{where}: {name!r} must be a non-empty list of {{input, output}} demonstrations")
    demos = []
    for j, demo in enumerate(items):
        if not isinstance(demo, dict) or not isinstance(demo.get("input"), str) \
                or not isinstance(demo.get("output"), str):
            raise UserError(f"{where}: {name}[{j}] must be {{'input': text, 'output': text}}, got {demo!r}")
        demos.append(Demo(demo["input"], demo["output"]))
    return demos


def icl_queries(records: Sequence[dict[str, Any]], field: str = "data", *,
                num_sets: int | None = None) -> list[ICLQuery]:
    """Records → `ICLQuery`s; a malformed record is a `UserError` naming `field`, the record and what is wrong.
    `num_sets`: the M a record's own ``demo_sets`` must have (None: any)."""
    queries = []
    for i, rec in enumerate(records):
        where = f"{field}, record {i}"
        for key in ("query", "target"):
            if key not in rec:
                raise UserError(f"{where}: no {key!r}; an ICL record has query, target and pool (or demo_sets)")
        if ("pool" in rec) == ("demo_sets" in rec):
            raise UserError(f"{where}: give either 'pool' (demonstrations to draw sets from) or 'demo_sets' (the "
                            f"sets themselves), not {'both' if 'pool' in rec else 'neither'}")
        if not isinstance(rec["query"], str) or not isinstance(rec["target"], str) or not rec["target"]:
            raise UserError(f"{where}: 'query' and 'target' must be text (target not empty)")
        if "pool" in rec:
            queries.append(ICLQuery(rec["query"], rec["target"], tuple(_demos(rec["pool"], where, "pool"))))
            continue
        given = rec["demo_sets"]
        if not isinstance(given, list) or (num_sets is not None and len(given) != num_sets):
            raise UserError(f"{where}: 'demo_sets' must be a list of {num_sets or 'M'} demonstration sets (data.icl."
                            f"num_sets), got {len(given) if isinstance(given, list) else type(given).__name__}")
        pool: dict[Demo, int] = {}
        sets = tuple(tuple(pool.setdefault(d, len(pool)) for d in _demos(s, where, f"demo_sets[{k}]"))
                     for k, s in enumerate(given))
        queries.append(ICLQuery(rec["query"], rec["target"], tuple(pool), sets))
    return queries


def sample_demo_sets(pool_size: int, *, num_sets: int, shots: int, seed: int) -> list[tuple[int, ...]]:
    """`num_sets` ordered sets of `shots` distinct pool indices, drawn by `random.Random(seed)`; the sets are
    distinct as sets while the pool has enough combinations, else they may repeat."""
    if shots < 1 or num_sets < 1:
        raise ValueError(f"shots and num_sets must be >= 1, got {shots} and {num_sets}")
    if shots > pool_size:
        raise UserError(f"a demonstration pool of {pool_size} cannot give {shots} shots; lower shots or grow the pool")
    rng = random.Random(seed)
    distinct = sum(1 for _ in itertools.islice(itertools.combinations(range(pool_size), shots), num_sets))
    sets: list[tuple[int, ...]] = []
    seen: set[frozenset[int]] = set()
    while len(sets) < num_sets:
        draw = tuple(rng.sample(range(pool_size), shots))
        if frozenset(draw) in seen and len(seen) < distinct:
            continue
        seen.add(frozenset(draw))
        sets.append(draw)
    return sets


def build_prompt(demos: Sequence[Demo], query: str, template: PromptTemplate = PromptTemplate()) -> str:
    """The ICL prompt: each demonstration, then the query, joined by the template's separator."""
    parts = [template.demo.format(input=d.input, output=d.output) for d in demos]
    return template.separator.join([*parts, template.query.format(input=query)])


class DemoSetCollator:
    """B ICL records → B·M rows (module docstring). `collate(examples, indices)` returns ``input_ids``,
    ``attention_mask`` (right padding with `pad_id`), ``targets`` and ``demo_sets`` (`[B, M, shots]` pool
    indices, -1 after the end of a shorter given set). The draw for a record depends on (`seed`, its index) only."""

    def __init__(self, encode: Callable[[str], list[int]], *, num_sets: int = 4, shots: int = 4, seed: int = 0,
                 pad_id: int = 0, template: PromptTemplate = PromptTemplate()) -> None:
        if num_sets < 2:
            raise UserError(f"num_sets must be at least 2 (BiAlign ranks demonstration sets), got {num_sets}")
        self.encode, self.num_sets, self.shots, self.seed = encode, num_sets, shots, seed
        self.pad_id, self.template = pad_id, template

    def demo_sets(self, example: ICLQuery, index: int) -> list[tuple[int, ...]]:
        """The record's own sets when it gives them (M of them), else M sets drawn for (`seed`, `index`)."""
        if example.sets is not None:
            if len(example.sets) != self.num_sets:
                raise UserError(f"record {index} gives {len(example.sets)} demo_sets; num_sets is {self.num_sets}")
            return list(example.sets)
        return sample_demo_sets(len(example.pool), num_sets=self.num_sets, shots=self.shots,
                                seed=self.seed * 1_000_003 + index)

    def variants(self, example: ICLQuery, index: int) -> list[tuple[str, str]]:
        """(prompt, target text) of each of the record's M demonstration sets."""
        target = self.template.target_prefix + example.target
        return [(build_prompt([example.pool[j] for j in chosen], example.query, self.template), target)
                for chosen in self.demo_sets(example, index)]

    def encode_row(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """Token ids of prompt + target, and their next-token targets (-100 but on the target's tokens)."""
        prompt_ids, target_ids = self.encode(prompt), self.encode(target)
        if not prompt_ids or not target_ids:
            raise UserError(f"an ICL prompt or target encodes to no tokens: {prompt!r} → {target!r}")
        ids = prompt_ids + target_ids
        targets = [-100] * (len(prompt_ids) - 1) + target_ids + [-100]
        return ids, targets

    def __call__(self, examples: Sequence[ICLQuery], indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.encode_row(p, t) for ex, i in zip(examples, indices, strict=True)
                for p, t in self.variants(ex, i)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, tgt) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            targets[r, :len(tgt)] = torch.tensor(tgt)
            attention[r, :len(ids)] = 1
        chosen = [self.demo_sets(ex, i) for ex, i in zip(examples, indices, strict=True)]
        shots = max(len(s) for sets in chosen for s in sets)
        sets = torch.tensor([[list(s) + [-1] * (shots - len(s)) for s in sets] for sets in chosen])
        return {"input_ids": input_ids, "attention_mask": attention, "targets": targets, "demo_sets": sets}
