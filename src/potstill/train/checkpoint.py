"""Checkpoints: written whole or not at all, the last K kept, found again on `--resume`.

Layout: `<run>/checkpoints/step-00000042/` holding `student.safetensors`, `optimizer.pt`, `scheduler.pt`,
`objectives.pt`, the state of callbacks that keep one (`monitor.json`, the teacher-hacking monitor; a callback's
tensors, e.g. early stopping's `best_student.safetensors`, weight averaging's `weight_average.safetensors`),
`rng-rank<r>.pt`
(one per process) and `state.json` (step, data position, world size). A sharded run (FSDP2,
`potstill.train.fsdp`) has `sharded/` instead of `student.safetensors` and `optimizer.pt`: the student and optimizer
state as a `torch.distributed.checkpoint` folder, one file per process plus `.metadata`.
A checkpoint is assembled in `.step-00000042.tmp/`, every file fsynced with the umask's mode, and renamed
when complete, so a run killed at any moment leaves either the previous checkpoints or the new one, never a
half one.

Resuming reads a checkpoint whole into memory (`read_checkpoint`) before anything is restored. One that cannot
be read or does not fit the run (a file missing, truncated or unparsable: a disk that filled, a copy cut short)
raises `DamagedCheckpoint`, so the loop can fall back to the previous one (`potstill.train.distiller`).
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

from potstill.train.fsdp import SHARDED_DIR, load_sharded, save_sharded

STEP_DIR = re.compile(r"^step-(\d{8})$")


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong with it."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".step-{step:08d}.tmp"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders (renamed into place whole, so complete unless damaged later), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
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


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint `step-N` to `damaged-step-N` (kept for inspection, out of the rotation)."""
    target = path.with_name(f"damaged-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"damaged-{path.name}-{n}")
    os.replace(path, target)
    return target


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
                    grad_scaler: Any = None, sharded: bool = False) -> None:
    """Write the checkpoint of optimizer step `step` (every process takes part; the main one writes the
    shared files): assembled in a temporary folder, then renamed, then the oldest beyond `keep_last` pruned.
    `sharded`: the student and optimizer are FSDP2-sharded; every process writes its shard into `sharded/`."""
    from torch import nn

    acc = accelerator
    is_main = acc.is_main_process
    tmp = tmp_dir(root, step)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_torch(rng_state(), tmp / f"rng-rank{acc.process_index}.pt")
    if sharded:
        save_sharded(tmp / SHARDED_DIR, student, optimizer)
    state_dict = None if sharded else acc.get_state_dict(student)
    if is_main:
        from safetensors.torch import save_file

        from potstill.io import atomic_write_json, safetensors_state

        if state_dict is not None:
            save_file(safetensors_state(state_dict), str(tmp / "student.safetensors"))  # fsynced by settle_tree
            save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        if grad_scaler is not None:  # fp16: the loss scale and its growth tracker
            save_torch(grad_scaler.state_dict(), tmp / GRAD_SCALER_FILE)
        save_torch({o.name: o.fn.state_dict() for o in objectives if isinstance(o.fn, nn.Module)},
                   tmp / "objectives.pt")
        for callback in callbacks:
            if callback.state_file is not None:
                atomic_write_json(tmp / callback.state_file, callback.state_dict())
            tensors = callback.tensors() if callback.tensors_file is not None else None
            if tensors is not None:  # e.g. early stopping's best weights
                save_file(safetensors_state(tensors), str(tmp / callback.tensors_file))
        write_state(tmp, {"step": step, "micro_batches": step * grad_accum, "world_size": acc.num_processes,
                          "seed": seed, "sharded": sharded})
    acc.wait_for_everyone()
    if is_main:
        from potstill.io import fsync_dir, settle_tree

        settle_tree(tmp)
        final = step_dir(root, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        prune(root, keep_last)
    acc.wait_for_everyone()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _read(path: Path, name: str, loader: Any) -> Any:
    try:
        return loader(path / name)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{name} is missing") from None
    except Exception as err:  # truncated or garbled: each reader fails in its own way
        raise DamagedCheckpoint(f"{name} is unreadable ({_short(err)})") from None


def _sharded_folder(path: Path) -> Path:
    folder = path / SHARDED_DIR
    if not (folder / ".metadata").is_file():
        raise DamagedCheckpoint(f"{SHARDED_DIR}/.metadata is missing")
    return folder


def read_checkpoint(path: Path, *, process_index: int, callbacks: list[Any], sharded: bool = False) -> dict[str, Any]:
    """Every file of checkpoint `path` this process restores, read into memory: {"state", "student",
    "optimizer", "scheduler", "grad_scaler" (or None), "objectives", "callbacks" {state_file: dict}, "callback_tensors"
    {tensors_file: tensors}, "rng"}. `sharded`: the student and optimizer stay on disk ("student" and
    "optimizer" are None, "sharded" is their folder), as torch.distributed.checkpoint loads them in place.
    Raises `DamagedCheckpoint` naming the first file that is missing or unreadable."""
    from safetensors.torch import load_file

    state = _read(path, "state.json", lambda p: json.loads(p.read_text()))
    if not (isinstance(state, dict) and all(isinstance(state.get(k), int) for k in ("step", "world_size"))):
        raise DamagedCheckpoint("state.json lacks its integer step / world_size")
    has_scaler = (path / GRAD_SCALER_FILE).exists()
    return {
        "state": state,
        "sharded": _sharded_folder(path) if sharded else None,
        "student": None if sharded else _read(path, "student.safetensors", lambda p: load_file(str(p))),
        "optimizer": None if sharded else _read(path, "optimizer.pt", load_torch),
        "scheduler": _read(path, "scheduler.pt", load_torch),
        "grad_scaler": _read(path, GRAD_SCALER_FILE, load_torch) if has_scaler else None,
        "objectives": _read(path, "objectives.pt", load_torch),
        "callbacks": {c.state_file: _read(path, c.state_file, lambda p: json.loads(p.read_text()))
                      for c in callbacks if c.state_file is not None and (path / c.state_file).exists()},
        "callback_tensors": {name: _read(path, name, lambda p: load_file(str(p)))
                             for c in callbacks if (name := c.tensors_file) is not None and (path / name).exists()},
        "rng": _read(path, f"rng-rank{process_index}.pt", load_torch),
    }


def load_checkpoint(path: Path, *, accelerator: Any, student: Any, optimizer: Any, scheduler: Any,
                    objectives: list[Any], callbacks: list[Any], grad_scaler: Any = None,
                    data: dict[str, Any] | None = None, sharded: bool = False) -> int:
    """Restore a checkpoint written by `save_checkpoint` into the run's parts; returns its step. `data` is
    `read_checkpoint`'s result when already read. Raises `DamagedCheckpoint` when a file is damaged or does
    not fit the run's parts, a `UserError` when the checkpoint was written by another number of processes or
    with the other sharding (`sharded`: this run's student and optimizer are FSDP2-sharded)."""
    from torch import nn

    from potstill.errors import UserError

    acc = accelerator
    if data is None:
        try:
            state = read_state(path)
        except (OSError, ValueError):
            state = {}  # read_checkpoint names what is wrong with it
        if isinstance(state, dict) and bool(state.get("sharded", False)) != sharded:
            raise UserError(f"{path}: written by a {'sharded' if state.get('sharded') else 'not sharded'} run "
                            f"(trainer.distributed), resumed {'sharded' if sharded else 'not sharded'}; resume "
                            f"with the same trainer.distributed and accelerate config")
        data = read_checkpoint(path, process_index=acc.process_index, callbacks=callbacks, sharded=sharded)
    state = data["state"]
    if state["world_size"] != acc.num_processes:
        raise UserError(f"{path}: written by {state['world_size']} process(es), resumed with "
                        f"{acc.num_processes}; resume with the same number of processes")
    restores: list[tuple[str, Any]] = [
        (SHARDED_DIR, lambda: load_sharded(data["sharded"], student, optimizer))] if sharded else [
        ("student.safetensors", lambda: acc.unwrap_model(student).load_state_dict(data["student"])),
        ("optimizer.pt", lambda: optimizer.load_state_dict(data["optimizer"]))]
    restores.append(("scheduler.pt", lambda: scheduler.load_state_dict(data["scheduler"])))
    if grad_scaler is not None and data["grad_scaler"] is not None:
        restores.append((GRAD_SCALER_FILE, lambda: grad_scaler.load_state_dict(data["grad_scaler"])))
    for o in objectives:
        if isinstance(o.fn, nn.Module) and o.name in data["objectives"]:
            restores.append(("objectives.pt", lambda o=o: o.fn.load_state_dict(data["objectives"][o.name])))
    for callback in callbacks:
        if callback.state_file in data["callbacks"]:
            restores.append((callback.state_file,
                             lambda c=callback: c.load_state_dict(data["callbacks"][c.state_file])))
        if callback.tensors_file in data["callback_tensors"]:
            restores.append((callback.tensors_file,
                             lambda c=callback: c.load_tensors(data["callback_tensors"][c.tensors_file])))
    restores.append((f"rng-rank{acc.process_index}.pt", lambda: set_rng_state(data["rng"])))
    for name, restore in restores:
        try:
            restore()
        except Exception as err:  # wrong keys, shapes or structure
            raise DamagedCheckpoint(f"{name} does not fit this run ({_short(err)})") from None
    return int(state["step"])


def all_agree(accelerator: Any, ok: bool) -> bool:
    """Whether `ok` holds on every process (one process's damaged rng file fails them all)."""
    if accelerator.num_processes == 1:
        return ok
    failed = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return float(accelerator.reduce(failed, reduction="sum").item()) == 0.0


def resume_newest(root: Path, *, accelerator: Any, say: Any, **parts: Any) -> int | None:
    """Restore the newest checkpoint under `root` that reads and fits (`parts`: `load_checkpoint`'s student,
    optimizer, scheduler, objectives, callbacks, grad_scaler); returns its step, None when `root` holds none.

    A damaged one is passed over for the one before it; once one restores, each damaged one is renamed
    `damaged-step-N` (kept for a look, out of the rotation) and reported in one line through `say` (main
    process). When none restores: one `UserError` listing them; nothing is moved, and `--overwrite` (not
    `--resume`) starts the run over."""
    from potstill.errors import UserError

    acc, damaged = accelerator, list[tuple[Path, str]]()  # (folder, what is wrong)
    found = list_checkpoints(root)
    for _, path in reversed(found):
        reason = None
        try:
            step = load_checkpoint(path, accelerator=acc, **parts)
        except DamagedCheckpoint as err:
            reason = str(err)
        if all_agree(acc, reason is None):
            if acc.is_main_process:
                for bad, why in damaged:
                    say(f"checkpoint {bad} is damaged: {why}; set aside as {set_aside(bad).name}, falling back "
                        f"to {path.name}")
            acc.wait_for_everyone()
            return step
        damaged.append((path, reason or "damaged on another process"))
    if not found:
        return None
    raise UserError(f"--resume: no usable checkpoint in {root}: " + "; ".join(f"{p.name}: {r}" for p, r in damaged)
                    + ". Pass --overwrite instead of --resume to start the run over")
