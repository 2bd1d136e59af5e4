"""What happens around the Distiller's optimizer steps: progress, metrics, evaluation, monitoring, checkpoints.

The loop calls every callback's hooks in order:
- `on_fit_start(state)` once, before the first step of this process (after a resume, at `state.start`);
- `on_step_end(state, result)` after every optimizer step, with the step's `StepResult`;
- `on_evaluate(state, step, metrics)` after each evaluation of the student (periodic and final);
- `on_train_end(state)` when the steps stop (also on an error), `on_fit_end(state, summary)` before the
  summary is written.
A callback with state names its file in the checkpoint (`state_file`) and gives `state_dict` /
`load_state_dict` (and for tensors `tensors_file`, `tensors` / `load_tensors`); `Checkpointing` writes and
restores it with the rest of the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potstill.eval.teacher_hacking import TeacherHackingMonitor
from potstill.io import atomic_write_text


@dataclass
class FitState:
    """What callbacks may read about the run: where it is, how long it is, and (set once prepared) the models."""

    run_dir: Path
    is_main: bool
    start: int
    total: int
    rows_per_step: int  # training records one optimizer step visits (all processes)
    epoch_rows: int  # records in one pass over the training data
    student: Any = None  # as prepared by Accelerate
    optimizer: Any = None
    scheduler: Any = None

    def epochs(self, step: int) -> float:
        """Passes over the training records after `step` optimizer steps."""
        return step * self.rows_per_step / max(1, self.epoch_rows)


@dataclass
class StepResult:
    """One optimizer step, as every process agrees on it."""

    step: int  # optimizer steps done
    loss: float  # Σ wᵢ · (objective i per counted row)
    objectives: dict[str, float]  # each term per counted row (unweighted), hard_label included
    rows: float  # counted rows of the step, all processes
    lr: float
    grad_norm: float | None = None
    state_values: dict[str, float] = field(default_factory=dict)  # "<objective>.<key>" of stateful objectives


class Callback:
    """Base class: every hook does nothing."""

    state_file: str | None = None  # file name of this callback's state inside a checkpoint
    tensors_file: str | None = None  # file name of this callback's tensors (safetensors) inside a checkpoint

    def on_fit_start(self, state: FitState) -> None:
        pass

    def on_step_end(self, state: FitState, result: StepResult) -> None:
        pass

    def on_evaluate(self, state: FitState, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, state: FitState) -> None:
        pass

    def on_fit_end(self, state: FitState, summary: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def tensors(self) -> dict[str, Any] | None:
        """Tensors to checkpoint in `tensors_file` (None: nothing to write this time)."""
        return None

    def load_tensors(self, tensors: dict[str, Any]) -> None:
        pass


def _is_log_step(step: int, total: int, log_every: int) -> bool:
    return step % log_every == 0 or step == total


class ProgressBar(Callback):
    """A rich bar with the loss and the rows/s (main process; a plain line per log step when not a terminal)."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self._stack = contextlib.ExitStack()

    def on_fit_start(self, state: FitState) -> None:
        if not state.is_main:
            return
        from rich.progress import TextColumn

        from potstill.ui import make_progress

        self.progress = make_progress(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"))
        self.bar = self.progress.add_task("distilling", total=state.total, completed=state.start, loss="-",
                                          speed="")
        self._stack.enter_context(self.progress)
        self.tick, self.rows = time.perf_counter(), 0.0

    def on_step_end(self, state: FitState, result: StepResult) -> None:
        if not state.is_main:
            return
        from potstill.ui import console

        self.rows += result.rows
        elapsed = time.perf_counter() - self.tick
        speed = self.rows / elapsed if elapsed > 0 else 0.0
        self.progress.update(self.bar, advance=1, loss=f"{result.loss:.4g}", speed=f"{speed:,.0f} rows/s")
        if _is_log_step(result.step, state.total, self.log_every):
            if not console.is_terminal:
                console.print(f"step {result.step}/{state.total} loss {result.loss:.4g}")
            self.tick, self.rows = time.perf_counter(), 0.0

    def on_evaluate(self, state: FitState, step: int, metrics: dict[str, float]) -> None:
        """One console line per evaluation: the step and every metric."""
        if not state.is_main or not metrics:
            return
        from potstill.ui import console

        values = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        console.print(f"eval step {step}/{state.total}: {values}", soft_wrap=True, highlight=False)

    def on_train_end(self, state: FitState) -> None:
        self._stack.close()


def keep_metrics(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite a `metrics.jsonl` with only the records `keep` accepts (what a resumed run has not yet redone);
    lines that are not a JSON object are dropped; nothing when the file does not exist."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and keep(rec):
            kept.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in kept))


