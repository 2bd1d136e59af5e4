"""Shared by the study scripts: one `python -m potstill run RECIPE --set …` in a fresh process, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_potstill(recipe: Path, sets: list[str], *, label: str) -> tuple[dict, float]:
    """Run `recipe` with the `--set` overrides (the first must be `name=…`, and `output_dir=…` among them);
    returns the run's summary.json and the wall seconds. A failed run stops the study, showing its output."""
    cmd = [sys.executable, "-m", "potstill", "run", str(recipe), "--overwrite"]
    for item in sets:
        cmd += ["--set", item]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    values = dict(item.split("=", 1) for item in sets)
    summary = json.loads((Path(values["output_dir"]) / values["name"] / "summary.json").read_text())
    return summary, time.perf_counter() - start


def share_teacher_cache(run_dir: Path, runs: Path, *, pattern: str = "*") -> None:
    """Copy a finished run's teacher embeddings (the first of `runs/<pattern>/teacher_cache`) into `run_dir`:
    runs that distil the same teacher on the same texts reuse a cache whose manifest (teacher, data, max length,
    pooling) matches, and the embedding task recomputes one that does not."""
    import shutil

    if (run_dir / "teacher_cache").exists():
        return
    for other in sorted(runs.glob(f"{pattern}/teacher_cache/manifest.json")):
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(other.parent, run_dir / "teacher_cache")
        return
