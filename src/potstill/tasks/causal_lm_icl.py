"""In-context-learning records in the causal_lm task (`data.format: icl`): how BiAlign's batches reach objectives.

BiAlign (Qin et al. 2023, `potstill.losses.bialign`) scores M demonstration sets per query with both models. With
`data.format: icl` each record (query, target, and a demo pool or its own `demo_sets`, `potstill.data.icl_demos`)
becomes M prompt variants, tokenized once at set-up: the sets drawn from the pool depend only on (recipe seed,
record index), so every epoch and a resumed run see the same strings, and teacher and student read the same rows.
A micro-batch of B records has B·M rows, the M variants of record 0 first (`icl_rows`).

Both models' signals are `DemoSetLogits`: the `[B·M, T, V]` logits with the token ids they score and M; the
teacher's also carries its `[B, M]` demo-set scores, computed in the teacher pass. `DemoSetObjective` points each
objective at it:

- `bialign` (kind "demo_sets") gets logits, labels, M and the teacher's scores;
- a stateless logit divergence (e.g. `forward_kl`: KD alone, BiAlign's μ = 0 baseline) reads every row's target
  tokens, as on plain records.

A row of the loop (what `count_rows` counts and the loop divides by) is a counted target token, as for any causal_lm
record. BiAlign's rank term is a mean over queries, so its objective returns `bialign(…, reduction="mean")` × the
micro-batch's counted tokens: on one micro-batch the loop's loss is exactly the Python API's mean, and under
gradient accumulation each micro-batch's mean is weighted by its tokens.

Evaluation on data.eval (ICL records too): the token metrics on every variant's target, `answer_accuracy` (share
of variants whose every target token is the model's argmax) and, for the student, `demo_set_tau` (Kendall τ-a
between the teacher's and the student's M demo-set scores, averaged over queries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from potstill.errors import UserError

ICL_FIELDS = ("query", "target")  # plus `pool` or `demo_sets` (checked by `potstill.data.icl_demos.icl_queries`)


@dataclass
class DemoSetLogits:
    """The logits `[B·M, T, V]` of B queries × M demo-set prompts, the `targets` `[B·M, T]` they score, M, and
    for the teacher its demo-set `scores` `[B, M]`."""

    logits: torch.Tensor
    targets: torch.Tensor
    num_sets: int
    scores: torch.Tensor | None = None


def icl_examples(records: list[dict], cfg: Any, tokenizer: Any, *, seed: int, max_length: int,
                 field: str) -> list[dict[str, Any]]:
    """Each record's M variants, tokenized: ``{"variants": [{"input_ids", "targets"}, ...]}`` (`cfg`:
    `data.icl`). A variant longer than `max_length` is a UserError naming the record."""
    from potstill.data.icl_demos import DemoSetCollator, PromptTemplate, icl_queries

    queries = icl_queries(records, field, num_sets=cfg.num_sets)
    template = PromptTemplate(demo=cfg.demo_template, query=cfg.query_template, separator=cfg.separator,
                              target_prefix=cfg.target_prefix)
    collator = DemoSetCollator(lambda text: tokenizer(text, add_special_tokens=False).input_ids,
                               num_sets=cfg.num_sets, shots=cfg.shots, seed=seed, template=template)
    examples = []
    for i, query in enumerate(queries):
        try:
            rows = [collator.encode_row(prompt, target) for prompt, target in collator.variants(query, i)]
        except (KeyError, IndexError) as err:
            raise UserError(f"{field}, record {i}: data.icl.demo_template / query_template: {{input}} and "
                            f"{{output}} are the only fields ({err!r})") from None
        except UserError as err:
            raise UserError(f"{field}, record {i}: {err}") from None
        longest = max(len(ids) for ids, _ in rows)
        if longest > max_length:
            raise UserError(f"{field}, record {i}: a prompt with its demonstrations is {longest} tokens, more than "
                            f"data.max_length = {max_length}; raise data.max_length or lower data.icl.shots")
        examples.append({"variants": [{"input_ids": ids, "targets": targets} for ids, targets in rows]})
    return examples


def is_icl_record(record: dict) -> bool:
    """Whether a record is an ICL record (`data.format: auto` picks icl): a query with a pool or demo_sets."""
    return "query" in record and ("pool" in record or "demo_sets" in record)


def icl_rows(records: list[dict]) -> list[dict] | None:
    """The B·M rows of a micro-batch of ICL examples (record-major), or None for other records."""
    if not records or "variants" not in records[0]:
        return None
    return flat_rows(records)


def flat_rows(examples: list[dict]) -> list[dict]:
    return [row for ex in examples for row in ex["variants"]]


def icl_lengths(examples: list[dict]) -> list[int]:
    """Each example's longest variant (what trainer.group_by_length sorts by)."""
    return [max(len(row["input_ids"]) for row in ex["variants"]) for ex in examples]


def teacher_demo_sets(logits: torch.Tensor, targets: torch.Tensor, num_sets: int) -> DemoSetLogits:
    """The teacher's signal: its logits and its demo-set scores (`potstill.losses.bialign.demo_set_scores`)."""
    from potstill.losses.bialign import demo_set_scores

    with torch.no_grad():
        scores = demo_set_scores(logits, targets).view(-1, num_sets)
    return DemoSetLogits(logits, targets, num_sets, scores)


