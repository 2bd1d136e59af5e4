"""`potstill run` for `task: continual`: a class-incremental stream trained with no replay, in a run folder.

The training is `potstill.train.prd_stream.train_stream` (the loop the PRD benchmark runs); this module gives it
what every potstill run has. The run folder follows `potstill.train.run_folder` (lock, refusal of an earlier run
without `--resume` / `--overwrite`, `recipe.yaml`, a resumed recipe must not have changed). After each stream task
the network and the accuracy matrix so far are written whole to `<run>/checkpoints/step-0000000T/` (T = tasks
done; `model.safetensors`, `state.json`), so `--resume` continues from the next task with the checkpoint's
network and its frozen copy as the old model, which gives the numbers of an uninterrupted run (the batches and
augmentation are seeded per task). `metrics.jsonl` gets the loss every `continual.log_every` steps and the
accuracies after each task; `summary.json` the accuracy matrix, average accuracy and forgetting; `student/` the
trained network (`model.safetensors` and `continual_net.json`, read back by `load_continual_net`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from potstill.config import ContinualRecipe, dump_recipe
from potstill.data.task_stream import StreamTask, builtin_stream
from potstill.errors import UserError
from potstill.io import atomic_dir, atomic_write_json, safetensors_state
from potstill.train import checkpoint as ckpt
from potstill.train.callbacks import MetricsLog, keep_metrics
from potstill.train.prd_stream import (
    ContinualNet,
    StreamConfig,
    StreamResult,
    random_crop_augment,
    small_cnn_net,
    steps_per_epoch,
)

MODEL_FILE, STATE_FILE, NET_FILE = "model.safetensors", "state.json", "continual_net.json"
KEEP_LAST = 2  # task checkpoints kept
STREAM_CLASSES = 10  # both builtin streams; the classifier and the prototypes cover all of them from the start


@dataclass(frozen=True)
class _OneProcess:
    """What `run_folder.run_lock` asks of an accelerator, for a run on one process."""

    is_main_process: bool = True
    num_processes: int = 1


def stream_config(recipe: ContinualRecipe) -> StreamConfig:
    """The recipe's method settings as the loop's `StreamConfig`."""
    c = recipe.continual
    return StreamConfig(method=c.method, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                        weight_decay=c.weight_decay, prototype_lr=c.prototype_lr,
                        supcon_temperature=c.supcon_temperature, prototype_weight=c.prototype_weight,
                        distill_weight=c.distill_weight, distill_temperature=c.distill_temperature,
                        distill_axis=c.distill_axis, lwf_weight=c.lwf_weight, lwf_temperature=c.lwf_temperature,
                        seed=recipe.seed)


def build_stream(recipe: ContinualRecipe) -> list[StreamTask]:
    """The recipe's stream: the builtin stream's per-class draws, its first `num_tasks` tasks."""
    c = recipe.continual
    tasks = builtin_stream(c.stream, train_per_class=c.train_per_class, test_per_class=c.test_per_class,
                           seed=c.subset_seed)
    return tasks[:c.num_tasks] if c.num_tasks is not None else tasks


def _net_config(recipe: ContinualRecipe, tasks: list[StreamTask]) -> dict[str, Any]:
    b = recipe.continual.backbone
    return {"width": b.width, "depth": b.depth, "features": b.features, "projection_dim": b.projection_dim,
            "num_classes": STREAM_CLASSES, "image_size": int(tasks[0].train.images.shape[-1]),
            "in_channels": int(tasks[0].train.images.shape[1]), "seed": recipe.seed}


def load_continual_net(folder: str | Path) -> tuple[ContinualNet, dict[str, Any]]:
    """A saved `student/` folder: the network with its trained weights, and `continual_net.json` (the network's
    settings, the method, the classes seen; the method's prediction rule: `prd_stream.predict`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        info = json.loads((folder / NET_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(folder / MODEL_FILE))
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}: not a saved continual network ({NET_FILE} and {MODEL_FILE}): {err}") from None
    net = small_cnn_net(**info["network"])
    net.load_state_dict(weights)
    return net.eval(), info


def _save_weights(model: ContinualNet, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(safetensors_state(model.state_dict()), str(path))


def _write_checkpoint(root: Path, done: int, model: ContinualNet, result: StreamResult, step: int) -> None:
    with atomic_dir(ckpt.step_dir(root, done)) as tmp:
        _save_weights(model, tmp / MODEL_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"tasks_done": done, "step": step, "accuracy": result.accuracy,
                                                  "seconds": result.seconds}), encoding="utf-8")
    ckpt.prune(root, KEEP_LAST)


def _restore(root: Path, model: ContinualNet, say: Any) -> StreamResult | None:
    """The newest task checkpoint that reads, loaded into `model`: the result so far; None if there is none."""
    from safetensors.torch import load_file

    problems = []
    for done, folder in reversed(ckpt.list_checkpoints(root)):
        try:
            state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
            model.load_state_dict(load_file(str(folder / MODEL_FILE)))
            if state["tasks_done"] != done or len(state["accuracy"]) != done:
                raise ValueError("its state.json does not match its folder")
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            problems.append(f"{folder.name}: {type(err).__name__}")
            continue
        if problems:
            say(f"passed over damaged checkpoints: {', '.join(problems)}")
        return StreamResult(state["accuracy"], state["seconds"])
    if problems:
        raise UserError(f"{root}: no checkpoint can be resumed ({'; '.join(problems)}); use --overwrite to start over")
    return None


