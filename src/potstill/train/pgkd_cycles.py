"""`potstill pgkd`: the PGKD loop (potstill.data.pgkd) around a text-classification recipe.

Cycle c trains the recipe's student on the recipe's training records plus every example the teacher has written
so far (`<run>/pgkd/train-cycle<c>.jsonl`, one run folder `<run>/cycle-<c>/` per cycle, trained from the recipe's
initialisation each time), validates it on `data.eval`, and asks the endpoint teacher for examples of the weakest
classes. `<run>/pgkd/state.json` holds the loop's state after every cycle, so `--resume` continues a killed loop
(the teacher's answers come back from its response cache); `<run>/pgkd/summary.json` names the best cycle, whose
student is the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from potstill.config import Recipe
from potstill.data.pgkd import PGKDLoop, Predictions
from potstill.errors import UserError
from potstill.io import atomic_write_json, atomic_write_text


def _records(records: list[dict], where: str) -> list[dict]:
    missing = [i + 1 for i, r in enumerate(records) if r.get("label") is None or not isinstance(r.get("text"), str)]
    if missing:
        raise UserError(f"{where}: PGKD needs a text and a label in every record; record(s) "
                        f"{', '.join(map(str, missing[:5]))} lack one")
    return [{"text": r["text"], "label": r["label"]} for r in records]


def run_pgkd(recipe: Recipe, teacher: Any, *, task_description: str, resume: bool = False,
             log=print, **loop_options: Any) -> dict[str, Any]:
    """Run (or, with `resume`, continue) PGKD on a classification recipe; returns the summary.

    `teacher` is an EndpointTeacher (or anything with `chat_many`); `loop_options` go to `PGKDLoop` (max_cycles,
    patience, weak_classes, per_cycle, …)."""
    from potstill.tasks import build_task
    from potstill.train.run import fit_recipe, with_pruned_kd_weights

    if recipe.task != "classification":
        raise UserError(f"field task: PGKD trains a text classifier; this recipe's task is {recipe.task}")
    if recipe.data.eval is None:
        raise UserError("field data.eval: PGKD validates the student every cycle; give data.eval (labelled texts)")
    if recipe.teacher.path is None:
        raise UserError("field teacher.path: PGKD needs a Hugging Face text classifier recipe (text inputs)")
    base = build_task(recipe, run_dir=recipe.run_dir)
    base.setup()
    train_records = _records(base.train_records, "data.train")
    validation = _records(base.eval_records, "data.eval")
    labels = list(getattr(base, "label_ids", None) or {})
    if not labels:
        raise UserError("data.train: PGKD needs gold labels (a label column)")
    folder = recipe.run_dir / "pgkd"
    state_path = folder / "state.json"
    loop = PGKDLoop(task_description, labels, **loop_options)
    if state_path.exists():
        if not resume:
            raise UserError(f"{state_path} exists: pass --resume to continue that PGKD loop, or remove "
                            f"{recipe.run_dir}")
        loop.load_state_dict(json.loads(state_path.read_text()))
        log(f"resuming PGKD after cycle {loop.cycle}")

    def train(records: list[dict]) -> Any:
        data_path = folder / f"train-cycle{loop.cycle}.jsonl"
        atomic_write_text(data_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        # the base records were pruned once already (data.prune); keep only its KD-weight tie for the cycles
        cycle = with_pruned_kd_weights(recipe).model_copy(deep=True)
        cycle.data.prune = None
        cycle.name = f"{recipe.name}/cycle-{loop.cycle}"
        cycle.data.train = cycle.data.train.model_copy(update={"path": str(data_path), "columns": {},
                                                                "limit": None})
        cycle.eval.compare_before = False
        return fit_recipe(cycle, overwrite=True)[0]

    def predict(task: Any, texts: list[str]) -> Predictions:
        logits = task._logits(task.student, [{"text": t} for t in texts])
        probs = torch.softmax(logits, dim=-1)
        names = {index: label for label, index in task.label_ids.items()}
        return Predictions(labels=[names[int(i)] for i in probs.argmax(-1)], confidence=probs.max(-1).values.tolist())

    def save_state(state: dict) -> None:
        atomic_write_json(state_path, state)

    _, best_data = loop.run(train_records, validation, train=train, predict=predict, teacher=teacher,
                            save_state=save_state, log=log)
    summary = {"best_cycle": loop.best_cycle, "best_macro_f1": loop.best_score,
               "student_dir": str(Path(recipe.run_dir) / f"cycle-{loop.best_cycle}" / "student"),
               "train_size": len(best_data), "history": loop.history}
    atomic_write_json(folder / "summary.json", summary)
    return summary
