"""Model size and throughput, measured so that a tiny model's number means something on a shared machine.

A tiny model runs one batch in well under a millisecond, so its number is easily noise: another process takes the
CPU for a while, a thread of torch's pool waits for a core, load comes and goes between two measurements. So:

- warm-up first: untimed batches (`warmup_batches`, and at least `warmup_seconds` of them) so that caches, thread
  pools and lazy initialisation are done before the clock starts;
- blocks: a block runs consecutive batches until it has lasted `block_seconds`, each batch timed on its own; the
  block's rate is batch size / its median batch time, so batches stalled by another process (a minority while
  the machine is not saturated) do not move it;
- repeats, interleaved: `repeats` blocks per function, and for `compare_throughput` the blocks of the functions
  alternate (A B B A A B ...: the order flips every round), so load that comes and goes hits every function alike
  and the ratio between them holds even when the absolute numbers drift;
- the result: the median block rate, and the spread, the relative interquartile range of the block rates,
  (q3 - q1) / median, so that a reader sees how far to trust the number.

Compare two models only with `compare_throughput`, never with two `measure_throughput` calls taken apart.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Throughput", "compare_throughput", "compare_throughput_stats", "count_parameters",
           "measure_throughput", "measure_throughput_stats"]

Clock = Callable[[], float]


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `model` (shared parameters counted once)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


@dataclass(frozen=True)
class Throughput:
    """Items per second of one function: one rate per timed block (batch size / the block's median batch time), and
    the seconds and items timed in all."""

    rates: tuple[float, ...]
    seconds: float
    items: int

    @property
    def median(self) -> float:
        return float(statistics.median(self.rates))

    @property
    def spread(self) -> float:
        """Relative interquartile range of the block rates, (q3 - q1) / median; 0 with fewer than 2 blocks."""
        if len(self.rates) < 2 or self.median <= 0:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.rates, n=4, method="inclusive")
        return float((q3 - q1) / self.median)


class _Batches:
    """Consecutive batches of `size` items of `pool`, wrapping round to the beginning."""

    def __init__(self, pool: list, size: int) -> None:
        self.pool, self.size, self.pos = pool, size, 0

    def next(self) -> list:
        n, start = len(self.pool), self.pos
        self.pos = (start + self.size) % n
        if start + self.size <= n:
            return self.pool[start : start + self.size]
        return [self.pool[(start + i) % n] for i in range(self.size)]


def _sync() -> Callable[[], None] | None:
    return torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _warm_up(fn: Callable[[list], Any], batches: _Batches, *, count: int, seconds: float, clock: Clock) -> None:
    start, done = clock(), 0
    while done < count or (seconds > 0 and clock() - start < seconds):
        fn(batches.next())
        done += 1
    batches.pos = 0


def _block(fn: Callable[[list], Any], batches: _Batches, *, seconds: float, clock: Clock) -> tuple[float, int, float]:
    """Run batches until `seconds` have passed (at least one); return (elapsed seconds, items, median batch time)."""
    sync = _sync()
    start = clock()
    durations: list[float] = []
    while True:
        before = clock()
        fn(batches.next())
        if sync is not None:
            sync()
        after = clock()
        durations.append(after - before)
        if after - start >= seconds:
            return after - start, len(durations) * batches.size, float(statistics.median(durations))


def _check(batch_size: int, items: list, max_items: int | None) -> list:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
    pool = list(items if max_items is None else items[:max_items])
    if not pool:
        raise ValueError("measuring throughput needs at least one item")
    return pool


def compare_throughput_stats(
    fns: dict[str, Callable[[list], Any]],
    items: list,
    *,
    batch_size: int = 32,
    repeats: int = 7,
    block_seconds: float = 0.25,
    warmup_batches: int = 2,
    warmup_seconds: float = 0.1,
    max_items: int | None = None,
    clock: Clock = time.perf_counter,
) -> dict[str, Throughput]:
    """The `Throughput` of each function on the same batches of `items`, measured in interleaved blocks.

    After every function's warm-up, runs `repeats` rounds; each round times one block (≥ `block_seconds`, at least
    one batch) of every function, in the order of `fns` in even rounds and reversed in odd ones. Rounds go on past
    `repeats` until every function has covered all the items at least once. Runs under `torch.inference_mode()`
    (waiting for CUDA work at the end of each batch when CUDA is in use).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    pool = _check(batch_size, items, max_items)
    size = min(batch_size, len(pool))
    names = list(fns)
    batches = {name: _Batches(pool, size) for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    done = dict.fromkeys(names, 0)
    with torch.inference_mode():
        for name in names:
            _warm_up(fns[name], batches[name], count=warmup_batches, seconds=warmup_seconds, clock=clock)
        rounds = 0
        while rounds < repeats or min(done.values()) < len(pool):
            for name in names if rounds % 2 == 0 else reversed(names):
                elapsed, count, batch_time = _block(fns[name], batches[name], seconds=block_seconds, clock=clock)
                rates[name].append(size / max(batch_time, 1e-12))
                seconds[name] += elapsed
                done[name] += count
            rounds += 1
    return {name: Throughput(tuple(rates[name]), seconds[name], done[name]) for name in names}


def compare_throughput(
    fns: dict[str, Callable[[list], Any]],
    items: list,
    *,
    batch_size: int = 32,
    rounds: int = 7,
    min_seconds: float = 0.25,
) -> dict[str, float]:
    """Median items/s per name: `compare_throughput_stats` with `rounds` interleaved blocks of ≥ `min_seconds`."""
    stats = compare_throughput_stats(fns, items, batch_size=batch_size, repeats=rounds, block_seconds=min_seconds)
    return {name: s.median for name, s in stats.items()}


def measure_throughput_stats(
    fn: Callable[[list], Any],
    items: list,
    *,
    batch_size: int = 32,
    warmup_batches: int = 1,
    min_seconds: float = 2.0,
    repeats: int = 5,
    max_items: int | None = None,
    clock: Clock = time.perf_counter,
) -> Throughput:
    """`Throughput` of one function on batches of the first `max_items` items: `repeats` blocks of at least
    `min_seconds / repeats` each (so ≥ `min_seconds` timed in all), more when needed to cover every item once;
    the timed batches start at item 0 and run on consecutively, cycling."""
    stats = compare_throughput_stats({"fn": fn}, items, batch_size=batch_size, repeats=repeats,
                                     block_seconds=min_seconds / repeats, warmup_batches=warmup_batches,
                                     warmup_seconds=0.0, max_items=max_items, clock=clock)
    return stats["fn"]


def measure_throughput(
    fn: Callable[[list], Any],
    items: list,
    *,
    batch_size: int = 32,
    warmup_batches: int = 1,
    min_seconds: float = 2.0,
    max_items: int | None = None,
    clock: Clock = time.perf_counter,
) -> float:
    """Median items/s of `fn` on batches of `items` (`measure_throughput_stats`)."""
    return measure_throughput_stats(fn, items, batch_size=batch_size, warmup_batches=warmup_batches,
                                    min_seconds=min_seconds, max_items=max_items, clock=clock).median
