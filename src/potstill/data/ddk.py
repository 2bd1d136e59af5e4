"""DDK: domain-weighted sampling toward the domains where the student lags the teacher most.

Liu, Zhang, Guo, et al. (2024), "DDK: Distilling Domain Knowledge for Efficient Large Language Models",
NeurIPS 2024 (arXiv 2407.16154). Formulas confirmed against the paper's text (§3.2–3.3, Alg. 1, §4.1, §4.3):

- Per domain i, ℓ_S[i] and ℓ_T[i] are the student's and the teacher's perplexities, exp(mean CE), on a small
  validation set of that domain (the paper: 500 samples per domain).
- Domain discrepancy factor (Eq. 1): r[i] = exp(ℓ_S[i]/ℓ_T[i]) / Σ_j exp(ℓ_S[j]/ℓ_T[j]).
- Factor smooth updating (Eq. 2), every K steps: ψ_{t+1}[i] = r_t[i] · exp(ℓ_S[i]/ℓ_T[i]) with the
  perplexities measured at the start of the interval, and r_{t+1}[i] = α · ψ_{t+1}[i] / Σ_j ψ_{t+1}[j] + (1 − α)/N.
  Every domain keeps at least (1 − α)/N. Paper defaults: α = 0.5, K = 1,000 steps (ablated 50–2,000),
  distillation loss CE + γ·KL(p_T^T ‖ p_S^T) with γ = 0.2, T = 1.
- Sampling: each domain's data is drawn with probability r; a domain whose data is exhausted starts over
  ("the process continues cyclically once a domain data has been exhausted").

Chosen here: the sampler starts uniform (Alg. 1 instead starts from Eq. 1 on the initial perplexities;
`initialize()` does that); `update()` takes mean per-token cross-entropies by default and exponentiates them
(pass `loss_kind="perplexity"` to hand perplexities in); each slot of a batch draws its domain from r
independently, then takes that domain's next record from a per-domain permutation, reshuffled once used up.

Randomness: batch b is drawn from a stream fixed by (seed, b) and domain d's c-th permutation from
(seed, d, c), so the whole state is the weights, the batch counter and each domain's (cycle, position):
`state_dict()` / `load_state_dict()` carry it, and a resumed sampler yields exactly the next batches an
uninterrupted one would have.

In the training loop (`data.domains`), `DomainBlocks` is the loop's block hook: training is cut into blocks of
`every` optimizer steps (K); `order(block)` gives the records of a block's global micro-batches, drawn by domain
weight, and `on_block_end(step)`, called by the loop after every K-th optimizer step, measures the student's
(and once, the frozen teacher's) mean cross-entropy on the first `eval_records` held-out records of each
domain and applies Eq. 2 for the next block. `trainer.epochs` still counts passes over the training records:
DDK changes which records a block draws, not how many steps the run has. `<run>/domain_weights.json` keeps,
per block, the weights, the measured perplexities and the sampler's state before the block was drawn; a resumed
run replays a recorded block from that state instead of measuring again, so it visits exactly the batches of
the uninterrupted run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from potstill.errors import UserError, int_at_least
from potstill.io import atomic_write_json

#: The paper's smoothing coefficient α.
DEFAULT_SMOOTHING = 0.5
#: The paper's distillation interval K (steps between weight updates), for callers that schedule `update`.
DEFAULT_INTERVAL = 1000
LOSS_KINDS = ("cross_entropy", "perplexity")
#: The run folder's record of every block's weights, perplexities and sampler state.
HISTORY_FILE = "domain_weights.json"
_STATE_FORMAT = 1
# Stream tags keep the per-batch and per-permutation random streams apart.
_BATCH_STREAM, _PERM_STREAM = 31, 32


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max()
    return z - math.log(float(np.exp(z).sum()))


def discrepancy_factor(ratios: Sequence[float] | np.ndarray) -> np.ndarray:
    """DDK's Eq. 1: softmax of the per-domain ratios ℓ_S/ℓ_T (perplexity of the student over the teacher's)."""
    r = np.asarray(ratios, dtype=np.float64)
    return np.exp(_log_softmax(r))


def smoothed_update(previous: Sequence[float] | np.ndarray, ratios: Sequence[float] | np.ndarray,
                    smoothing: float = DEFAULT_SMOOTHING) -> np.ndarray:
    """DDK's Eq. 2: α · normalise(r_prev ⊙ exp(ratios)) + (1 − α)/N, computed in log space."""
    prev = np.asarray(previous, dtype=np.float64)
    r = np.asarray(ratios, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_psi = np.log(prev) + r
    return smoothing * np.exp(_log_softmax(log_psi)) + (1.0 - smoothing) / prev.size


class DomainWeightedSampler:
    """Batches of record indices whose domains follow DDK's weights.

    `domains[i]` is record i's domain (any hashable: a name or an id); domains are kept in order of first
    appearance (`domain_names`). `batch_size` records per batch; `smoothing` α in [0, 1] (default 0.5, the
    paper's; α = 1 removes the uniform floor, α = 0 keeps the weights uniform). `loss_kind`: what
    `update()` receives, "cross_entropy" (mean per-token CE in nats, default) or "perplexity".

    Typical loop: every K steps evaluate student and teacher on each domain's validation set and call
    `update(student_loss, teacher_loss)`; draw training batches with `batches(n)` or `next_batch()`.
    """

    def __init__(self, domains: Sequence[Hashable], *, batch_size: int, smoothing: float = DEFAULT_SMOOTHING,
                 seed: int = 0, loss_kind: str = "cross_entropy") -> None:
        if isinstance(domains, (str, bytes)) or not isinstance(domains, Sequence) or len(domains) == 0:
            raise UserError("domains must be a non-empty sequence with one domain label per record")
        int_at_least("batch_size", batch_size, 1)
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing <= 1:
            raise UserError(f"smoothing (DDK's α) must be a number in [0, 1], got {smoothing!r}")
        int_at_least("seed", seed, 0)
        if loss_kind not in LOSS_KINDS:
            raise UserError(f"loss_kind must be one of {LOSS_KINDS}, got {loss_kind!r}")
        ids: dict[Hashable, int] = {}
        try:
            labels = np.array([ids.setdefault(d, len(ids)) for d in domains], dtype=np.int64)
        except TypeError:
            raise UserError("domains must hold hashable labels (strings or ints)") from None
        self.domain_names: list[Hashable] = list(ids)
        self.members: list[np.ndarray] = [np.flatnonzero(labels == d) for d in range(len(ids))]
        self.batch_size, self.smoothing, self.seed = int(batch_size), float(smoothing), int(seed)
        self.loss_kind = loss_kind
        self._weights = np.full(len(ids), 1.0 / len(ids))
        self._updates = 0
        self._batches = 0
        self._cycle = [0] * len(ids)
        self._position = [0] * len(ids)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}
        self.last_ratios: np.ndarray | None = None

    # ------------------------------------------------------------------ weights
    @property
    def n_domains(self) -> int:
        return len(self.domain_names)

    @property
    def weights(self) -> np.ndarray:
        """Current sampling probability of each domain, in `domain_names` order (sums to 1)."""
        return self._weights.copy()

    @property
    def floor(self) -> float:
        """(1 − α)/N: no domain's weight falls below this after an update."""
        return (1.0 - self.smoothing) / self.n_domains

    def ratios(self, student_loss: Mapping[Hashable, float], teacher_loss: Mapping[Hashable, float]) -> np.ndarray:
        """ℓ_S/ℓ_T per domain (perplexity ratio), in `domain_names` order, from the per-domain losses."""
        s = self._per_domain(student_loss, "student_loss")
        t = self._per_domain(teacher_loss, "teacher_loss")
        if self.loss_kind == "cross_entropy":
            return np.exp(s - t)  # exp(CE_S) / exp(CE_T)
        if (s <= 0).any() or (t <= 0).any():
            raise UserError("perplexities must be > 0 (loss_kind='perplexity')")
        return s / t

    def _per_domain(self, losses: Mapping[Hashable, float], name: str) -> np.ndarray:
        if not isinstance(losses, Mapping):
            raise UserError(f"{name} must map each domain to its validation loss, got {type(losses).__name__}")
        missing = [d for d in self.domain_names if d not in losses]
        extra = [d for d in losses if d not in set(self.domain_names)]
        if missing or extra:
            raise UserError(f"{name} must give one loss per domain {self.domain_names}; missing {missing}, "
                            f"unknown {extra}")
        values = np.array([float(losses[d]) for d in self.domain_names], dtype=np.float64)
        if not np.isfinite(values).all():
            shown = dict(zip(self.domain_names, values.tolist(), strict=True))
            raise UserError(f"{name} holds NaN or infinite losses: {shown}")
        return values

    def initialize(self, student_loss: Mapping[Hashable, float], teacher_loss: Mapping[Hashable, float]
                   ) -> np.ndarray:
        """Set the weights to DDK's Eq. 1 (Alg. 1, line 1: no smoothing, no floor); returns them."""
        self.last_ratios = self.ratios(student_loss, teacher_loss)
        self._weights = discrepancy_factor(self.last_ratios)
        return self.weights

    def update(self, student_loss: Mapping[Hashable, float], teacher_loss: Mapping[Hashable, float]) -> np.ndarray:
        """One factor-smooth update (Eq. 2) from per-domain validation losses; returns the new weights.

        Domains whose student/teacher ratio is larger gain weight; equal ratios leave the weights' shape and
        pull them toward uniform (uniform stays uniform).
        """
        self.last_ratios = self.ratios(student_loss, teacher_loss)
        self._weights = smoothed_update(self._weights, self.last_ratios, self.smoothing)
        self._updates += 1
        return self.weights

    @property
    def updates(self) -> int:
        return self._updates

    # ------------------------------------------------------------------ batches
    def _permutation(self, domain: int, cycle: int) -> np.ndarray:
        cached = self._perm_cache.get(domain)
        if cached is not None and cached[0] == cycle:
            return cached[1]
        rng = np.random.default_rng((_PERM_STREAM, self.seed, domain, cycle))
        perm = self.members[domain][rng.permutation(self.members[domain].size)]
        self._perm_cache[domain] = (cycle, perm)
        return perm

    def next_batch(self) -> list[int]:
        """The next batch: `batch_size` record indices (a record repeats only after its domain is used up)."""
        rng = np.random.default_rng((_BATCH_STREAM, self.seed, self._batches))
        slots = rng.choice(self.n_domains, size=self.batch_size, p=self._weights / self._weights.sum())
        out: list[int] = []
        for d in slots.tolist():
            perm = self._permutation(d, self._cycle[d])
            out.append(int(perm[self._position[d]]))
            self._position[d] += 1
            if self._position[d] >= perm.size:
                self._cycle[d] += 1
                self._position[d] = 0
        self._batches += 1
        return out

    def batches(self, num_batches: int) -> list[list[int]]:
        """The next `num_batches` batches."""
        return [self.next_batch() for _ in range(int_at_least("num_batches", num_batches, 0))]

    @property
    def batches_drawn(self) -> int:
        return self._batches

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: settings, weights, counters and each domain's (cycle, position)."""
        return {"format": _STATE_FORMAT, "seed": self.seed, "batch_size": self.batch_size,
                "smoothing": self.smoothing, "loss_kind": self.loss_kind,
                "domain_sizes": [int(m.size) for m in self.members], "weights": self._weights.tolist(),
                "updates": self._updates, "batches": self._batches, "cycle": list(self._cycle),
                "position": list(self._position),
                "last_ratios": None if self.last_ratios is None else self.last_ratios.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; refused when written for other domains or settings."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise UserError("domain sampler state must be the dict from DomainWeightedSampler.state_dict() "
                            f"(format {_STATE_FORMAT})")
        mine = {"seed": self.seed, "batch_size": self.batch_size, "smoothing": self.smoothing,
                "loss_kind": self.loss_kind, "domain_sizes": [int(m.size) for m in self.members]}
        for key, value in mine.items():
            if state.get(key) != value:
                raise UserError(f"domain sampler state has {key}={state.get(key)!r}, this sampler has {value!r}; "
                                "build it from the same records and settings")
        weights = np.asarray(state["weights"], dtype=np.float64)
        if weights.shape != (self.n_domains,) or (weights < 0).any() or not np.isclose(weights.sum(), 1.0):
            raise UserError(f"domain sampler state has invalid weights {state['weights']!r}")
        cycle, position = list(map(int, state["cycle"])), list(map(int, state["position"]))
        if len(cycle) != self.n_domains or len(position) != self.n_domains or any(
                not 0 <= p < m.size for p, m in zip(position, self.members, strict=True)):
            raise UserError("domain sampler state has a cycle/position list that does not fit these domains")
        self._weights = weights
        self._updates, self._batches = int(state["updates"]), int(state["batches"])
        self._cycle, self._position = cycle, position
        ratios = state.get("last_ratios")
        self.last_ratios = None if ratios is None else np.asarray(ratios, dtype=np.float64)


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


