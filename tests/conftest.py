"""Shared fixtures: small, fast recipes built from the bundled digits MLPs (no downloads)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
POTSTILL = [sys.executable, "-m", "potstill"]

DIGITS = {
    "name": "digits-test",
    "task": "classification",
    "seed": 0,
    "teacher": {"factory": "potstill.examples.digits:trained_teacher", "kwargs": {"hidden": 64, "epochs": 5}},
    "student": {"init": "factory", "factory": "potstill.examples.digits:mlp", "kwargs": {"hidden": 16}},
    "data": {"train": {"path": "builtin:digits", "split": "train", "limit": 256},
             "eval": {"path": "builtin:digits", "split": "test"}},
    "objectives": [{"name": "forward_kl", "params": {"temperature": 4.0, "scale_t2": True}}],
    "trainer": {"max_steps": 10, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.0, "log_every": 1,
                "num_threads": 1},
    "eval": {"compare_before": False, "throughput": False},
}


@pytest.fixture
def digits_recipe(tmp_path: Path) -> dict:
    """A tiny classification recipe (dict) writing into tmp_path."""
    raw = copy.deepcopy(DIGITS)
    raw["output_dir"] = str(tmp_path / "runs")
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
