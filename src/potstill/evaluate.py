"""`potstill eval`: score a finished run's saved student against its teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from potstill.config import load_saved_recipe
from potstill.errors import UserError


def evaluate_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows {model, metrics…, params, speed} for the teacher and the saved student of `run_dir`."""
    from potstill.tasks import build_task
    from potstill.tasks.models import load_state_dict

    run_dir = Path(run_dir)
    student_dir = run_dir / "student"
    if not (run_dir / "recipe.yaml").is_file() or not student_dir.is_dir():
        raise UserError(f"{run_dir}: not a finished potstill run (expected recipe.yaml and student/ inside)")
    recipe = load_saved_recipe(run_dir / "recipe.yaml")
    factory_student = recipe.student.init == "factory"
    if not factory_student:
        recipe.student = recipe.student.model_copy(update={"init": "pretrained", "path": str(student_dir)})
    task = build_task(recipe, run_dir=run_dir)
    task.setup()
    student = task.student
    if student is None:
        raise UserError(f"{student_dir}: the {recipe.task} task loaded no student from it")
    if factory_student:
        student.load_state_dict(load_state_dict(str(student_dir / "model.safetensors"), field="student"))
    student.eval()
    sizes = task.measure(student) if recipe.eval.throughput else {}
    teacher_row = task.evaluate(task.teacher, role="teacher")  # type: ignore[arg-type]  # None: no teacher
    return [{"model": "teacher", **teacher_row, **sizes.get("teacher", {})},
            {"model": "student", **task.evaluate(student), **sizes.get("student", {})}]