class DomainBlocks:
    """DDK's block hook for the training loop (see the module docstring).

    `measure(model, eval_indices) -> mean cross-entropy` scores a model on held-out records (the task's
    `eval_loss`); `student()` gives the current student. `global_batch` records per global micro-batch,
    `grad_accum` micro-batches per optimizer step, `every` optimizer steps per block. `fresh`: a new run, whose
    earlier `domain_weights.json` (if any) is discarded instead of replayed.
    """

    def __init__(self, *, train_domains: list[Hashable], eval_domains: list[Hashable],
                 measure: Callable[[Any, list[int]], float], student: Callable[[], Any], teacher: Any,
                 run_dir: Path, seed: int, every: int, smoothing: float, eval_records: int, global_batch: int,
                 grad_accum: int, fresh: bool) -> None:
        known = list(dict.fromkeys(train_domains))  # first appearance, the sampler's order
        missing = [d for d in known if d not in set(eval_domains)]
        if missing:
            raise UserError(f"data.eval has no records of domain(s) {', '.join(map(str, missing[:5]))}: DDK measures "
                            f"every training domain on held-out records of it")
        self.measure, self.student, self.teacher, self.every = measure, student, teacher, every
        self.eval_indices = {d: [i for i, x in enumerate(eval_domains) if x == d][:eval_records] for d in known}
        self.sampler = DomainWeightedSampler(train_domains, batch_size=1, smoothing=smoothing, seed=seed)
        self.block_rows = every * grad_accum * global_batch
        self.path = Path(run_dir) / HISTORY_FILE
        self.history: list[dict] = json.loads(self.path.read_text()) if self.path.exists() and not fresh else []
        self._teacher_loss: dict | None = None
        self._drawn = -1  # the block whose records the in-memory sampler has just drawn

    def _losses(self, model: Any) -> dict[Hashable, float]:
        return {d: float(self.measure(model, idx)) for d, idx in self.eval_indices.items()}

    def _entry(self, block: int) -> dict[str, Any] | None:
        return next((entry for entry in self.history if entry["epoch"] == block), None)

    def _record(self, entry: dict[str, Any]) -> None:
        names, weights = self.sampler.domain_names, self.sampler.weights
        entry["weights"] = {str(d): float(w) for d, w in zip(names, weights, strict=True)}
        entry["state"] = self.sampler.state_dict()
        self.history.append(entry)
        atomic_write_json(self.path, self.history)

    def _draw(self, block: int, entry: dict[str, Any]) -> list[int]:
        self.sampler.load_state_dict(entry["state"])
        self._drawn = block
        return [i for batch in self.sampler.batches(self.block_rows) for i in batch]

    def order(self, block: int) -> list[int]:
        """Record indices of block `block` (`every × grad_accum` global micro-batches), drawn by domain weight."""
        entry = self._entry(block)
        if entry is None:
            if block > 0:
                raise UserError(f"{self.path} has no record of block {block}; the run folder does not belong to "
                                f"this run: start it again with --overwrite")
            entry = {"epoch": 0}
            self._record(entry)  # the uniform start
        return self._draw(block, entry)

    def on_block_end(self, step: int) -> None:
        """After optimizer step `step` (a multiple of `every`): DDK's Eq. 2 on the perplexities measured now,
        for block `step // every`. A block already recorded (a resumed run) is replayed, not measured again."""
        block = step // self.every
        if self._entry(block) is not None:
            return
        if self._drawn != block - 1:  # bring the sampler to the end of the previous block
            previous = self._entry(block - 1)
            if previous is None:
                raise UserError(f"{self.path} has no record of block {block - 1}; the run folder does not belong "
                                f"to this run: start it again with --overwrite")
            self._draw(block - 1, previous)
        if self._teacher_loss is None:
            self._teacher_loss = self._losses(self.teacher)
        student_loss = self._losses(self.student())
        self.sampler.update(student_loss, self._teacher_loss)
        self._record({"epoch": block, "student_ppl": {str(d): math.exp(v) for d, v in student_loss.items()},
                      "teacher_ppl": {str(d): math.exp(v) for d, v in self._teacher_loss.items()}})
        self._drawn = -1
