"""Console output and rich progress bars (quiet when output is not a terminal: CI logs, subprocesses).

The lowest-level UI module: any part (tasks, teachers, the loop, the CLI) may import it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
"""Progress, warnings and logs: stderr, so that a command's results on stdout can be piped."""

RESULT_WIDTH = 160


def result_console() -> Console:
    """A console on stdout for a command's results (tables, summaries), so `| grep` finds them; when stdout is not a
    terminal (a pipe, a log file), RESULT_WIDTH columns instead of rich's 80, so that table cells are not cut."""
    out = Console()
    if not out.is_terminal:
        out.width = RESULT_WIDTH
    return out


def make_progress(*extra: TextColumn) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    disable=not console.is_terminal, transient=False)


@contextlib.contextmanager
def task_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar for one piece of work; yields `advance(n)`."""
    if not console.is_terminal:
        console.print(f"{description}: {total} items")
    with make_progress() as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@contextlib.contextmanager
def phase(description: str, *, enabled: bool = True) -> Iterator[None]:
    """A stretch of work without countable items (setting up models, an evaluation, a conversion), so that no part
    of a command is silent: one line "description…" when it starts and one with the seconds it took. Plain lines,
    not a spinner, so that progress bars inside it still work. `enabled=False` (other processes) shows nothing."""
    if not enabled:
        yield
        return
    start = time.perf_counter()
    console.print(f"{description}…", highlight=False, soft_wrap=True)
    yield
    console.print(f"{description}: done in {time.perf_counter() - start:.1f} s", highlight=False, soft_wrap=True)
