"""Errors that are the user's mistake, not a bug.

The CLI prints a `UserError` as one paragraph and exits with code 2, without a traceback. Everything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: recipe, data file, CLI argument, missing asset.

    The message must name the file / line / field at fault and say what was expected.
    """


def one_line(text: str, limit: int | None = None) -> str:
    """`text`'s non-blank lines joined by single spaces (a message fit for one line), cut at `limit` characters."""
    joined = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return joined if limit is None else joined[:limit]


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def int_at_least(name: str, value: object, low: int) -> int:
    """`value` as an int when it is an integer (Python or NumPy, not a bool) ≥ `low`; else a UserError
    "`name` must be an integer >= `low`, got …"."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)
