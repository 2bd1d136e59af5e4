"""How the CLI reports what ends a command: one line for a user's mistake or a full disk (exit 2), or Ctrl-C
(exit 130)."""

from __future__ import annotations

import errno
import sys

import typer

from potstill.errors import one_line


def interrupted(args: list[str]) -> int:
    hint = ("; `potstill run RECIPE --resume` continues the run from its last checkpoint"
            if args[:1] == ["run"] else "")
    print(f"potstill: interrupted{hint}", file=sys.stderr)
    return 130


def disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it, is the disk running out of space: an `OSError` with ENOSPC, or a library
    that reports it as its own error (safetensors: "I/O error: No space left on device (os error 28)")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_line(args: list[str]) -> int:
    hint = ("free some space, then `potstill run RECIPE --resume` continues the run from its last checkpoint (writes "
            "are atomic: no half-written checkpoint is left to resume from)" if args[:1] == ["run"]
            else "free some space and run the command again")
    return error_line(f"no space left on device; {hint}")


def error_line(message: str) -> int:
    print(one_line(f"potstill: error: {message}"), file=sys.stderr)
    return 2


def usage_line(exc: BaseException) -> str:
    """A click / typer usage error in one line: its message and the command's usage."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    ctx = getattr(exc, "ctx", None)
    usage = ctx.get_usage().strip() if ctx is not None else ""
    message = message or "no command given"
    return f"{message} ({one_line(usage)}; see --help)" if usage else message


def usage_errors() -> tuple[type[BaseException], ...]:
    """Click's usage errors: typer ≥ 0.29 raises its vendored click's, whose base is `typer.TyperException`;
    older typer raises the `click` package's `ClickException`."""
    found: list[type[BaseException]] = []
    if isinstance(getattr(typer, "TyperException", None), type):
        found.append(typer.TyperException)
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)