@dataclass
class DemoSetObjective:
    """Objective `name` (`fn` of kind `kind`, "demo_sets" or "logits") on `DemoSetLogits` (module docstring);
    called by the loop as `fn(student, teacher, mask=…, reduction="sum", **params)`. On plain logits (records that
    are not ICL) a logit divergence is `fn` itself."""

    name: str
    fn: Callable[..., torch.Tensor]
    kind: str

    def __call__(self, student: Any, teacher: Any, *, mask: torch.Tensor | None = None, reduction: str = "sum",
                 **params: Any) -> torch.Tensor:
        if not isinstance(student, DemoSetLogits) or not isinstance(teacher, DemoSetLogits):
            if self.kind == "demo_sets":
                raise RuntimeError(f"objective {self.name!r} reads demonstration sets; the task gave "
                                   f"{type(student).__name__}")
            return self.fn(student, teacher, mask=mask, reduction=reduction, **params)
        if self.kind == "logits":
            return self.fn(student.logits, teacher.logits, mask=student.targets != -100, reduction=reduction,
                           **params)
        if reduction != "sum":
            raise ValueError(f"the loop sums objectives per micro-batch; got reduction {reduction!r}")
        mean = self.fn(student.logits, teacher.logits, labels=student.targets, num_sets=student.num_sets,
                       teacher_scores=teacher.scores, reduction="mean", **params)
        return mean * (student.targets != -100).sum()


def adapt_icl_objective(name: str, fn: Any) -> Any:
    """`fn` (objective `name`'s function, or another task adapter's wrapper of it) as a `DemoSetObjective` when it
    is a demo-set objective or a stateless logit divergence; other objectives unchanged (`check_icl_objectives`
    refuses them on ICL records). The task does not know its records yet, so the wrapper serves both."""
    from potstill.losses.catalogue import CROSS_TOKENIZER_OBJECTIVES, OBJECTIVES

    info = OBJECTIVES.get(name)
    if info is None or info.kind not in ("logits", "demo_sets") or info.stateful:
        return fn
    if name in CROSS_TOKENIZER_OBJECTIVES:  # span losses
        return fn
    return DemoSetObjective(name, fn, info.kind)


def check_icl_objectives(objectives: list[Any], *, icl: bool) -> None:
    """Refuse a demo-set objective on records that are not ICL records, and on ICL records any objective other
    than demo-set objectives and stateless logit divergences (`objectives`: the recipe's entries, with `name`)."""
    from potstill.losses.catalogue import CROSS_TOKENIZER_OBJECTIVES, OBJECTIVES

    for i, objective in enumerate(objectives):
        name, info = objective.name, OBJECTIVES[objective.name]
        if info.kind == "demo_sets" and not icl:
            raise UserError(f"field objectives.{i}.name: {name} ranks demonstration sets; it needs data.format: icl "
                            f"(records with query, target and a demo pool or demo_sets)")
        if icl and (info.kind not in ("logits", "demo_sets") or info.stateful or name in CROSS_TOKENIZER_OBJECTIVES):
            raise UserError(f"field objectives.{i}.name: with ICL records (data.format: icl) the objectives are "
                            f"bialign and stateless logit divergences on the targets (e.g. forward_kl), not {name}")


def check_icl_recipe(recipe: Any) -> None:
    """Refuse what a causal_lm recipe cannot combine with ICL records (one line naming the field)."""
    refused = {"data.packing": recipe.data.packing, "data.domains": recipe.data.domains is not None,
               "teacher.cache": recipe.teacher.cache is not None, "trainer.fused_lm_head": recipe.trainer.fused_lm_head,
               "generation.lmbda": bool(recipe.generation.lmbda), "generation.seq_kd": recipe.generation.seq_kd,
               "mgsr": recipe.mgsr is not None, "student.tokenizer": recipe.student.tokenizer is not None}
    for field, used in refused.items():
        if used:
            raise UserError(f"field {field}: ICL records (data.format: icl) are scored whole, by a live teacher "
                            f"sharing the student's tokenizer, M prompts per query; turn {field} off")


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """τ-a of each row of `[B, M]` `a` against `b`: (concordant − discordant pairs) / (M(M−1)/2), `[B]`."""
    m = a.shape[-1]
    da, db = a.unsqueeze(-1) - a.unsqueeze(-2), b.unsqueeze(-1) - b.unsqueeze(-2)
    signs = torch.sign(da) * torch.sign(db)
    return signs.triu(diagonal=1).sum((-2, -1)) / (m * (m - 1) / 2)


def icl_metrics(model: torch.nn.Module, teacher: torch.nn.Module | None, examples: list[dict], *, num_sets: int,
                batch_size: int, batch_of: Callable[[list[dict], list[int]], dict[str, Any]],
                logits: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]) -> dict[str, float]:
    """`answer_accuracy` of `model` on the ICL `examples` and, with `teacher`, `demo_set_tau` (module docstring);
    `batch_size` queries at a time."""
    from potstill.losses.bialign import demo_set_scores

    models = [m for m in (model, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    right, rows, taus = 0.0, 0, []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            idx = list(range(start, min(start + batch_size, len(examples))))
            batch = batch_of([examples[i] for i in idx], idx)
            targets = batch["targets"]
            counted = targets != -100
            out = logits(model, batch)
            hit = (out.argmax(-1) == targets) | ~counted
            right += float(hit.all(-1).sum())
            rows += targets.shape[0]
            if teacher is not None:
                scores = demo_set_scores(out, targets).view(-1, num_sets)
                teacher_scores = demo_set_scores(logits(teacher, batch), targets).view(-1, num_sets)
                taus.append(kendall_tau(scores, teacher_scores))
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    metrics = {"answer_accuracy": right / max(rows, 1)}
    if taus:
        metrics["demo_set_tau"] = float(torch.cat(taus).mean())
    return metrics