class MetricsLog(Callback):
    """`<run>/metrics.jsonl`: one line per `log_every` steps, one per evaluation, one per warning. A resumed run
    first drops the lines written after its checkpoint (they will be written again): those of later steps, and
    when it resumes from the final checkpoint, the final evaluation's (step = total, no "loss")."""

    def __init__(self, run_dir: Path, is_main: bool, log_every: int) -> None:
        self.path, self.is_main, self.log_every = Path(run_dir) / "metrics.jsonl", is_main, log_every
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # each record also goes to these (trackers)

    def append(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        for listener in self.listeners:
            listener(record)

    def on_fit_start(self, state: FitState) -> None:
        self.tick, self.rows = time.perf_counter(), 0.0
        if not self.is_main:
            return

        def written_before(rec: dict[str, Any]) -> bool:
            step = rec.get("step", 0)
            # at the final step the checkpoint precedes the final evaluation's rows: those come again
            return step < state.start or (step == state.start and (state.start < state.total or "loss" in rec))

        keep_metrics(self.path, written_before)

    def on_step_end(self, state: FitState, result: StepResult) -> None:
        self.rows += result.rows
        if not _is_log_step(result.step, state.total, self.log_every):
            return
        elapsed = time.perf_counter() - self.tick
        record: dict[str, Any] = {"step": result.step, "loss": result.loss, "lr": result.lr,
                                  "rows_per_s": self.rows / elapsed if elapsed > 0 else None,
                                  "epoch": state.epochs(result.step)}
        record.update({f"state/{k}": v for k, v in result.state_values.items()})
        record.update({f"obj/{k}": v for k, v in result.objectives.items()})
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm
        self.append(record)
        self.tick, self.rows = time.perf_counter(), 0.0

    def on_evaluate(self, state: FitState, step: int, metrics: dict[str, float]) -> None:
        self.append({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})


class PeriodicEval(Callback):
    """Evaluate the student every `every` optimizer steps (`eval.every`; the final evaluation is the loop's)."""

    def __init__(self, every: int, evaluate: Callable[[int], None]) -> None:
        self.every, self.evaluate = every, evaluate

    def on_step_end(self, state: FitState, result: StepResult) -> None:
        if self.every and result.step % self.every == 0 and result.step < state.total:
            self.evaluate(result.step)


def golden_nll(metrics: dict[str, float]) -> float | None:
    """The student's mean NLL on the reference tokens (the monitor's golden metric): `nll` when the task reports
    it, else log(perplexity) (the language-model tasks report perplexity); None when neither is there."""
    if "nll" in metrics:
        return metrics["nll"]
    perplexity = metrics.get("perplexity")
    if perplexity is None or not perplexity > 0:
        return None
    return math.log(perplexity)


class TeacherHackingWatch(Callback):
    """Feed each evaluation's `kl_to_teacher` (and `nll`) to the teacher-hacking monitor (default thresholds:
    golden more than 0.005 nats above its best for 2 evaluations while the proxy fell, or the proxy 0.15 log
    units off its power-law trend); print and log its warnings, list them in the summary. Its state is
    `monitor.json` in every checkpoint."""

    state_file = "monitor.json"

    def __init__(self, metrics: MetricsLog) -> None:
        self.monitor, self.metrics = TeacherHackingMonitor(), metrics

    def on_evaluate(self, state: FitState, step: int, metrics: dict[str, float]) -> None:
        if not state.is_main or "kl_to_teacher" not in metrics:
            return
        from potstill.ui import console

        for message in self.monitor.update(step, metrics["kl_to_teacher"], golden_nll(metrics),
                                           epochs_seen=state.epochs(step)):
            console.print(f"[yellow]warning:[/] {message}")
            self.metrics.append({"step": step, "warning": message})

    def on_fit_end(self, state: FitState, summary: dict[str, Any]) -> None:
        summary["warnings"] = [w["message"] for w in self.monitor.warnings]

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)


class WallClock(Callback):
    """Training seconds spent so far (this process's, across resumes: its state is in every checkpoint) against
    `trainer.max_seconds`. Counted from `on_fit_start`, so set-up, the teacher's evaluation and the final
    evaluation are outside it; periodic evaluations and checkpoints inside the loop count."""

    state_file = "wall_clock.json"

    def __init__(self, max_seconds: float | None) -> None:
        self.max_seconds, self.before, self.started = max_seconds, 0.0, time.perf_counter()

    def on_fit_start(self, state: FitState) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        return self.max_seconds is not None and self.seconds() >= self.max_seconds

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = float(state["seconds"])


class Checkpointing(Callback):
    """A checkpoint every `save_every` optimizer steps (`trainer.save_every`; the final one is the loop's),
    written by `save(state, step)`."""

    def __init__(self, every: int, save: Callable[[FitState, int], None]) -> None:
        self.every, self.save = every, save

    def on_step_end(self, state: FitState, result: StepResult) -> None:
        if self.every and result.step % self.every == 0 and result.step < state.total:
            self.save(state, result.step)
