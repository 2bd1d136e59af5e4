"""`trainer.mixed_precision` for one run, and the run's Accelerator.

Accelerate keeps one global state per process, whose mixed precision cannot change once set; a Python session
that runs several recipes with different precisions would need to reset that private state. The loop instead
gives Accelerate no precision ("no") and applies the recipe's itself with public torch APIs: `torch.autocast`
around the forwards (bf16 or fp16) and, for fp16, a `torch.amp.GradScaler` around backward and the optimizer
step, as Accelerate would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _multi_process_without_accelerator() -> bool:
    """Launched as several processes (torchrun / `accelerate launch --multi_gpu`) on a machine with no GPU:
    Accelerate then needs `cpu=True` to form a gloo process group instead of running N lone copies."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    has_accelerator = getattr(torch, "accelerator", None)
    return not (has_accelerator.is_available() if has_accelerator else torch.cuda.is_available())


def close_process_group() -> bool:
    """End a multi-process run's process group; True when there was one. A barrier, `destroy_process_group`, a
    garbage collection (the sharded modules' tensors and device meshes hold the group too) and a pause of 0.2 s
    that lets gloo's worker threads finish freeing the last collectives, which needs the GIL. A worker thread that
    frees one after Python has begun to finalize aborts the process ("terminate called without an active
    exception") although its work is done; `potstill.cli` therefore also skips finalization after this."""
    import gc
    import time

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    time.sleep(0.2)
    return True


def new_accelerator(report_to: Sequence[str] = (), run_dir: str | Path | None = None) -> Any:
    """An Accelerator for a run: the process group and device, and the experiment trackers of `report_to` writing
    under `<run_dir>/trackers` (`potstill.train.trackers`); precision is `Precision`'s."""
    from accelerate import Accelerator

    if not report_to:
        return Accelerator(mixed_precision="no", cpu=_multi_process_without_accelerator())
    from potstill.train.trackers import check_trackers, tracker_dir

    check_trackers(report_to)
    if run_dir is None:
        raise ValueError("new_accelerator: trackers need the run folder (run_dir)")
    return Accelerator(mixed_precision="no", cpu=_multi_process_without_accelerator(), log_with=list(report_to),
                       project_dir=str(tracker_dir(run_dir)))


class Precision:
    """Autocast and (fp16) loss scaling for `mode` ("no", "bf16" or "fp16") on `device`."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode, self.device_type = mode, torch.device(device).type
        self.dtype = _DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (scaled for fp16)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true scale (before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step (fp16: skipped when a gradient overflowed, and the scale adjusted)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
