"""From a validated recipe to a finished run folder."""

from __future__ import annotations

from typing import Any

from potstill.config import AnyRecipe, ContinualRecipe, Recipe, dump_recipe
from potstill.errors import UserError
from potstill.losses import get_objective
from potstill.losses.catalogue import INTERNAL_KINDS
from potstill.tasks import build_task, task_class
from potstill.train.distiller import Distiller
from potstill.train.objective import Objective
from potstill.train.run_folder import check_output_dir


def with_pruned_kd_weights(recipe: Recipe) -> Recipe:
    """The recipe with `data.prune.tie_kd_weight` applied: every objective weight × α(f) (normalised so the
    objectives' weights sum to α) and trainer.hard_label_weight = 1 − α, α = kd_weight_for_fraction(f)."""
    prune = recipe.data.prune
    if prune is None or not prune.tie_kd_weight:
        return recipe
    from potstill.data.pruning import kd_weight_for_fraction

    alpha = kd_weight_for_fraction(prune.fraction)
    tied = recipe.model_copy(deep=True)
    total = sum(o.weight for o in tied.objectives) or 1.0
    for objective in tied.objectives:
        objective.weight = alpha * objective.weight / total
    tied.trainer.hard_label_weight = 1.0 - alpha
    return tied


def build_objectives(recipe: Recipe, task: Any = None) -> list[Objective]:
    """Objectives of the recipe, checked against what the task's signals can feed; `task` (a `Task`) points
    each loss at its part of the task's signal (`Task.adapt_objective`)."""
    import inspect

    kind = task_class(recipe.task).signal_kind
    objectives = []
    for i, cfg in enumerate(recipe.objectives):
        info = get_objective(cfg.name)
        if info.kind in INTERNAL_KINDS:
            if not task_class(recipe.task).captures_internals:
                raise UserError(f"field objectives.{i}.name: {cfg.name} reads hidden states or attention, which "
                                f"the {recipe.task} task does not capture; see `potstill objectives`")
            if recipe.teacher.cache is not None:
                raise UserError(f"field objectives.{i}.name: {cfg.name} reads the teacher's internals, which a "
                                f"teacher.cache does not hold; use a live teacher")
        elif kind == "pixels":
            raise UserError(f"field objectives.{i}.name: {cfg.name!r} compares {info.kind}; the vision task "
                            f"distils features: use dmae_align or another hidden-state objective")
        elif info.kind != kind and info.kind not in task_class(recipe.task).extra_objective_kinds:
            raise UserError(f"field objectives.{i}.name: {cfg.name!r} compares {info.kind}, but the {recipe.task} "
                            f"task gives {kind}; see `potstill objectives`")
        signature = list(inspect.signature(info.fn).parameters)
        data_args = {"mask", "reduction", "labels"}
        valid = sorted(set(signature if info.stateful else signature[2:]) - data_args)
        for key in cfg.params:
            if key not in valid:
                from potstill.errors import did_you_mean

                raise UserError(f"field objectives.{i}.params.{key}: {cfg.name} has no parameter {key!r}"
                                f"{did_you_mean(key, valid)}; valid: {', '.join(valid)}")
        fn = task.adapt_objective(cfg.name, info.fn) if task is not None else info.fn
        if info.kind == "embedding" and recipe.task == "embedding":
            # a student narrower than the teacher compares its vectors through a learned projection
            from potstill.losses.intermediate import ProjectedLoss

            objectives.append(Objective(name=cfg.name, fn=ProjectedLoss(info.fn, **cfg.params), weight=cfg.weight))
            continue
        if info.stateful:
            try:
                fn = fn(**cfg.params)  # the class Task.adapt_objective returned
            except (TypeError, ValueError) as err:
                raise UserError(f"field objectives.{i}.params: {cfg.name}: {err}") from None
        objectives.append(Objective(name=cfg.name, fn=fn, weight=cfg.weight,
                                    params={} if info.stateful else dict(cfg.params)))
    return objectives


def check_factory_kwargs(recipe: Recipe) -> None:
    """teacher.kwargs / student.kwargs against their factory's signature (imports the module, builds nothing)."""
    from potstill.teachers.live import check_kwargs, load_callable

    for section in (recipe.teacher, recipe.student):
        name = "teacher" if section is recipe.teacher else "student"
        if section.factory is not None and (name == "teacher" or recipe.student.init == "factory"):
            fn = load_callable(section.factory, field=f"{name}.factory")
            check_kwargs(fn, section.kwargs, field=f"{name}.kwargs", spec=section.factory)


def check_early_stopping_metric(recipe: Recipe) -> None:
    """trainer.early_stopping.metric must be one the task's evaluation gives (`Task.metric_names`)."""
    early = recipe.trainer.early_stopping
    if early is None:
        return
    valid = task_class(recipe.task).metric_names
    if early.metric not in valid:
        from potstill.errors import did_you_mean

        raise UserError(f"field trainer.early_stopping.metric: the {recipe.task} task has no metric "
                        f"{early.metric!r}{did_you_mean(early.metric, valid)}; valid: {', '.join(valid)}")


def fit_recipe(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
               accelerator: Any = None) -> tuple[Any, Distiller, dict[str, Any]]:
    """Build the task and the loop of a recipe (with `data.prune`'s weight tie applied) and train: (task with
    its trained student, distiller, summary). `run_recipe` adds the report; loops over runs (PGKD) use this."""
    check_output_dir(recipe)
    check_factory_kwargs(recipe)
    check_early_stopping_metric(recipe)
    recipe = with_pruned_kd_weights(recipe)
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.check_records()
    distiller = Distiller(task, build_objectives(recipe, task), recipe.trainer, run_dir=recipe.run_dir,
                          seed=recipe.seed,
                          eval_config=recipe.eval, recipe_text=dump_recipe(recipe), accelerator=accelerator)
    return task, distiller, distiller.fit(resume=resume, overwrite=overwrite)


