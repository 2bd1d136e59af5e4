"""The `potstill search` and `potstill advise` commands (registered in potstill.cli; heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def search(recipe: Annotated[Path, typer.Argument(help="embedding or causal_lm recipe YAML, or a shipped recipe's "
                                                  "name")],
           space: Annotated[Path | None, typer.Option("--space", help="search space YAML (see docs/search.md)")]
           = None,
           budget: Annotated[str, typer.Option("--budget", help="wall-clock budget of this invocation: 30m, 1h, "
                                               "90s")] = "30m",
           trials: Annotated[int | None, typer.Option("--trials", min=1, help="stop when the study holds N "
                                                      "finished trials")] = None,
           study_dir: Annotated[Path | None, typer.Option("--study-dir", help="study folder (default "
                                                          "<output_dir>/<name>-search); rerun to continue")] = None,
           study_name: Annotated[str | None, typer.Option("--study-name", help="Optuna study name (default "
                                                          "<name>-search)")] = None,
           set_: Annotated[list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                          help="override a recipe field for every trial")] = None,
           teachers: Annotated[list[str] | None, typer.Option("--teachers", metavar="A,B,C", help="instead of a "
                                                              "space: candidate teachers (folders, builtin:<name>, "
                                                              "hub ids), comma-separated or repeated; "
                                                              "DistillNearest picks one, DistillWeighted "
                                                              "weights all")] = None,
           metric: Annotated[str, typer.Option("--metric", help="teacher score with --teachers: probe or "
                                               "h_score")] = "probe",
           temperature: Annotated[float, typer.Option("--temperature", help="DistillWeighted's softmax temperature "
                                                      "over the scores (--teachers)")] = 0.1,
           ) -> None:
    """Search students for quality vs speed-up (Optuna, resumable): Pareto table, plot and recipes.

    The space (docs/search.md) covers depth, width, heads, FFN, init, objectives and weights, temperature, lr.
    With --teachers instead: score candidate teachers on the recipe's labelled texts (eval.probe_train) and
    write the recipe with the best one (DistillNearest) and the recipe distilling all, weighted (DistillWeighted).
    """
    if teachers:
        if space is not None:
            raise typer.BadParameter("give --space (a student search) or --teachers (a teacher choice), not both")
        _choose_teachers(recipe, [t.strip() for item in teachers for t in item.split(",") if t.strip()],
                         study_dir, metric, temperature, set_ or [])
        return
    if space is None:
        raise typer.BadParameter("give --space SPACE.yaml (a student search) or --teachers A,B,C (a teacher "
                                 "choice)")
    from transformers.utils import logging

    from potstill.config import distillation_recipe, load_recipe
    from potstill.recipes import resolve_recipe
    from potstill.report import rich_table
    from potstill.search.pareto import front_rows
    from potstill.search.space import load_space
    from potstill.search.study import SearchSettings, parse_budget, run_search
    from potstill.ui import result_console

    logging.disable_progress_bar()
    path = resolve_recipe(recipe)
    parsed = load_space(space)
    seconds = parse_budget(budget)
    cfg = distillation_recipe(load_recipe(path, set_ or []), "potstill search", where=str(path))
    folder = study_dir or Path(cfg.output_dir) / f"{cfg.name}-search"
    result = run_search(SearchSettings(path, parsed, space, folder, seconds, trials, set_ or [], study_name))
    results = result_console()
    results.print(rich_table(f"Pareto front ({result['metric']} vs speed-up), {result['finished']} trials",
                             front_rows(result)))
    results.print(f"search.json, pareto.md, pareto.png and the front's recipes: {folder}", highlight=False)


def _choose_teachers(recipe: Path, teachers: list[str], out_dir: Path | None, metric: str, temperature: float,
                     sets: list[str]) -> None:
    from potstill.config import distillation_recipe, load_recipe
    from potstill.recipes import resolve_recipe
    from potstill.report import rich_table
    from potstill.search.teacher_choice import TeacherChoiceSettings, choose_teacher
    from potstill.ui import console, result_console

    path = resolve_recipe(recipe)
    cfg = distillation_recipe(load_recipe(path, sets), "potstill search --teachers", where=str(path))
    folder = out_dir or Path(cfg.output_dir) / f"{cfg.name}-teachers"
    result = choose_teacher(TeacherChoiceSettings(path, teachers, folder, metric, temperature, user_sets=sets),
                            progress=lambda row: console.print(f"{row['teacher']}: {metric} {row['score']:.4f}",
                                                               highlight=False))
    rows = [{"teacher": r["teacher"], metric: r["score"], "weight": r["weight"],
             "pick": "nearest" if r["teacher"] == result["nearest"] else ""} for r in result["teachers"]]
    results = result_console()
    results.print(rich_table(f"teachers scored on {result['labelled_texts']} labelled texts (eval.probe_train)",
                             rows))
    results.print(f"potstill run {result['nearest_recipe']}    # DistillNearest; teachers.json in {folder}\n"
                  f"potstill run {result['weighted_recipe']}   # DistillWeighted", highlight=False)


def advise(teacher: Annotated[str, typer.Option("--teacher", help="teacher model folder or builtin:minilm / "
                                                "builtin:smollm2")],
           student_params: Annotated[str, typer.Option("--student-params", help="student size: 15.6M, 1.2B or a "
                                                       "number")],
           logs: Annotated[list[Path] | None, typer.Option("--logs", help="search.json files or folders holding "
                                                           "them (default: runs/)")] = None,
           ) -> None:
    """Suggest a teacher size and a student init for a student of N parameters.

    From the capacity-gap law (teacher ≈ 2.5 × student; MiniMA) and your search logs.
    """
    from potstill.search.advise import advise_text, parse_count

    typer.echo(advise_text(teacher, parse_count(student_params), logs if logs is not None else [Path("runs")]))
