"""DDK domain weighting inside the training loop (`data.domains`), for any task that can score records.

The loop's epochs become blocks of `data.domains.every` optimizer steps. At the start of block e > 0 the task
measures, on the first `eval_records` held-out records of each domain, the student's and the teacher's mean
cross-entropy; `potstill.data.DomainWeightedSampler` turns them into perplexity ratios and moves its weights
toward the lagging domains (DDK's Eq. 2, floor (1 − α)/N); the block's micro-batches are then drawn by domain
weight. The teacher's side is measured once (it is frozen).

`<run>/domain_weights.json` keeps, per block, the weights, the measured perplexities and the sampler's state
before the block was drawn. A resumed run replays a recorded block from that state instead of measuring again,
so it visits exactly the batches of the uninterrupted run; the file is also the record of how the mixture moved.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from potstill.config import DomainsConfig
from potstill.data.domain_weights import DomainWeightedSampler
from potstill.errors import UserError
from potstill.io import atomic_write_json

HISTORY_FILE = "domain_weights.json"


def domains_of(records: list[dict], column: str, where: str) -> list[Hashable]:
    """Each record's domain; a record without one is a user error naming it."""
    out = []
    for i, rec in enumerate(records):
        value = rec.get(column)
        if value is None or isinstance(value, (list, dict)):
            raise UserError(f"{where}: record {i + 1} has no domain: data.domains.column {column!r} must name a "
                            f"field with a string or integer domain in every record")
        out.append(value)
    return out


class DomainSchedule:
    """Per-block DDK sampling for one run. `measure(model, records) -> mean cross-entropy` is the task's."""

    def __init__(self, cfg: DomainsConfig, *, train_domains: list[Hashable], eval_domains: list[Hashable],
                 measure: Callable[[Any, list[int]], float], student: Callable[[], Any], teacher: Any,
                 run_dir: Path, seed: int, grad_accum: int) -> None:
        known = list(dict.fromkeys(train_domains))  # first appearance, the sampler's order
        missing = [d for d in known if d not in set(eval_domains)]
        if missing:
            raise UserError(f"data.eval has no records of domain(s) {', '.join(map(str, missing[:5]))}: DDK measures "
                            f"every training domain on held-out records of it")
        self.cfg, self.measure, self.student, self.teacher = cfg, measure, student, teacher
        self.eval_indices = {d: [i for i, x in enumerate(eval_domains) if x == d][:cfg.eval_records] for d in known}
        self.sampler = DomainWeightedSampler(train_domains, batch_size=1, smoothing=cfg.smoothing, seed=seed)
        self.grad_accum = grad_accum
        self.path = Path(run_dir) / HISTORY_FILE
        self.history: list[dict] = json.loads(self.path.read_text()) if self.path.exists() else []
        self._teacher_loss: dict | None = None
        self._drawn_until = -1  # last block whose batches the in-memory sampler has drawn

    def _losses(self, model: Any) -> dict[Hashable, float]:
        return {d: float(self.measure(model, idx)) for d, idx in self.eval_indices.items()}

    def _block(self, rows: int) -> list[int]:
        return [i for batch in self.sampler.batches(rows) for i in batch]

    def order(self, epoch: int, global_batch: int) -> list[int]:
        """Record indices of block `epoch`: `every × grad_accum` global micro-batches drawn by domain weight."""
        rows = self.cfg.every * self.grad_accum * global_batch
        recorded = {entry["epoch"]: entry for entry in self.history}
        if epoch in recorded:
            self.sampler.load_state_dict(recorded[epoch]["state"])
            self._drawn_until = epoch
            return self._block(rows)
        if self._drawn_until != epoch - 1:  # resumed: bring the sampler to the end of the last recorded block
            last = epoch - 1 if epoch - 1 in recorded else None
            if last is None:
                raise UserError(f"{self.path} has no record of block {epoch - 1}; the run folder does not belong to "
                                f"this run: start it again with --overwrite")
            self.sampler.load_state_dict(recorded[last]["state"])
            self._block(rows)
        entry: dict[str, Any] = {"epoch": epoch}
        if epoch > 0:
            if self._teacher_loss is None:
                self._teacher_loss = self._losses(self.teacher)
            student_loss = self._losses(self.student())
            self.sampler.update(student_loss, self._teacher_loss)
            entry["student_ppl"] = {str(d): math.exp(v) for d, v in student_loss.items()}
            entry["teacher_ppl"] = {str(d): math.exp(v) for d, v in self._teacher_loss.items()}
        names, weights = self.sampler.domain_names, self.sampler.weights
        entry["weights"] = {str(d): float(w) for d, w in zip(names, weights, strict=True)}
        entry["state"] = self.sampler.state_dict()
        self.history.append(entry)
        atomic_write_json(self.path, self.history)
        self._drawn_until = epoch
        return self._block(rows)
