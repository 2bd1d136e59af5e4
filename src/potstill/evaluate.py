"""`potstill eval`: score a finished run's saved student against its teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from potstill.config import distillation_recipe, load_saved_recipe
from potstill.errors import UserError


def _saved_recipe(run_dir: Path, kind: str = "potstill") -> Any:
    """The recipe of a finished run (one with recipe.yaml and student/); `kind` names the run in the error."""
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "student").is_dir():
        raise UserError(f"{run_dir}: not a finished {kind} run (expected recipe.yaml and student/ inside)")
    path = run_dir / "recipe.yaml"
    return distillation_recipe(load_saved_recipe(path), "potstill eval / export", where=str(path))


def _load_student(run_dir: Path, recipe: Any) -> tuple[Any, Any]:
    """The task of `recipe` set up with the student saved in `run_dir`/student (eval mode)."""
    from potstill.tasks import build_task
    from potstill.tasks.models import load_state_dict

    student_dir = run_dir / "student"
    factory_student = recipe.student.init == "factory"
    swiftkv_student = recipe.student.init == "swiftkv"  # rebuilt over the teacher, then its new weights loaded
    if not (factory_student or swiftkv_student):
        # the saved folder holds the built student: its config overrides and layer picks are spent
        recipe.student = recipe.student.model_copy(update={"init": "pretrained", "path": str(student_dir),
                                                           "config": {}, "layers": None})
    task = build_task(recipe, run_dir=run_dir)
    task.setup()
    student = task.student
    if student is None:
        raise UserError(f"{student_dir}: the {recipe.task} task loaded no student from it")
    if factory_student:
        student.load_state_dict(load_state_dict(str(student_dir / "model.safetensors"), field="student"))
    if swiftkv_student:
        from potstill.students.swiftkv import load_swiftkv_weights

        load_swiftkv_weights(student, student_dir)
    student.eval()
    return task, student


def evaluate_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows {model, metrics…, params, speed} for the teacher and the saved student of `run_dir`."""
    from potstill.ui import phase

    run_dir = Path(run_dir)
    recipe = _saved_recipe(run_dir)
    with phase(f"loading {run_dir}: data, teacher and saved student"):
        task, student = _load_student(run_dir, recipe)
    sizes = {}
    if task.recipe.eval.throughput:
        with phase("measuring teacher and student throughput (interleaved)"):
            sizes = task.measure(student)
    with phase("evaluating the teacher"):
        teacher_row = task.evaluate(task.teacher, role="teacher")  # type: ignore[arg-type]  # None: no teacher
    with phase("evaluating the student"):
        student_row = task.evaluate(student)
    return [{"model": "teacher", **teacher_row, **sizes.get("teacher", {})},
            {"model": "student", **student_row, **sizes.get("student", {})}]


def evaluate_lm_suite(run_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """`potstill.eval.lm_suite.run_lm_suite` on a causal_lm run's saved student and its teacher; the result is
    also written to `<run>/eval_lm.json`."""
    from potstill.eval.lm_suite import run_lm_suite
    from potstill.io import atomic_write_json

    run_dir = Path(run_dir)
    recipe = _saved_recipe(run_dir, "causal_lm")
    if recipe.task != "causal_lm":
        raise UserError(f"{run_dir}: --suite lm scores causal language-model students; this run's task is "
                        f"{recipe.task}")
    task, student = _load_student(run_dir, recipe)
    if task.teacher is None:
        raise UserError(f"{run_dir / 'recipe.yaml'}: --suite lm compares the student with its teacher; this run "
                        f"has no teacher model (teacher.path or teacher.factory)")

    def logits(model: Any, ids: Any, mask: Any) -> Any:
        return task.logits(model, {"input_ids": ids, "attention_mask": mask})

    result = run_lm_suite(student, task.teacher, task.tokenizer, logits=logits,
                          batch_size=task.recipe.eval.batch_size, progress=progress)
    atomic_write_json(run_dir / "eval_lm.json", result)
    return result


def evaluate_general_suite(run_dir: str | Path) -> dict[str, Any]:
    """The general embedding suite (`potstill.eval.suite`) on an embedding run's saved student and its teacher;
    written to `<run>/eval_general.json` and returned, with `per_task`: one row per task, a column per model."""
    from potstill.eval.suite import score_teacher_and_student
    from potstill.io import atomic_write_json
    from potstill.students.loading import resolve_model_path

    run_dir = Path(run_dir)
    student_dir = run_dir / "student"
    recipe = _saved_recipe(run_dir, "embedding")
    if recipe.task != "embedding":
        raise UserError(f"{run_dir}: --suite general scores text-embedding students; this run's task is {recipe.task}")
    if not (student_dir / "modules.json").is_file():
        raise UserError(f"{run_dir}: not a finished embedding run (student/ is not a sentence-transformers folder)")
    if not recipe.teacher.path:
        raise UserError(f"{run_dir / 'recipe.yaml'}: field teacher.path: --suite general needs the teacher's model "
                        f"folder (or builtin:minilm)")
    results = score_teacher_and_student(resolve_model_path(recipe.teacher.path, field="teacher.path"), student_dir)
    table = [{"model": name, "average": r.average, "average_over_types": r.average_over_types, **r.per_type,
              **r.fidelity} for name, r in results.items()]
    per_task = [{"task": row["task"], "type": row.get("type", ""), "metric": row["metric"],
                 **{name: r.rows()[i]["score"] for name, r in results.items()}}
                for i, row in enumerate(results["student"].rows())]
    result = {"suite": "general", "table": table, **{name: r.to_dict() for name, r in results.items()}}
    atomic_write_json(run_dir / "eval_general.json", result)
    return {**result, "per_task": per_task}