def finished_summary(recipe: ContinualRecipe) -> dict[str, Any] | None:
    """The stored summary when the run folder holds this same recipe's complete run; None otherwise."""
    from potstill.train.run_folder import stored_complete_summary

    return stored_complete_summary(recipe.run_dir, dump_recipe(recipe))


def run_continual(recipe: ContinualRecipe, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train the recipe's stream task by task (or continue it, `resume`); returns the summary (also in
    `<run>/summary.json`)."""
    from potstill.train.run_folder import check_output_dir, check_run_dir, prepare_run_dir, run_lock
    from potstill.ui import console

    check_output_dir(recipe)
    run_dir = recipe.run_dir
    with run_lock(run_dir, _OneProcess()):
        finished = finished_summary(recipe) if resume else None
        if finished is not None:
            console.print(f"{run_dir} is already complete (same recipe): nothing to resume", highlight=False)
            return finished
        recipe_text = dump_recipe(recipe)
        check_run_dir(run_dir, recipe_text, resume=resume, overwrite=overwrite, unit="stream task")
        tasks = build_stream(recipe)  # a data problem stops the run before the folder is touched
        prepare_run_dir(run_dir, recipe_text, resume=resume)
        return _train(recipe, tasks, resume=resume)


def _train(recipe: ContinualRecipe, tasks: list[StreamTask], *, resume: bool) -> dict[str, Any]:
    from potstill.train.prd_stream import train_stream
    from potstill.ui import console, make_progress

    if recipe.continual.num_threads is not None:
        torch.set_num_threads(recipe.continual.num_threads)
    run_dir, cfg, settings = recipe.run_dir, stream_config(recipe), recipe.continual
    root, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    network = _net_config(recipe, tasks)
    model = small_cnn_net(**network)
    done = _restore(root, model, console.print) if resume else None
    first = len(done.accuracy) if done is not None else 0
    keep_metrics(metrics, lambda rec: rec.get("stream_task", 0) < first)  # the later tasks' lines come again
    if first:
        console.print(f"resuming after stream task {first} of {len(tasks)}", highlight=False)
    task_steps = [cfg.epochs * steps_per_epoch(len(t.train), cfg.batch_size) for t in tasks]
    offsets = [sum(task_steps[:i]) for i in range(len(tasks))]

    append = MetricsLog(run_dir, is_main=True, log_every=settings.log_every).append

    with make_progress() as progress:
        bar = progress.add_task(f"{settings.method} on {settings.stream}", total=sum(task_steps),
                                completed=offsets[first] if first < len(tasks) else sum(task_steps))

        def on_step(task: StreamTask, step: int, steps: int, loss: float) -> None:
            progress.advance(bar)
            if step % settings.log_every == 0 or step == steps:
                append({"step": offsets[task.index] + step, "stream_task": task.index, "loss": loss})

        def after_task(task: StreamTask, net: ContinualNet, result: StreamResult) -> None:
            row, step = result.accuracy[-1], offsets[task.index] + task_steps[task.index]
            append({"step": step, "stream_task": task.index,
                    **{f"eval/task_{j}_accuracy": a for j, a in enumerate(row)},
                    "eval/average_accuracy": sum(row) / len(row), "eval/forgetting": result.forgetting})
            _write_checkpoint(root, task.index + 1, net, result, step)
            progress.console.print(f"stream task {task.index + 1}/{len(tasks)} (classes "
                                   f"{', '.join(map(str, task.classes))}): accuracy per task "
                                   f"{[round(a, 3) for a in row]}, average {sum(row) / len(row):.3f}",
                                   highlight=False, soft_wrap=True)

        result = train_stream(model, tasks, cfg, random_crop_augment(settings.random_crop_padding), done=done,
                              on_step=on_step, after_task=after_task)
    student = run_dir / "student"
    with atomic_dir(student) as tmp:
        _save_weights(model, tmp / MODEL_FILE)
        (tmp / NET_FILE).write_text(json.dumps({
            "network": network, "method": cfg.method, "classes_seen": [c for t in tasks for c in t.classes],
            "predict": "nearest prototype (cosine)" if cfg.method == "prd" else "arg-max of the seen classes' logits",
        }, indent=2), encoding="utf-8")
    summary = _summary(recipe, tasks, result, student)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _summary(recipe: ContinualRecipe, tasks: list[StreamTask], result: StreamResult, student: Path) -> dict[str, Any]:
    final = result.accuracy[-1]
    table = [{"stream task": f"{t.index + 1} (classes {', '.join(map(str, t.classes))})",
              "accuracy after it": result.accuracy[t.index][t.index], "final accuracy": final[t.index]}
             for t in tasks]
    return {"task": "continual", "method": recipe.continual.method, "stream": recipe.continual.stream,
            "seed": recipe.seed, "stream_tasks": [list(t.classes) for t in tasks], "accuracy": result.accuracy,
            "average_accuracy": result.average_accuracy, "forgetting": result.forgetting,
            "seconds": result.seconds, "complete": True, "student_dir": str(student), "table": table}