def run_recipe(recipe: AnyRecipe, *, resume: bool = False, overwrite: bool = False,
               accelerator: Any = None) -> dict[str, Any]:
    """Train the student a recipe describes; returns the run summary (also in `<run>/summary.json`).

    `resume` continues from the run folder's newest usable checkpoint; `overwrite` replaces an earlier run
    there. The run folder's lock (`<run>/.lock`) is held until the report is written. A `task: continual`
    recipe goes to its stream driver (`potstill.train.continual_run`).
    """
    if isinstance(recipe, ContinualRecipe):
        from potstill.train.continual_run import run_continual

        return run_continual(recipe, resume=resume, overwrite=overwrite)
    from potstill.train.precision import new_accelerator
    from potstill.train.run_folder import run_lock

    check_output_dir(recipe)  # a file or read-only output_dir: one line naming the field, before the lock
    accelerator = accelerator or new_accelerator(recipe.trainer.report_to, recipe.run_dir)
    with run_lock(recipe.run_dir, accelerator):
        finished = finished_summary(recipe) if resume else None
        if finished is not None:
            if accelerator.is_main_process:
                from potstill.train import checkpoint as ckpt
                from potstill.ui import console

                ckpt.prune(recipe.run_dir / "checkpoints", recipe.trainer.keep_last)  # keep_last holds on every start

                console.print(f"{recipe.run_dir} is already complete ({finished['steps']} steps, same recipe): "
                              f"nothing to resume. To train it further, start a new run from its student: "
                              f"--set student.init=pretrained --set student.path={recipe.run_dir / 'student'} "
                              f"--set name=<new name>", highlight=False, soft_wrap=True)
            return finished
        return _train_and_report(recipe, resume=resume, overwrite=overwrite, accelerator=accelerator)


def finished_summary(recipe: Recipe) -> dict[str, Any] | None:
    """The stored summary when `recipe.run_dir` holds a complete run of this same recipe (its final checkpoint
    and saved student present): what `--resume` would only redo. None otherwise."""
    from potstill.train import checkpoint as ckpt
    from potstill.train.run_folder import stored_complete_summary

    summary = stored_complete_summary(recipe.run_dir, dump_recipe(with_pruned_kd_weights(recipe)))
    done = ckpt.list_checkpoints(recipe.run_dir / "checkpoints")
    if summary is None or not done or done[-1][0] != summary["steps"]:
        return None
    return summary


def _train_and_report(recipe: Recipe, *, resume: bool, overwrite: bool, accelerator: Any) -> dict[str, Any]:
    task, distiller, summary = fit_recipe(recipe, resume=resume, overwrite=overwrite, accelerator=accelerator)
    recipe = task.recipe  # with data.prune's weight tie applied: the weights that were trained with
    if distiller.is_main:
        from potstill.report.model_card import write_model_card
        from potstill.report.run_report import write_run_report

        facts = card_facts(recipe, summary)
        if summary.get("student_dir"):
            write_model_card(summary["student_dir"], facts, summary["table"])

        terms = ", ".join(f"{o.weight:g}·{o.name}({', '.join(f'{k}={v}' for k, v in o.params.items())})"
                          for o in recipe.objectives)
        if recipe.trainer.hard_label_weight:
            terms += f" + {recipe.trainer.hard_label_weight:g}·hard-label CE"
        write_run_report(recipe.run_dir, facts, summary, hyperparameters(recipe),
                         notes=[f"task: {recipe.task}", f"objectives: {terms}"])
    return summary


def hyperparameters(recipe: Recipe) -> dict[str, Any]:
    """What the report lists as the run's hyper-parameters: seed, trainer, objectives, data and eval settings."""
    data = recipe.data.model_dump(mode="json", exclude={"train", "eval"})
    return {"seed": recipe.seed, "trainer": recipe.trainer.model_dump(mode="json"),
            "objectives": {f"{i}.{o.name}": {"weight": o.weight, **o.params} for i, o in enumerate(recipe.objectives)},
            "data": {k: v for k, v in data.items() if not isinstance(v, (dict, list))},
            "eval": recipe.eval.model_dump(mode="json")}


def card_facts(recipe: Recipe, summary: dict[str, Any]) -> Any:
    """What the student's model card (`report.model_card`) says about this run."""
    from potstill.report.model_card import CardFacts

    s, t = recipe.student, recipe.trainer
    student = {"layers_from_teacher": f"the teacher's layers {s.layers} copied" if s.layers else "teacher layers",
               "from_config": f"built from a config ({s.config})" if s.config else "built from a config",
               "pretrained": f"started from `{s.path}`", "factory": f"`{s.factory}`({s.kwargs})",
               "static": "a static (model2vec-style) embedding table"}.get(s.init, s.init)
    teacher = recipe.teacher.path or recipe.teacher.factory or "teacher scores from a file"
    objectives = ", ".join(f"{o.weight:g}·{o.name}" for o in recipe.objectives) or "none (hard labels only)"
    steps = summary.get("steps")
    training = (f"{steps} optimizer steps" if steps is not None else f"{t.epochs:g} epochs") + \
        f", batch {t.batch_size}×{t.grad_accum}, lr {t.lr:g} ({t.schedule}), seed {recipe.seed}"
    return CardFacts(name=recipe.name, task=recipe.task, teacher=str(teacher), student=student,
                     data=recipe.data.train.describe(), objectives=objectives, training=training,
                     recipe_yaml=dump_recipe(recipe))
