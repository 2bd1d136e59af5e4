"""Checkpoints: written whole or not at all, the last K kept, found again on `--resume`.

Layout: `<run>/checkpoints/step-00000042/` holding `student.safetensors`, `optimizer.pt`, `scheduler.pt`,
`objectives.pt`, the state of callbacks that keep one (`monitor.json`, the teacher-hacking monitor), `rng-rank<r>.pt`
(one per process) and `state.json` (step, data position, world size).
A checkpoint is assembled in `.step-00000042.tmp/` and renamed when complete, so a run killed at any
moment leaves either the previous checkpoints or the new one, never a half one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".step-{step:08d}.tmp"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and
             (p / "state.json").is_file()]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_partial(root: Path) -> None:
    """Delete leftovers of a checkpoint write that was interrupted."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_state(path: Path, state: dict[str, Any]) -> None:
    with open(path / "state.json", "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


GRAD_SCALER_FILE = "grad_scaler.pt"  # fp16 runs only


def save_checkpoint(root: Path, step: int, *, accelerator: Any, student: Any, optimizer: Any, scheduler: Any,
                    objectives: list[Any], callbacks: list[Any], seed: int, grad_accum: int, keep_last: int,
                    grad_scaler: Any = None) -> None:
    """Write the checkpoint of optimizer step `step` (every process takes part; the main one writes the
    shared files): assembled in a temporary folder, then renamed, then the oldest beyond `keep_last` pruned."""
    from torch import nn

    acc = accelerator
    is_main = acc.is_main_process
    tmp = tmp_dir(root, step)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_torch(rng_state(), tmp / f"rng-rank{acc.process_index}.pt")
    state_dict = acc.get_state_dict(student)
    if is_main:
        from safetensors.torch import save_file

        from potstill.io import atomic_write_json
        from potstill.students.save import safetensors_state

        save_file(safetensors_state(state_dict), str(tmp / "student.safetensors"))
        save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        if grad_scaler is not None:  # fp16: the loss scale and its growth tracker
            save_torch(grad_scaler.state_dict(), tmp / GRAD_SCALER_FILE)
        save_torch({o.name: o.fn.state_dict() for o in objectives if isinstance(o.fn, nn.Module)},
                   tmp / "objectives.pt")
        for callback in callbacks:
            if callback.state_file is not None:
                atomic_write_json(tmp / callback.state_file, callback.state_dict())
        write_state(tmp, {"step": step, "micro_batches": step * grad_accum, "world_size": acc.num_processes,
                          "seed": seed})
    acc.wait_for_everyone()
    if is_main:
        final = step_dir(root, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(root, keep_last)
    acc.wait_for_everyone()


def load_checkpoint(path: Path, *, accelerator: Any, student: Any, optimizer: Any, scheduler: Any,
                    objectives: list[Any], callbacks: list[Any], grad_scaler: Any = None) -> int:
    """Restore a checkpoint written by `save_checkpoint` into the run's parts; returns its step."""
    from safetensors.torch import load_file
    from torch import nn

    from potstill.errors import UserError

    acc = accelerator
    state = read_state(path)
    if state["world_size"] != acc.num_processes:
        raise UserError(f"{path}: written by {state['world_size']} process(es), resumed with "
                        f"{acc.num_processes}; resume with the same number of processes")
    acc.unwrap_model(student).load_state_dict(load_file(str(path / "student.safetensors")))
    optimizer.load_state_dict(load_torch(path / "optimizer.pt"))
    scheduler.load_state_dict(load_torch(path / "scheduler.pt"))
    if grad_scaler is not None and (path / GRAD_SCALER_FILE).exists():
        grad_scaler.load_state_dict(load_torch(path / GRAD_SCALER_FILE))
    objective_states = load_torch(path / "objectives.pt")
    for o in objectives:
        if isinstance(o.fn, nn.Module) and o.name in objective_states:
            o.fn.load_state_dict(objective_states[o.name])
    for callback in callbacks:
        if callback.state_file is not None and (path / callback.state_file).exists():
            callback.load_state_dict(json.loads((path / callback.state_file).read_text()))
    set_rng_state(load_torch(path / f"rng-rank{acc.process_index}.pt"))
    return int(state["step"])
