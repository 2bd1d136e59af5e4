"""The `potstill` command line: run, demo, eval, cache, objectives.

A user's mistake (bad recipe, missing file, malformed data line) prints one paragraph and exits with
code 2, without a traceback. A run that diverges (NaN/inf loss) exits with code 3.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from potstill.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="potstill: distil a large teacher model into a small, fast student.")

SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                     help="override a recipe field, e.g. trainer.max_steps=200")]


def _console():
    from potstill.train.progress import console

    return console


def _quiet_transformers() -> None:
    """transformers' per-load tqdm bars drown the run's own progress; potstill shows its own."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def packaged_recipe(name: str) -> Path:
    """Path of a recipe shipped with potstill (`demo`, `digits`)."""
    path = Path(str(resources.files("potstill") / "recipes" / f"{name}.yaml"))
    if not path.is_file():
        raise UserError(f"no packaged recipe named {name!r}")
    return path


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
        set_: SetOption = None,
        resume: Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an earlier run of the same name")] = False,
        ) -> None:
    """Run the distillation a recipe describes; output goes to <output_dir>/<name>/."""
    from potstill.config import load_recipe
    from potstill.train import run_recipe
    from potstill.train.launch import relaunch_as_cpu_process_group

    cfg = load_recipe(recipe, set_ or [])
    relaunch_as_cpu_process_group()
    _quiet_transformers()
    summary = run_recipe(cfg, resume=resume, overwrite=overwrite)
    _print_summary(summary, cfg.run_dir)


@app.command()
def demo(set_: SetOption = None) -> None:
    """Distil all-MiniLM-L6-v2 into a 2-layer student on BBC News, offline, and report before/after."""
    from potstill.demo import run_demo

    _quiet_transformers()
    run_demo(set_ or [])


@app.command("eval")
def eval_(run_dir: Annotated[Path, typer.Argument(help="a finished run folder (holds recipe.yaml and student/)")],
          ) -> None:
    """Score a run's saved student against its teacher on the recipe's held-out data."""
    from potstill.evaluate import evaluate_run
    from potstill.report import rich_table

    _quiet_transformers()
    rows = evaluate_run(run_dir)
    _console().print(rich_table(f"evaluation of {run_dir}", rows))


@app.command()
def cache(recipe: Annotated[Path, typer.Argument(help="causal_lm recipe YAML file")],
          set_: SetOption = None,
          k: Annotated[int, typer.Option("--k", min=1, help="token ids kept per position")] = 64,
          temperature: Annotated[float, typer.Option(help="teacher logits are divided by this (the run's "
                                                     "objectives must use the same temperature)")] = 1.0,
          out: Annotated[Path | None, typer.Option(help="cache folder (default: the recipe's teacher.cache)")] = None,
          batch_size: Annotated[int, typer.Option(min=1, help="sequences per teacher forward")] = 8,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing cache")] = False,
          ) -> None:
    """Run a causal_lm recipe's teacher once over its training data; store the top-k log-probs per token."""
    from potstill.config import load_recipe
    from potstill.tasks import build_task
    from potstill.teachers.capture import capture_teacher_topk
    from potstill.train.progress import make_progress

    cfg = load_recipe(recipe, set_ or [])
    if cfg.task != "causal_lm":
        raise UserError(f"{recipe}: field task: `potstill cache` stores a causal LM's token log-probs; this recipe's "
                        f"task is {cfg.task}")
    target = out or (Path(cfg.teacher.cache) if cfg.teacher.cache else None)
    if target is None:
        raise UserError(f"{recipe}: say where the cache goes: --out DIR, or teacher.cache in the recipe")
    _quiet_transformers()
    if cfg.trainer.num_threads:
        import torch

        torch.set_num_threads(cfg.trainer.num_threads)
    cfg.teacher.cache = str(target)
    task = build_task(cfg, run_dir=cfg.run_dir)
    task.setup(capture=True)
    progress = make_progress()
    with progress:
        bar = progress.add_task("teacher top-k", total=len(task.train_records))
        manifest = capture_teacher_topk(task, target, k=k, temperature=temperature, batch_size=batch_size,
                                        overwrite=overwrite,
                                        on_batch=lambda done, total: progress.update(bar, completed=done))
    _console().print(f"cache written to {target}: {manifest['num_records']:,} sequences, "
                     f"{manifest['num_tokens']:,} tokens, k={k}, T={temperature:g}, "
                     f"{manifest['bytes_per_token']} bytes/token, {manifest['seconds']:.1f} s")


@app.command()
def objectives() -> None:
    """List every objective: formula, defaults and the paper it comes from."""
    from potstill.losses import OBJECTIVES

    console = _console()
    for info in OBJECTIVES.values():
        defaults = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        console.print(f"[bold]{info.name}[/bold]  [dim]({info.kind})[/dim]", highlight=False)
        console.print(f"  {info.formula}", highlight=False, markup=False)
        console.print(f"  defaults: {defaults}", highlight=False, markup=False)
        console.print(f"  paper: {info.paper}", highlight=False, markup=False)
        if info.notes:
            console.print(f"  note: {info.notes}", highlight=False, markup=False)
        console.print()


def _print_summary(summary: dict, run_dir: Path) -> None:
    if not summary:
        return
    from potstill.report import rich_table

    _console().print(rich_table("teacher / student before / student after", summary["table"]))
    _console().print(f"student saved to {summary['student_dir']}; report: {run_dir / 'report.html'}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point; maps user mistakes to exit code 2 and divergence to 3."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from potstill.train import TrainingDiverged

    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        print(f"potstill: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"potstill: training diverged: {exc}", file=sys.stderr)
        return 3
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
