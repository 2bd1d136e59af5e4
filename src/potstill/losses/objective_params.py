"""The parameters a recipe may give an objective (its `params:`): one rule per keyword argument of the loss (or of
a stateful objective's constructor), its type from the annotation and its bounds by name, and `check_params`, which
the recipe schema calls before any model loads."""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from dataclasses import dataclass

from .catalogue import _DATA_ARGS, OBJECTIVES


@dataclass(frozen=True)
class ParamRule:
    """What one objective parameter accepts: `kind` ("number", "integer", "bool", "text" or "any"), None too when
    `optional`, and for numbers the bound `low` (exclusive when `low_open`) .. `high` (inclusive)."""

    kind: str
    optional: bool = False
    low: float | None = None
    low_open: bool = False
    high: float | None = None

    def expected(self) -> str:
        words = {"number": "a number", "integer": "a whole number", "bool": "true or false", "text": "a string"}
        text = words.get(self.kind, "a value")
        if self.low is not None:
            text += f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            text += f" {'and' if self.low is not None else ''} <= {self.high:g}".replace("  ", " ")
        return text + (" (or null)" if self.optional else "")

    def problem(self, value: object) -> str | None:
        """Why `value` does not fit, or None."""
        if value is None:
            return None if self.optional else f"expected {self.expected()}, got null"
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "text":
            ok = isinstance(value, str)
        elif self.kind in ("number", "integer"):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if ok and self.kind == "integer":
                ok = isinstance(value, numbers.Integral)
            number = float(value) if ok else 0.0  # type: ignore[arg-type]
            if ok and self.low is not None:
                ok = number > self.low if self.low_open else number >= self.low
            if ok and self.high is not None:
                ok = number <= self.high
        else:
            ok = True
        return None if ok else f"expected {self.expected()}, got {value!r}"


# Bounds by parameter name (the same meaning in every loss that has the name); types come from the annotations.
_BOUNDS: dict[str, dict] = {
    "temperature": {"low": 0, "low_open": True},
    "teacher_temperature": {"low": 0, "low_open": True},
    "epsilon": {"low": 0, "low_open": True},
    "eps": {"low": 0, "low_open": True},
    "chunk_size": {"low": 1},
    "block_size": {"low": 1},
    "iterations": {"low": 1},
    "relation_heads": {"low": 1},
    "warmup_steps": {"low": 0},
    "alpha": {"low": 0, "high": 1},
    "beta": {"low": 0, "high": 1},
    "matched_weight": {"low": 0, "high": 1},
    "t_start": {"low": 0, "high": 1},
    "t_end": {"low": 0, "high": 1},
}
_KINDS = {"float": "number", "int": "integer", "bool": "bool", "str": "text"}
_NOT_PARAMS = (*_DATA_ARGS, "reduction", "self")


def param_rules(name: str) -> dict[str, ParamRule]:
    """The parameters a recipe may give objective `name` (its `params:`), each with its rule."""
    info = OBJECTIVES[name]
    signature = list(inspect.signature(info.fn).parameters.values())
    rules = {}
    for p in signature:
        if p.name in _NOT_PARAMS or not (info.stateful or p.kind is inspect.Parameter.KEYWORD_ONLY):
            continue
        parts = [t.strip() for t in str(p.annotation).split("|")]
        optional = "None" in parts
        kinds = {_KINDS.get(t, "any") for t in parts if t != "None"}
        kind = kinds.pop() if len(kinds) == 1 else "any"
        rules[p.name] = ParamRule(kind, optional, **(_BOUNDS.get(p.name, {}) if kind in ("number", "integer") else {}))
    return rules


def check_params(name: str, params: dict) -> list[tuple[str, str]]:
    """(parameter, problem) for every parameter of objective `name` that is unknown or out of its rule; for a
    stateful objective also what its constructor refuses (cheap: no model is needed to build one)."""
    if name not in OBJECTIVES:
        return []  # the name's own check reports it
    rules = param_rules(name)
    problems = []
    for key, value in params.items():
        if key not in rules:
            close = difflib.get_close_matches(str(key), sorted(rules), n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            valid = ", ".join(sorted(rules)) or "none"
            problems.append((key, f"{name} has no parameter {key!r}{hint}; valid: {valid}"))
        elif (problem := rules[key].problem(value)) is not None:
            problems.append((key, f"{name}: {problem}"))
    info = OBJECTIVES[name]
    if not problems and info.stateful:
        try:
            info.fn(**params)
        except (TypeError, ValueError) as err:
            problems.append((next(iter(params), ""), f"{name}: {err}"))
    return problems
