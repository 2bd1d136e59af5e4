"""Model size and throughput.

Throughput on shared machines is noisy: compare two models with `compare_throughput`, which interleaves
their measurements, never with two separate `measure_throughput` calls taken minutes apart. Each batch is timed
on its own and the rate is taken from the median batch time, so a batch stalled by another process (common on a
loaded machine, and large against a tiny model's microseconds) does not drag the number down.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["compare_throughput", "count_parameters", "measure_throughput"]


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `model` (shared parameters counted once)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def _batch(pool: list, start: int, size: int) -> list:
    """`size` consecutive items of `pool` from `start`, wrapping round to the beginning."""
    n = len(pool)
    if start + size <= n:
        return pool[start : start + size]
    return [pool[(start + i) % n] for i in range(size)]


def measure_throughput(
    fn: Callable[[list], Any],
    items: list,
    *,
    batch_size: int = 32,
    warmup_batches: int = 1,
    min_seconds: float = 2.0,
    max_items: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Items per second of `fn` called on batches of `items`: batch size / the median time of one batch.

    Uses the first `max_items` items (all when None). After `warmup_batches` untimed batches, calls `fn`
    on consecutive batches (cycling through the items when needed) under `torch.inference_mode()` until
    at least `min_seconds` have passed and at least one full pass over the items is done. Each batch is
    timed alone by `clock` (waiting for CUDA work to finish when CUDA is in use).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
    pool = list(items if max_items is None else items[:max_items])
    if not pool:
        raise ValueError("measure_throughput needs at least one item")
    size = min(batch_size, len(pool))
    n = len(pool)

    with torch.inference_mode():
        pos = 0
        for _ in range(max(warmup_batches, 0)):
            fn(_batch(pool, pos, size))
            pos = (pos + size) % n

        sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        done = 0
        pos = 0
        durations: list[float] = []
        start = clock()
        while True:
            before = clock()
            fn(_batch(pool, pos, size))
            if sync is not None:
                sync()
            after = clock()
            durations.append(after - before)
            pos = (pos + size) % n
            done += size
            if done >= n and after - start >= min_seconds:
                break
    return size / max(statistics.median(durations), 1e-12)


def compare_throughput(
    fns: dict[str, Callable[[list], Any]],
    items: list,
    *,
    batch_size: int = 32,
    rounds: int = 3,
    min_seconds: float = 1.0,
) -> dict[str, float]:
    """Median items/s per name, measured interleaved (A B A B ...) for `rounds` rounds.

    Interleaving spreads machine noise (other jobs, thermal throttling) over every function alike, so
    the ratios between the results are meaningful even when the absolute numbers drift.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    results: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            rate = measure_throughput(fn, items, batch_size=batch_size, min_seconds=min_seconds)
            results[name].append(rate)
    return {name: float(statistics.median(vals)) for name, vals in results.items()}
