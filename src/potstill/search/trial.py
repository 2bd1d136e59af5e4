"""One trial of `potstill search`: a candidate student applied to the recipe and measured.

The sampled values become `--set` overrides (the mechanism `potstill run --set` uses), in two groups: the
candidate's (student, objectives, temperature, lr: what a Pareto point's recipe keeps) and the proxy's (run name
and folder, the trial budget: what only the search uses). A trial is then a normal run through the Distiller
(`train.fit_recipe`) in `<study>/trials/trial-NNNN/`:
- proxy `train`: `budget.max_steps` / `max_seconds` of training; the quality is the space's metric of the
  trained student on the recipe's held-out data;
- proxy `diswot`: no training step; the quality is the DisWOT score of the student at initialisation
  (`potstill.eval.diswot`) on one labelled batch.
Either way teacher and student throughput are then measured interleaved on the recipe's held-out texts at its
`data.max_length` (`Task.measure`, `eval.speed.compare_throughput`); the speed-up is student / teacher. Speed
depends on the architecture, not the weights, so it is measured once per architecture (class, parameter count,
config dims) and kept in `<study>/speed.json`: layer-drop students of the same depth share one measurement,
which saves minutes per trial on a loaded machine and removes noise between equal students.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from potstill.encoder_inputs import encoder_inputs
from potstill.errors import UserError
from potstill.search.space import DIMS, SHAPED_INITS, SearchSpace
from potstill.students.build import spread_layers

# student fields that describe how it is built; the search replaces them, the rest of the section is kept
BUILD_FIELDS = ("init", "layers", "config", "path", "factory", "kwargs")


@dataclass(frozen=True)
class TeacherShape:
    """What the overrides need to know of the teacher: its layer count and head size."""

    layers: int
    hidden: int
    heads: int


@dataclass
class TrialResult:
    quality: float
    speedup: float
    params: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def teacher_shape(recipe: Any) -> TeacherShape:
    """The teacher's layer count and widths from its config (no weights loaded)."""
    from transformers import AutoConfig

    from potstill.students.loading import resolve_model_path

    if recipe.teacher.path is None:
        raise UserError("potstill search builds students from the teacher's config: the recipe needs teacher.path "
                        "(a Hugging Face model folder)")
    config = AutoConfig.from_pretrained(resolve_model_path(str(recipe.teacher.path), field="teacher.path"))
    return TeacherShape(config.num_hidden_layers, config.hidden_size, config.num_attention_heads)


def _objective_takes_temperature(name: str) -> bool:
    from potstill.losses import OBJECTIVES

    info = OBJECTIVES.get(name)
    return info is not None and "temperature" in info.defaults


def candidate_overrides(space: SearchSpace, values: dict[str, Any], base: dict[str, Any],
                        teacher: TeacherShape) -> list[str]:
    """The `--set` items that turn the recipe `base` (its raw mapping) into the candidate `values` describe."""
    student = {k: v for k, v in (base.get("student") or {}).items() if k not in BUILD_FIELDS}
    init = values["init"]
    student["init"] = init
    if init == "layers_from_teacher":
        layers = values.get("layers") or spread_layers(values["depth"], teacher.layers)
        if max(layers) >= teacher.layers:
            raise UserError(f"search space: student.layers {layers} names a layer the teacher lacks (it has "
                            f"{teacher.layers}: 0-{teacher.layers - 1})")
        student["layers"] = layers
    elif init in SHAPED_INITS:
        config = {DIMS[f]: values[f] for f in DIMS if f in values}
        if "hidden_size" in config and "num_attention_heads" not in config:
            head = teacher.hidden // teacher.heads
            if config["hidden_size"] % head:
                raise UserError(f"search space: student.width {config['hidden_size']} is not a multiple of the "
                                f"teacher's head size {head}; give widths that are, or heads")
            config["num_attention_heads"] = config["hidden_size"] // head
        student["config"] = config
    sets = ["student=null", f"student={json.dumps(student)}"]
    objectives: list[dict[str, Any]] | None = None
    if space.objectives is not None:
        index = values["objectives"]
        objectives = [{"name": o.name, "weight": values.get(f"weight.{index}.{j}", o.weight),
                       "params": dict(o.params)} for j, o in enumerate(space.objectives[index])]
    if "temperature" in values:
        objectives = objectives if objectives is not None else [dict(o) for o in base.get("objectives") or []]
        for objective in objectives:
            if _objective_takes_temperature(objective["name"]):
                objective["params"] = {**objective.get("params", {}), "temperature": values["temperature"]}
    if objectives is not None:
        sets.append(f"objectives={json.dumps(objectives)}")
    if "lr" in values:
        sets.append(f"trainer.lr={values['lr']!r}")
    return sets


def proxy_overrides(space: SearchSpace, study_dir: Path, number: int) -> list[str]:
    """The `--set` items of the trial run itself: its folder, the trial budget, throughput on."""
    sets = [f"name=trial-{number:04d}", f"output_dir={json.dumps(str(study_dir / 'trials'))}",
            "eval.throughput=false", "eval.compare_before=false", "eval.every=0", "trainer.save_every=0",
            "trainer.early_stopping=null"]
    if space.proxy == "diswot":
        return [*sets, "trainer.max_steps=0", "trainer.max_seconds=null"]
    if space.budget.max_steps is not None:
        sets.append(f"trainer.max_steps={space.budget.max_steps}")
    if space.budget.max_seconds is not None:
        sets.append(f"trainer.max_seconds={space.budget.max_seconds}")
    return sets


