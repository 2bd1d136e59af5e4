"""Validation errors in words: `<file>, line N: field a.b.c: message`, one line per problem.

The line is found in the YAML node tree; an unknown key gets a "did you mean" hint, or, when it is a field of
another task's recipe, says which task has it.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from potstill.config.common import TASKS, SubFieldError
from potstill.config.recipe import RECIPE_OF_TASK
from potstill.errors import did_you_mean


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at `loc`, or of its deepest existing parent."""
    node, line = root, None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
            if node is None:
                # the key itself may exist (error about the key, e.g. an unknown one)
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _key_line(root: yaml.Node | None, loc: tuple) -> int | None:
    parent = _line_of(root, loc[:-1]) if loc else None
    node = root
    for key in loc[:-1]:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return parent
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if k.value == str(loc[-1]):
                return k.start_mark.line + 1
    return parent


def model_at(model: Any, loc: tuple) -> Any:
    """The model class of the section at `loc` (list indices skipped) under `model`, or None."""
    for key in loc:
        if isinstance(key, int):
            continue
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return None
        ann = field.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            inner = getattr(candidate, "__args__", ())
            for c in (candidate, *inner):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    model = c
                    break
            else:
                continue
            break
        else:
            return None
    return model


def fields_at(model: Any, loc: tuple) -> list[str]:
    """Field names allowed at `loc` (the parent of an unknown key) in `model`."""
    return list(getattr(model_at(model, loc), "model_fields", {}))


# Hugging Face Trainer (TrainingArguments) names -> the potstill recipe field that does the same; None: no such field
# yet (unless a later schema adds one under trainer:, which `_trainer_name_hint` checks first).
HF_TRAINER_NAMES: dict[str, str | None] = {
    "learning_rate": "trainer.lr",
    "num_train_epochs": "trainer.epochs",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "per_device_train_batch_size": "trainer.batch_size",
    "train_batch_size": "trainer.batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "save_steps": "trainer.save_every",
    "save_total_limit": "trainer.keep_last",
    "logging_steps": "trainer.log_every",
    "eval_steps": "eval.every",
    "bf16": "trainer.mixed_precision: bf16",
    "fp16": "trainer.mixed_precision: fp16",
    "lr_scheduler_type": "trainer.schedule",
    "adam_beta1": "trainer.betas: [beta1, beta2]",
    "adam_beta2": "trainer.betas: [beta1, beta2]",
    "warmup_steps": "trainer.warmup_steps",
    "warmup_ratio": "trainer.warmup_ratio",
    "weight_decay": "trainer.weight_decay",
    "max_grad_norm": "trainer.max_grad_norm",
    "seed": "seed (top level)",
    "report_to": "trainer.report_to",
    "optim": "trainer.optimizer",
    "load_best_model_at_end": "trainer.early_stopping",
    "metric_for_best_model": "trainer.early_stopping.metric",
}


def _trainer_name_hint(key: str, path: str, here: Any) -> str:
    """': <hint>' when `key` is a Hugging Face Trainer name that potstill spells or places differently, else ''."""
    if key not in HF_TRAINER_NAMES:
        return ""
    if key in fields_at(here, ("trainer",)) and path != f"trainer.{key}":
        return f": {key} belongs under trainer: (trainer.{key})"
    target = HF_TRAINER_NAMES[key]
    if target is None:
        return (f": the Hugging Face Trainer's {key} is not supported yet; metrics are written to "
                f"<run>/metrics.jsonl and <run>/report.html")
    return f": the Hugging Face Trainer's {key} is {target} in a potstill recipe"


def _tasks(names: list[str]) -> str:
    return f"the {names[0]} task" if len(names) == 1 else f"the {', '.join(names[:-1])} and {names[-1]} tasks"


def _unknown_key(loc: tuple, task: str | None) -> tuple[str, bool]:
    """The message for an unknown key, and whether the key is a field of another task."""
    key, path = str(loc[-1]), ".".join(str(p) for p in loc)
    here = RECIPE_OF_TASK.get(task or "")
    elsewhere = [t for t, model in RECIPE_OF_TASK.items() if t != task and key in fields_at(model, loc[:-1])]
    if elsewhere and here is not None:
        return f"unknown key {key!r}: {path} is for {_tasks(elsewhere)}, not {task}", True
    hint = _trainer_name_hint(key, path, here) if here is not None else ""
    if hint:
        return f"unknown key {key!r}{hint}", False
    return f"unknown key {key!r}{did_you_mean(key, fields_at(here, loc[:-1]) if here else [])}", False


def _task_tag(e: dict, root: yaml.Node | None) -> tuple[tuple, int | None, str]:
    """(loc, line, message) of a missing or unknown `task`."""
    valid = ", ".join(TASKS)
    if e["type"] == "union_tag_not_found":
        return ("task",), _line_of(root, ()), f"missing; what the models do, one of {valid}"
    tag = str(e.get("ctx", {}).get("tag", e.get("input")))
    return ("task",), _line_of(root, ("task",)), f"unknown task {tag!r}{did_you_mean(tag, TASKS)}; valid: {valid}"


def _set_item(loc: tuple, overridden: dict[tuple, str] | None) -> str | None:
    """The `--set` item that gave the field at `loc` (or a section above it), if one did."""
    for path, item in (overridden or {}).items():
        if tuple(str(p) for p in loc[:len(path)]) == tuple(str(p) for p in path):
            return item
    return None


def format_validation_error(err: ValidationError, source: str, root: yaml.Node | None, *,
                            overridden: dict[tuple, str] | None = None) -> str:
    """One line: `invalid recipe: <file>, line N: field a.b: message` (or `--set a.b=x: field a.b: message` when an
    override gave the field, `overridden`: path → item); several problems are joined by "; "."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function")))
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, SubFieldError):
            loc = (*loc, *cause.sub)
        task = None
        if loc and loc[0] in TASKS and e["type"] not in ("union_tag_invalid", "union_tag_not_found"):
            task, loc = str(loc[0]), loc[1:]  # the discriminated union's tag: not a key of the recipe
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc, line, msg = _task_tag(e, root)
            path = "task"
        elif e["type"] == "extra_forbidden":
            msg, foreign = _unknown_key(loc, task)
            # a typo points at its key; another task's field at its value (a section: its first entry)
            line = _line_of(root, loc) if foreign else _key_line(root, loc)
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("missing", "value_error") and "input" in e:
                msg += f" (got {e['input']!r})"
            line = _line_of(root, loc) if e["type"] != "missing" else _line_of(root, loc[:-1])
        item = _set_item(loc, overridden)
        where = f"--set {item}" if item else f"{source}, line {line}" if line else source
        lines.append(f"{where}: field {path}: {msg}")
    return "invalid recipe: " + "; ".join(lines)
