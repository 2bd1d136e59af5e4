"""The `potstill search` and `potstill advise` commands (registered in potstill.cli; heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def search(recipe: Annotated[Path, typer.Argument(help="embedding or causal_lm recipe YAML, or a shipped recipe's "
                                                  "name")],
           space: Annotated[Path, typer.Option("--space", help="search space YAML (see docs/search.md)")],
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
           ) -> None:
    """Search students for quality vs speed-up (Optuna, resumable): Pareto table, plot and recipes.

    The space (docs/search.md) covers depth, width, heads, FFN, init, objectives and weights, temperature, lr.
    """
    from transformers.utils import logging

    from potstill.config import load_recipe
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
    cfg = load_recipe(path, set_ or [])
    folder = study_dir or Path(cfg.output_dir) / f"{cfg.name}-search"
    result = run_search(SearchSettings(path, parsed, space, folder, seconds, trials, set_ or [], study_name))
    results = result_console()
    results.print(rich_table(f"Pareto front ({result['metric']} vs speed-up), {result['finished']} trials",
                             front_rows(result)))
    results.print(f"search.json, pareto.md, pareto.png and the front's recipes: {folder}", highlight=False)


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
