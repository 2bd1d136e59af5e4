"""`potstill cache` in one process or several (`accelerate launch ... -m potstill cache recipe.yaml`).

Several processes form a process group through Accelerate, as a training run does; each rank runs the teacher on
every N-th batch of the training sequences and writes its own part of the cache, which the main process joins
(`potstill.teachers.capture`, `potstill.teachers.cache_merge`). With `trainer.distributed: fsdp` (or an Accelerate
FSDP config) the teacher is sharded with FSDP2 first (`potstill.train.fsdp`); the cache's facts, the teacher's
weights fingerprint among them, are taken before, from the whole weights.

One process holds `.<cache>.lock` beside the cache while it writes, so a second `potstill cache` to the same
folder is refused, and first removes the temp folders a killed earlier attempt left there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from potstill.errors import UserError
from potstill.io import sweep_temp
from potstill.lockfile import hold


def capture_cache(recipe: Any, target: Path, *, k: int, temperature: float, batch_size: int, overwrite: bool,
                  on_batch: Callable[[int, int], Any] | None = None) -> dict[str, Any]:
    """Set up the causal_lm `recipe`'s task and write its teacher's top-k cache to `target`; returns the manifest
    (with "seconds"). `on_batch` reports progress on the main process."""
    from potstill.tasks import build_task
    from potstill.teachers.capture import capture_teacher_topk, expected_cache_meta

    task: Any = build_task(recipe, run_dir=recipe.run_dir)  # a causal_lm task (setup takes capture=)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        with hold(target.with_name(f".{target.name}.lock"), what=f"cache {target}"):
            sweep_temp(target.parent, depth=0, of=target.name)  # what a killed `potstill cache` to this target left
            task.setup(capture=True)
            return capture_teacher_topk(task, target, k=k, temperature=temperature, batch_size=batch_size,
                                        overwrite=overwrite, on_batch=on_batch)
    from potstill.train.fsdp import fsdp_settings, shard_model
    from potstill.train.precision import new_accelerator

    acc = new_accelerator()
    task.device = acc.device
    task.setup(capture=True, is_main=acc.is_main_process, barrier=acc.wait_for_everyone)
    if task.teacher is None:  # the cache is the teacher's: causal_lm setup(capture=True) refuses a recipe without
        raise UserError("potstill cache: the recipe has no teacher model (teacher.path or teacher.factory)")
    meta = expected_cache_meta(task)
    settings = fsdp_settings(recipe.trainer.distributed, acc.num_processes)
    if settings is not None:
        shard_model(task.teacher, settings)
    else:
        task.teacher.to(acc.device)
    return capture_teacher_topk(task, target, k=k, temperature=temperature, batch_size=batch_size,
                                overwrite=overwrite, on_batch=on_batch if acc.is_main_process else None,
                                rank=acc.process_index, world_size=acc.num_processes,
                                barrier=acc.wait_for_everyone, meta=meta, same_forwards=settings is not None)
