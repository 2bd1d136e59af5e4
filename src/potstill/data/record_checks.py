"""Checks of classification records before any model loads: feature vectors by shape and type, labels by type.

Every problem is a `UserError` naming the data source, the record (counted from 1, in file order after
`limit`) and the field. What a label may be:

- a class id: a whole number >= 0 (an integral float such as 3.0 counts as 3), or a string of digits ("3",
  as CSV files give every value);
- a class name: any other string. All labels of a run are ids, or all are names; a mix is refused.

The range of the ids (below the teacher's class count) is checked once the teacher is known
(`check_label_range`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from potstill.errors import UserError


def _where(source: str, index: int, field: str) -> str:
    return f"{source}, record {index + 1}: field {field}"


def check_feature_vectors(groups: Sequence[tuple[str, list[dict]]]) -> int:
    """The common length of every record's `features` (lists of finite numbers) over the (source name, records)
    `groups`; a string, a non-number entry, or a length that differs from the first record's is a UserError."""
    width: int | None = None
    first = ""
    for source, records in groups:
        for i, rec in enumerate(records):
            vector = rec.get("features")
            where = _where(source, i, "features")
            if isinstance(vector, (str, bytes)):
                raise UserError(f"{where}: expected a list of numbers, got a string {str(vector)[:40]!r} (store "
                                f"the vector as a JSON list, e.g. in a .jsonl or .parquet file)")
            if not isinstance(vector, (list, tuple)):
                raise UserError(f"{where}: expected a list of numbers, got {type(vector).__name__} {vector!r:.40}")
            for j, x in enumerate(vector):
                if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
                    raise UserError(f"{where}: entry {j} is {x!r}; expected a finite number")
            if width is None:
                width, first = len(vector), f"{source}, record {i + 1}"
            elif len(vector) != width:
                raise UserError(f"{where}: {len(vector)} numbers, but {first} has {width}; every feature vector "
                                f"must have the same length")
    return width or 0


def is_class_id(label: Any) -> bool:
    if isinstance(label, bool):
        return False
    if isinstance(label, numbers.Integral):
        return label >= 0
    if isinstance(label, numbers.Real):
        return math.isfinite(label) and float(label).is_integer() and label >= 0
    return isinstance(label, str) and label.strip().isdigit()


def check_class_labels(groups: Sequence[tuple[str, list[dict]]], *, field: str = "label") -> str | None:
    """"ids" when every present label is a class id, "names" when every one is a class name, None when no record
    has one; a float that is not whole, a negative number, another type, or a mix of ids and names is a
    UserError naming the record."""
    kind: str | None = None
    first = ""
    for source, records in groups:
        for i, rec in enumerate(records):
            label = rec.get(field)
            if label is None:
                continue
            where = _where(source, i, field)
            if isinstance(label, bool) or not isinstance(label, (numbers.Real, str)):
                raise UserError(f"{where}: expected a class id (a whole number >= 0) or a class name (a string), "
                                f"got {label!r:.40}")
            if isinstance(label, numbers.Real) and not is_class_id(label):
                if isinstance(label, numbers.Real) and label < 0:
                    raise UserError(f"{where}: class id {label!r} is negative; ids count from 0")
                raise UserError(f"{where}: {label!r} is not a class id (a whole number >= 0); a hard label names "
                                f"one class")
            this = "ids" if is_class_id(label) else "names"
            if isinstance(label, str) and label.strip().startswith("-") and label.strip()[1:].isdigit():
                raise UserError(f"{where}: class id {label!r} is negative; ids count from 0")
            if kind is None:
                kind, first = this, f"{source}, record {i + 1}"
            elif this != kind:
                raise UserError(f"{where}: {label!r} is a class {this[:-1]}, but {first} has a class {kind[:-1]}; "
                                f"give all labels as ids (0, 1, ...) or all as names")
    return kind


def check_label_range(groups: Sequence[tuple[str, list[dict]]], num_classes: int, *, field: str = "label") -> None:
    """Every class id below `num_classes` (the teacher's output width)."""
    for source, records in groups:
        for i, rec in enumerate(records):
            label = rec.get(field)
            if label is not None and is_class_id(label) and int(float(label)) >= num_classes:
                raise UserError(f"{_where(source, i, field)}: class id {label!r} is out of range: the teacher has "
                                f"{num_classes} classes (ids 0..{num_classes - 1})")
