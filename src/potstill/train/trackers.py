"""Experiment trackers (`trainer.report_to`) through Accelerate's: TensorBoard, Weights & Biases, MLflow, ...

The run's Accelerator is made with `log_with=<trackers>` and `project_dir=<run>/trackers`
(`potstill.train.precision.new_accelerator`); `RunTrackers` starts them once the run folder is ready (project
"potstill", the run's name as the run name, the recipe's fields, flattened, as hyper-parameters), sends every
numeric field of every `metrics.jsonl` record to `Accelerator.log` at that record's step, and finishes them when
the run ends. TensorBoard's event files land in `<run>/trackers/potstill/`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from potstill.errors import UserError

#: `trainer.report_to` name -> the module Accelerate needs (the pip package of the same name).
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                   "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                   "trackio": "trackio"}
PROJECT = "potstill"


def tracker_dir(run_dir: str | Path) -> Path:
    """Where trackers that write files (TensorBoard, ...) keep them: `<run>/trackers`."""
    return Path(run_dir) / "trackers"


def check_trackers(names: Sequence[str]) -> None:
    """Every tracker of `trainer.report_to` must be importable; else one line naming the package to install."""
    for name in names:
        module = TRACKER_MODULES.get(name)
        if module is None:
            raise UserError(f"field trainer.report_to: unknown tracker {name!r}; valid: {', '.join(TRACKER_MODULES)}")
        if importlib.util.find_spec(module) is None:
            extra = " (or pip install 'potstill[trackers]')" if name == "tensorboard" else ""
            raise UserError(f"field trainer.report_to: {name} is not installed here: pip install {module}{extra}")


def flat_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as {"trainer.lr": 0.01, ...}: numbers, strings and bools kept, anything else as text
    (what trackers accept as hyper-parameters)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flat_config(item, f"{prefix}{key}."))
        return out
    key = prefix[:-1]
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)}


class RunTrackers:
    """The run's trackers, fed with the metrics.jsonl records (`log`). Does nothing when `names` is empty."""

    def __init__(self, accelerator: Any, names: Sequence[str]) -> None:
        self.accelerator, self.names, self.started = accelerator, list(names), False
        if not self.names:
            return
        have = {str(t) for t in getattr(accelerator, "log_with", None) or []}
        missing = [n for n in self.names if n not in have]
        if missing:
            raise UserError(f"field trainer.report_to: the Accelerator given to the Distiller does not log with "
                            f"{', '.join(missing)}; make it with potstill.train.precision.new_accelerator(report_to, "
                            f"run_dir)")

    def start(self, run_name: str, config: dict[str, Any]) -> None:
        if not self.names or self.started:
            return
        kwargs = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}}
        self.accelerator.init_trackers(PROJECT, config=flat_config(config), init_kwargs=kwargs)
        self.started = True

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record: its numeric fields at its step (warnings and empty speeds are left out)."""
        if not self.started:
            return
        values = {k: v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.accelerator.log(values, step=int(record["step"]))

    def close(self) -> None:
        """Finish every tracker (flushes TensorBoard's files). Not `Accelerator.end_training`, which also ends the
        process group that the run may still need."""
        if not self.started:
            return
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
        self.started = False
