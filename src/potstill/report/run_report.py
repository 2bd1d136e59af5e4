"""The report of one `potstill run`: `report.html` with the summary, the teacher and the student, the speed-up, the
results table, the training and evaluation curves, and the hyper-parameters (`report.html.write_report`).

The speed-up is read from the results table: the student's (after training) rate ÷ the teacher's, in the task's
throughput unit (the column ending in `_per_s`, measured interleaved by `eval.speed`), with each rate's spread
(the relative interquartile range of its timed blocks), and the size ratio from the parameter counts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from potstill.report.html import write_report
from potstill.report.model_card import CardFacts

__all__ = ["flatten", "speedup", "write_run_report"]


def _row(table: list[dict[str, Any]], model: str) -> dict[str, Any]:
    return next((row for row in table if row.get("model") == model), {})


def speedup(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The speed and size of the trained student against the teacher, as report lines; empty without both rows."""
    teacher, student = _row(table, "teacher"), _row(table, "student (after)")
    out: dict[str, Any] = {}
    unit = next((k for k in teacher if k.endswith("_per_s") and isinstance(student.get(k), (int, float))), None)
    if unit is not None and teacher[unit]:
        out[f"speed-up: student ÷ teacher {unit}"] = f"{student[unit] / teacher[unit]:.2f}×"
        for role, row in (("teacher", teacher), ("student", student)):
            spread = row.get(f"{unit}_spread")
            iqr = "" if spread is None else f" (interquartile range {spread:.0%} of it)"
            out[f"{role} {unit}"] = f"{row[unit]:,.1f}{iqr}"
    if teacher.get("params") and student.get("params"):
        out["size: teacher ÷ student parameters"] = f"{teacher['params'] / student['params']:.1f}×"
    return out


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys ({"a": {"b": 1}} → {"a.b": 1}); empty dicts and None are left out."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif value is not None:
            out[name] = value
    return out


def write_run_report(run_dir: str | os.PathLike, facts: CardFacts, summary: dict[str, Any],
                     hyperparameters: dict[str, Any], notes: list[str] | None = None) -> Path:
    """`run_dir/report.html` for a finished run: `summary` (summary.json, its "table" being the results table),
    the models and data of `facts`, the speed-up, the flattened `hyperparameters`, the curves of metrics.jsonl."""
    table = list(summary.get("table") or [])
    models = {"task": facts.task, "teacher": facts.teacher, "student": facts.student, "training data": facts.data,
              "objectives": facts.objectives, "training": facts.training}
    sections = [("Teacher and student", {k: v.replace("`", "") for k, v in models.items()})]
    speed = speedup(table)
    if speed:
        sections.append(("Speed-up", speed))
    return write_report(Path(run_dir), title=f"potstill run: {facts.name}",
                        tables=[("teacher / student before / student after", table)],
                        summary={k: v for k, v in summary.items() if k != "table"}, sections=sections,
                        details=[("Hyper-parameters", flatten(hyperparameters))], notes=notes)