def share_teacher_cache(run_dir: Path) -> None:
    """Copy an earlier trial's teacher embeddings into `run_dir`: the embedding task reuses a cache whose manifest
    (teacher, data, max length, pooling) matches and recomputes one that does not, so sharing is always safe."""
    if (run_dir / "teacher_cache").exists():
        return
    for other in sorted(run_dir.parent.glob("*/teacher_cache/manifest.json")):
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(other.parent, run_dir / "teacher_cache")
        return


def _rate(row: dict[str, Any]) -> float | None:
    return next((float(v) for k, v in row.items() if k.endswith("_per_s")), None)


def architecture_key(model: Any) -> str:
    """What a model's speed depends on: its class, parameter count and config dims."""
    from potstill.eval import count_parameters

    config = getattr(model, "config", None)
    dims = {k: getattr(config, k, None) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size")} if config else {}
    return json.dumps([type(model).__name__, count_parameters(model), dims])


def measured_speed(task: Any, study_dir: Path) -> dict[str, float]:
    """{teacher, student: items/s, speedup} of the task's student, from `<study>/speed.json` when an equal
    architecture was measured before, else measured now (interleaved with the teacher) and stored."""
    from potstill.io import atomic_write_json

    path = study_dir / "speed.json"
    cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    key = architecture_key(task.student)
    if key not in cache:
        sizes = task.measure(task.student)
        t_rate, s_rate = _rate(sizes.get("teacher", {})), _rate(sizes.get("student", {}))
        cache[key] = {"teacher": t_rate, "student": s_rate,
                      "speedup": s_rate / t_rate if s_rate and t_rate else float("nan")}
        atomic_write_json(path, cache)
    return cache[key]


def _diswot(task: Any, space: SearchSpace) -> dict[str, float]:
    """The DisWOT score of the task's (untrained) student against its teacher on one labelled batch."""
    import torch

    from potstill.data.loaders import load_source
    from potstill.eval.diswot import diswot_score

    recipe = task.recipe
    data = space.diswot
    if data is None:
        probe = getattr(recipe.eval, "probe_train", None)
        if probe is None:
            raise UserError("search space: proxy diswot needs labelled texts: give diswot: {path, split, limit} "
                            "(records with text and label)")
        source: dict[str, Any] = {"path": str(probe.path), "split": probe.split, "limit": 64, "form": "gram"}
    else:
        source = data.model_dump()
    records = load_source(source["path"], split=source["split"], limit=source["limit"])
    if not records or any("text" not in r or "label" not in r for r in records):
        raise UserError(f"search space: diswot data {source['path']}: every record needs text and label")
    names = sorted({str(r["label"]) for r in records})
    enc = task.tokenizer([r["text"] for r in records], padding=True, truncation=True,
                         max_length=recipe.data.max_length, return_tensors="pt")
    batch = encoder_inputs(enc)
    labels = torch.tensor([names.index(str(r["label"])) for r in records])
    score = diswot_score(task.teacher, task.student, batch, labels, len(names), form=source["form"],
                         pooling=getattr(recipe, "pooling", "mean") if getattr(recipe, "pooling", "mean") == "cls"
                         else "mean")
    return {f"diswot_{k}": v for k, v in score.to_dict().items()}


def run_trial(recipe_path: Path, user_sets: list[str], candidate: list[str], proxy: list[str], space: SearchSpace,
              metric: str, study_dir: Path) -> TrialResult:
    """Run one trial (see the module docstring); its run folder holds the usual run outputs."""
    from potstill.config import load_recipe
    from potstill.eval import count_parameters
    from potstill.train.run import fit_recipe

    recipe = load_recipe(recipe_path, [*user_sets, *candidate, *proxy])
    start = time.perf_counter()
    share_teacher_cache(recipe.run_dir)
    task, _, summary = fit_recipe(recipe, overwrite=True)
    student = {r["model"]: r for r in summary["table"]}["student (after)"]
    metrics = {k: float(v) for k, v in student.items() if isinstance(v, (int, float))}
    if space.proxy == "diswot":
        metrics.update(_diswot(task, space))
        quality = metrics["diswot_score"]
    elif metric not in metrics:
        raise UserError(f"search space: quality.metric {metric!r} was not measured for this recipe (measured: "
                        f"{', '.join(sorted(metrics))})")
    else:
        quality = metrics[metric]
    speed = measured_speed(task, study_dir)
    metrics.update({"teacher_per_s": speed["teacher"], "student_per_s": speed["student"]})
    return TrialResult(quality=quality, speedup=speed["speedup"], params=count_parameters(task.student),
                       seconds=time.perf_counter() - start, metrics=metrics)


def candidate_recipe_text(recipe_path: Path, user_sets: list[str], candidate: list[str], name: str) -> str:
    """The full recipe of a candidate (the trial budget left out), as YAML `potstill run` accepts."""
    from potstill.config import dump_recipe, load_recipe

    recipe = load_recipe(recipe_path, [*user_sets, *candidate, f"name={name}"])
    return dump_recipe(recipe)


def base_raw(recipe_path: Path, user_sets: list[str]) -> dict[str, Any]:
    """The recipe's fields that were set, after the user's overrides (what the candidate overrides start from)."""
    from potstill.config import dump_recipe, load_recipe

    return yaml.safe_load(dump_recipe(load_recipe(recipe_path, user_sets)))
