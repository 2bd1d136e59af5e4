"""The run folder's policy: what a new run clears, what a resume must match, what each run keeps once.

`<run>/` holds `recipe.yaml`, `metrics.jsonl`, `eval_teacher.json` / `eval_before.json` (scores computed once
per run, kept across resumes), `checkpoints/`, `student/`, `summary.json`, `trackers/` (TensorBoard's files),
`adapter/` (a LoRA student's adapter), `wise_ft_init.safetensors` (the student's init, for
`trainer.wise_ft_alpha`) and the files of data strategies (DDK's `domain_weights.json`). A new
run refuses to overwrite an earlier one unless told to; a resumed run refuses a recipe that changed in a way
that would not reproduce the run (`potstill.config.recipe_changes`, which ignores `RESUMABLE_CHANGES`: name,
output_dir, eval and the trainer's logging/saving/thread/tracker fields).

One run at a time per folder: `run_lock` holds `<run>/.lock` (`potstill.lockfile`) from before the folder is
checked until the run has ended, however it ends; a second run into the folder is refused naming the holder's
PID. Holding it, a start sweeps the leftovers of writes a killed run left half done (`prepare_run_dir`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from potstill.config import AnyRecipe, recipe_changes
from potstill.data.ddk import HISTORY_FILE as DDK_HISTORY
from potstill.errors import UserError
from potstill.io import atomic_write_text, sweep_temp
from potstill.lockfile import hold
from potstill.train import checkpoint as ckpt
from potstill.train.wise_ft import INIT_FILE as WISE_FT_INIT

#: Files of an earlier run that a new (not resumed) run removes.
RUN_FILES = ("metrics.jsonl", "summary.json", "eval_before.json", "eval_teacher.json", DDK_HISTORY,
             WISE_FT_INIT)
LOCK_FILE = ".lock"
TRACKERS_DIR = "trackers"  # trainer.report_to's files (potstill.train.trackers)
ADAPTER_DIR = "adapter"  # student.lora's adapter (potstill.students.lora)


@contextlib.contextmanager
def run_lock(run_dir: Path, accelerator: Any) -> Iterator[None]:
    """Hold `<run>/.lock` for the `with` block: the main process takes it (re-entrant, so `run_recipe` and the
    Distiller can both ask), and every process learns whether it did, so all of them stop together when another
    run holds the folder (`UserError` naming its PID). A folder made only to hold the lock is removed again
    when nothing else was written to it, and so is a folder this run made when the run fails (an exception, not
    an interrupt) before its first checkpoint: a start that a model or the data refused leaves nothing behind."""
    run_dir = Path(run_dir)
    is_main, created = accelerator.is_main_process, not run_dir.exists()
    with contextlib.ExitStack() as stack:
        refused: UserError | None = None
        if is_main:
            try:
                stack.enter_context(hold(run_dir / LOCK_FILE, what=f"run folder {run_dir}"))
            except UserError as err:
                refused = err
        if not ckpt.all_agree(accelerator, refused is None) and refused is None:
            refused = UserError(f"run folder {run_dir} is in use by another potstill process")
        if refused is not None:
            raise refused
        try:
            yield
        except Exception:
            if is_main and created and not ckpt.list_checkpoints(run_dir / "checkpoints"):
                stack.close()  # a failed start (a model that does not fit, bad records) leaves no folder behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        finally:
            stack.close()
            if is_main and created:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()  # only when empty


def check_output_dir(recipe: AnyRecipe) -> None:
    """Refuse, before anything loads, an output_dir (or run folder) that is a file or cannot be written."""
    for folder in (Path(recipe.output_dir), recipe.run_dir):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"field output_dir: {folder} is a file; the run needs a folder there")
    existing = recipe.run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"field output_dir: {existing} is not writable (read-only or no permission); choose another "
                        f"output_dir")


def check_run_dir(run_dir: Path, recipe_text: str | None, *, resume: bool, overwrite: bool,
                  unit: str = "step") -> None:
    """Refuse to wipe an earlier run by accident, and to resume a run whose recipe has changed. `unit`: what a
    checkpoint's number counts, for the message (a continual run's count stream tasks)."""
    done = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not resume and not overwrite and (done or (run_dir / "summary.json").exists()):
        where = f"checkpoints up to {unit} {done[-1][0]}" if done else "a finished run"
        raise UserError(f"{run_dir} already holds {where}; pass --resume to continue it, --overwrite "
                        f"to start over, or choose another run name (--set name=...)")
    stored = run_dir / "recipe.yaml"
    if resume and done and recipe_text is not None and stored.exists():
        changed = recipe_changes(stored.read_text(encoding="utf-8"), recipe_text)
        if changed:
            raise UserError(f"{stored}: the recipe changed since the run started ({', '.join(changed)}); "
                            f"resuming would not reproduce the run. Undo the change, or start a new run")


def prepare_run_dir(run_dir: Path, recipe_text: str | None, *, resume: bool) -> None:
    """(Main process, holding the run's lock.) Create the folder, store the recipe, clear an earlier run unless
    resuming, and drop the leftovers of interrupted writes: `.step-*.tmp` checkpoints and the temp files and
    folders of `potstill.io` (`.student.*.tmp`, `.teacher_cache.*.tmp`, …) in the folder and its sub-folders."""
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep_temp(run_dir)
    if recipe_text is not None:
        atomic_write_text(run_dir / "recipe.yaml", recipe_text)
    root = run_dir / "checkpoints"
    if not resume:
        for stale in RUN_FILES:
            (run_dir / stale).unlink(missing_ok=True)
        if root.exists():
            shutil.rmtree(root)
        for folder in (TRACKERS_DIR, ADAPTER_DIR):  # an earlier run's TensorBoard files, LoRA adapter
            shutil.rmtree(run_dir / folder, ignore_errors=True)
    ckpt.remove_partial(root)


def stored_complete_summary(run_dir: Path, recipe_text: str) -> dict[str, Any] | None:
    """`<run_dir>/summary.json` when it says the run is complete, the saved student is there and the stored
    recipe.yaml equals `recipe_text` (`recipe_changes` finds no difference); None otherwise."""
    import json

    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        stored = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    if (not isinstance(summary, dict) or not summary.get("complete") or not (run_dir / "student").is_dir()
            or recipe_changes(stored, recipe_text)):
        return None
    return summary
