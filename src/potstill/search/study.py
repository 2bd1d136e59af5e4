"""The Optuna study behind `potstill search`: two objectives (quality, speed-up over the teacher), stored in
SQLite under the study folder so that a search killed at any point and run again continues the same study.

AutoDistil (Xu et al., 2022) picks, per latency budget, the student with the best held-out distillation loss after
a short training; this study does the same with Optuna's multi-objective TPE sampler over the space of
`potstill.search.space` and the proxies of `potstill.search.trial`, and keeps the whole quality / speed-up Pareto
front instead of one pick per budget. Defaults: TPE seeded with the recipe's seed plus the number of trials
already in the study (a resumed study draws new candidates, not the first ones again); a trial killed while
running is marked failed on the next start; a trial whose candidate cannot be built (a user mistake in the
space, e.g. a width the teacher's heads cannot divide) is recorded as failed with its message and the search
goes on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potstill.errors import UserError
from potstill.search.space import SearchSpace, sample

STUDY_FILE = "study.db"


@dataclass
class SearchSettings:
    recipe_path: Path
    space: SearchSpace
    space_path: Path | None
    study_dir: Path
    budget_seconds: float
    trials: int | None = None
    user_sets: list[str] = field(default_factory=list)
    study_name: str | None = None


def parse_budget(text: str) -> float:
    """Seconds of `30m`, `1h`, `90s`, `1h30m` or a bare number of seconds."""
    import re

    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
        if not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
            raise UserError(f"--budget {text!r}: expected a duration such as 30m, 1h, 90s or 1h30m")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"--budget {text!r}: must be more than 0 seconds")
    return seconds


def open_study(study_dir: Path, name: str, directions: list[str], seed: int) -> Any:
    """The study `name` in `<study_dir>/study.db` (created, or loaded when it exists); trials a killed search left
    running are marked failed. The sampler's seed moves on with the trials already done."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir / STUDY_FILE}")
    study = optuna.create_study(study_name=name, storage=storage, directions=list(directions),  # type: ignore[arg-type]
                                load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        stored = [d.name.lower() for d in study.directions]
        raise UserError(f"{study_dir / STUDY_FILE}: study {name!r} optimises {stored}, this search {directions}; "
                        f"use another --study-dir or --study-name")
    study_id = storage.get_study_id_from_name(name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "error", "interrupted (the search was killed during it)")
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), multivariate=False)
    return study


def _complete(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _best_line(study: Any, maximize: bool) -> str:
    done = [t for t in _complete(study) if all(math.isfinite(v) for v in t.values)]
    if not done:
        return "best so far: none yet"
    best = (max if maximize else min)(done, key=lambda t: t.values[0])
    return (f"best so far: trial {best.number} quality {best.values[0]:.4f} at {best.values[1]:.2f}× "
            f"({best.user_attrs.get('label', '')})")


def run_search(settings: SearchSettings) -> dict[str, Any]:
    """Run trials until the budget or `trials` (finished trials in the study) is reached; write the outputs
    (`potstill.search.pareto.write_outputs`) after every trial. Returns the search.json content."""
    from optuna.trial import TrialState

    from potstill.config import load_recipe
    from potstill.search.pareto import write_outputs
    from potstill.search.trial import base_raw, candidate_overrides, proxy_overrides, run_trial, teacher_shape
    from potstill.tasks import task_class
    from potstill.ui import console

    space, study_dir = settings.space, settings.study_dir
    recipe = load_recipe(settings.recipe_path, settings.user_sets)
    check_space(space, recipe, str(settings.space_path or "space"))
    quality = space.quality_for(recipe.task)
    metric = "diswot_score" if space.proxy == "diswot" else quality.metric
    direction = "maximize" if space.proxy == "diswot" else quality.direction
    shape = teacher_shape(recipe)
    base = base_raw(settings.recipe_path, settings.user_sets)
    name = settings.study_name or f"{recipe.name}-search"
    study = open_study(study_dir, name, [direction, "maximize"], recipe.seed)
    meta = {"study": name, "recipe": str(settings.recipe_path), "space": str(settings.space_path or ""),
            "task": recipe.task, "teacher": str(recipe.teacher.path), "proxy": space.proxy, "metric": metric,
            "direction": direction, "budget_seconds": settings.budget_seconds, "user_sets": settings.user_sets,
            "teacher_layers": shape.layers, "valid_metrics": list(task_class(recipe.task).metric_names)}
    if not study.trials:
        baseline = recipe_values(space, recipe)
        if baseline:
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
    start = time.perf_counter()
    supernet = None
    if space.proxy == "supernet":
        from potstill.search.supernet_proxy import SupernetProxy, SupernetUnfinished, all_values, supernet_overrides

        if not study.trials:  # AutoDistil scores the whole space: every subnet is queued, in a fixed order
            for values in all_values(space, elastic_space_of(space, recipe)):
                study.enqueue_trial(values)
        try:
            supernet = SupernetProxy(settings.recipe_path, settings.user_sets, space, study_dir,
                                     deadline=start + settings.budget_seconds)
        except SupernetUnfinished as unfinished:
            console.print(f"search: {unfinished}; run the same command again to continue it", highlight=False,
                          soft_wrap=True)
            return write_outputs(study, settings, meta, final=True)
        meta["supernet"] = supernet.describe()
    durations: list[float] = []
    while True:
        finished = len([t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)])
        left = settings.budget_seconds - (time.perf_counter() - start)
        if settings.trials is not None and len(_complete(study)) >= settings.trials:
            break
        if supernet is not None and supernet.done(study):
            console.print("search: every subnet of the space is scored", highlight=False)
            break
        if left <= 0 or (durations and left < sum(durations) / len(durations) / 2):
            console.print(f"search: budget spent ({left:.0f} s left, a trial takes ~"
                          f"{(sum(durations) / len(durations)) if durations else 0:.0f} s)", highlight=False)
            break
        trial = study.ask()
        values = sample(space, trial)
        label = describe(values) + (" (the recipe's own student)" if trial.user_attrs.get("baseline") else "")
        trial.set_user_attr("label", label)
        target = f"/{settings.trials}" if settings.trials is not None else ""
        console.rule(f"[bold]search {name}: trial {trial.number}")
        console.print(f"{len(_complete(study))}{target} trials done ({finished} finished in the study) · "
                      f"{_best_line(study, direction == 'maximize')} · {_clock(left)} left", highlight=False,
                      soft_wrap=True)
        console.print(f"candidate: {label}", highlight=False, soft_wrap=True)
        tick = time.perf_counter()
        try:
            if supernet is not None:
                candidate = supernet_overrides(values, base, supernet.space, study_dir)
                trial.set_user_attr("overrides", candidate)
                result = supernet.run_trial(values, candidate)
            else:
                candidate = candidate_overrides(space, values, base, shape)
                trial.set_user_attr("overrides", candidate)
                result = run_trial(settings.recipe_path, settings.user_sets, candidate,
                                   proxy_overrides(space, study_dir, trial.number), space, metric, study_dir)
        except UserError as exc:
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=TrialState.FAIL)
            console.print(f"trial {trial.number} failed: {exc}", highlight=False, soft_wrap=True)
        else:
            for key, value in {"params": result.params, "seconds": round(result.seconds, 1),
                               "metrics": result.metrics}.items():
                trial.set_user_attr(key, value)
            study.tell(trial, [result.quality, result.speedup])
            console.print(f"trial {trial.number}: {metric} {result.quality:.4f}, {result.speedup:.2f}× the "
                          f"teacher, {result.params / 1e6:.2f} M parameters, {result.seconds:.0f} s", highlight=False)
        durations.append(time.perf_counter() - tick)
        write_outputs(study, settings, meta)
    return write_outputs(study, settings, meta, final=True)


