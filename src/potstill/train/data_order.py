"""Which training records each global micro-batch of the Distiller holds.

Epoch e is a permutation of the records drawn from (seed, e), length-grouped with `trainer.group_by_length`
(`potstill.data.samplers.length_grouped_order`); a task may give its own epoch order (`Task.epoch_order`,
TAS-Balanced). With `data.domains` the stream is DDK's instead: blocks of `data.domains.every` optimizer steps
drawn by domain weight (`potstill.data.ddk.DomainBlocks`), re-weighted by the loop's call to `on_block_end`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from potstill.data.ddk import DomainBlocks, domains_of
from potstill.data.samplers import length_grouped_order
from potstill.tasks.base import Task


def shuffled_order(n: int, *, seed: int, epoch: int, global_batch: int,
                   lengths: Sequence[int] | None = None) -> torch.Tensor:
    """The loop's own order of epoch `epoch` over `n` records: a seeded permutation, length-grouped by
    `lengths` (global micro-batches of similar length) when given."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    if lengths is not None:
        perm = length_grouped_order(perm, lengths, global_batch, generator=gen)
    return perm


def domain_blocks(task: Task, *, run_dir: Path, seed: int, global_batch: int, grad_accum: int,
                  fresh: bool) -> DomainBlocks | None:
    """DDK's block hook for a set-up `task` when its recipe says `data.domains` (else None): domains from
    `Task.domain_records`, perplexities measured with `Task.eval_loss`. `fresh`: a new run (an earlier
    `domain_weights.json` is not replayed)."""
    recipe = getattr(task, "recipe", None)
    cfg = recipe.data.domains if recipe is not None else None
    if cfg is None:
        return None
    return DomainBlocks(
        train_domains=domains_of(task.domain_records("train"), cfg.column, "data.train"),
        eval_domains=domains_of(task.domain_records("eval"), cfg.column, "data.eval"),
        measure=task.eval_loss, student=lambda: task.student, teacher=task.teacher, run_dir=run_dir, seed=seed,
        every=cfg.every, smoothing=cfg.smoothing, eval_records=cfg.eval_records, global_batch=global_batch,
        grad_accum=grad_accum, fresh=fresh)
