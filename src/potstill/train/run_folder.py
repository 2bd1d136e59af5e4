"""The run folder's policy: what a new run clears, what a resume must match, what each run keeps once.

`<run>/` holds `recipe.yaml`, `metrics.jsonl`, `eval_teacher.json` / `eval_before.json` (scores computed once
per run, kept across resumes), `checkpoints/`, `student/`, `summary.json` and the files of data strategies
(DDK's `domain_weights.json`). A new run refuses to overwrite an earlier one unless told to; a resumed run
refuses a recipe that changed in a way that would not reproduce the run (`potstill.config.recipe_changes`,
which ignores `RESUMABLE_CHANGES`: name, output_dir, eval and the trainer's logging/saving/thread fields).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from potstill.config import recipe_changes
from potstill.data.ddk import HISTORY_FILE as DDK_HISTORY
from potstill.errors import UserError
from potstill.io import atomic_write_text
from potstill.train import checkpoint as ckpt

#: Files of an earlier run that a new (not resumed) run removes.
RUN_FILES = ("metrics.jsonl", "summary.json", "eval_before.json", "eval_teacher.json", DDK_HISTORY)


def check_run_dir(run_dir: Path, recipe_text: str | None, *, resume: bool, overwrite: bool) -> None:
    """Refuse to wipe an earlier run by accident, and to resume a run whose recipe has changed."""
    done = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not resume and not overwrite and (done or (run_dir / "summary.json").exists()):
        where = f"checkpoints up to step {done[-1][0]}" if done else "a finished run"
        raise UserError(f"{run_dir} already holds {where}; pass --resume to continue it, --overwrite "
                        f"to start over, or choose another run name (--set name=...)")
    stored = run_dir / "recipe.yaml"
    if resume and done and recipe_text is not None and stored.exists():
        changed = recipe_changes(stored.read_text(encoding="utf-8"), recipe_text)
        if changed:
            raise UserError(f"{stored}: the recipe changed since the run started ({', '.join(changed)}); "
                            f"resuming would not reproduce the run. Undo the change, or start a new run")


def prepare_run_dir(run_dir: Path, recipe_text: str | None, *, resume: bool) -> None:
    """(Main process.) Create the folder, store the recipe, clear an earlier run unless resuming, and drop the
    leftovers of an interrupted checkpoint write."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if recipe_text is not None:
        atomic_write_text(run_dir / "recipe.yaml", recipe_text)
    root = run_dir / "checkpoints"
    if not resume:
        for stale in RUN_FILES:
            (run_dir / stale).unlink(missing_ok=True)
        if root.exists():
            shutil.rmtree(root)
    ckpt.remove_partial(root)