def recipe_values(space: SearchSpace, recipe: Any) -> dict[str, Any]:
    """The space's values of the recipe's own student (layer-drop layers, lr, temperature), enqueued as a new
    study's first trial so that the front shows whether any candidate beats the recipe as it is; empty when the
    recipe's student is not in the space."""
    import json

    from potstill.search.space import Range

    student, values = recipe.student, {}
    if student.init != "layers_from_teacher" or "layers_from_teacher" not in space.student.init:
        return {}
    values["init"] = "layers_from_teacher"
    if space.student.layers is not None:
        if list(student.layers) not in space.student.layers:
            return {}
        values["layers"] = json.dumps(list(student.layers))
    elif space.student.depth is not None:
        return {}
    lr = recipe.trainer.lr
    if isinstance(space.lr, Range) and space.lr.low <= lr <= space.lr.high or \
            isinstance(space.lr, list) and lr in space.lr:
        values["lr"] = lr
    return values


def describe(values: dict[str, Any]) -> str:
    """A short label of a candidate: `layers_from_teacher [0, 3] lr 5e-4`."""
    parts = [values["init"]]
    if "layers" in values:
        parts.append(str(values["layers"]))
    parts += [f"{k} {values[k]}" for k in ("depth", "width", "heads", "ffn") if k in values]
    if "objectives" in values:
        parts.append(f"objectives #{values['objectives']}")
    parts += [f"{k} {v:.3g}" for k, v in values.items() if k.startswith("weight.")]
    parts += [f"{k} {values[k]:.3g}" for k in ("temperature", "lr") if k in values]
    return " ".join(parts)


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def elastic_space_of(space: SearchSpace, recipe: Any) -> Any:
    from potstill.search.supernet_proxy import elastic_space, teacher_config

    return elastic_space(space, teacher_config(recipe))


def check_space(space: SearchSpace, recipe: Any, source: str = "space") -> None:
    """Refuse what the recipe's task cannot express, before any trial runs."""
    from potstill.search.space import SEARCH_TASKS
    from potstill.tasks import task_class

    if space.proxy == "supernet":
        from potstill.search.supernet_proxy import check_supernet_space

        check_supernet_space(space, recipe, source)

    if recipe.task not in SEARCH_TASKS:
        raise UserError(f"potstill search: the {recipe.task} task is not searchable yet; supported tasks: "
                        f"{', '.join(SEARCH_TASKS)}")
    if "static" in space.student.init and recipe.task != "embedding":
        raise UserError("search space: field student.init: static students exist for the embedding task only")
    if space.quality is not None and space.proxy == "train":
        valid = task_class(recipe.task).metric_names
        if space.quality.metric not in valid:
            from potstill.errors import did_you_mean

            raise UserError(f"search space: field quality.metric: the {recipe.task} task has no metric "
                            f"{space.quality.metric!r}{did_you_mean(space.quality.metric, valid)}; valid: "
                            f"{', '.join(valid)}")
    if space.proxy == "diswot" and space.diswot is None and getattr(recipe.eval, "probe_train", None) is None:
        raise UserError("search space: proxy diswot needs labelled texts: give diswot: {path, split, limit} "
                        "(records with text and label), or eval.probe_train in the recipe")
    if space.objectives is not None:
        from potstill.errors import did_you_mean
        from potstill.losses import OBJECTIVES

        for i, choice in enumerate(space.objectives):
            for j, objective in enumerate(choice):
                if objective.name not in OBJECTIVES:
                    raise UserError(f"search space: field objectives.{i}.{j}.name: unknown objective "
                                    f"{objective.name!r}{did_you_mean(objective.name, list(OBJECTIVES))}")
