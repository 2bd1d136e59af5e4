"""Entity-level precision, recall and F1 of named-entity predictions (strict match), as UniversalNER scores them.

Each passage's entities are a set of (type, mention) pairs: a predicted pair counts as a true positive only when the
reference of the same passage has exactly that pair (the same type and the same mention string after trimming
spaces; no partial-span credit); repeats of a pair within a passage count once. Over a corpus the counts are summed
(micro average):

    precision = TP / (TP + FP),   recall = TP / (TP + FN),   F1 = 2·P·R / (P + R)

with 0 for an empty denominator. `per_type` gives the same numbers for each type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Entities = Mapping[str, Sequence[str]]


def entity_pairs(entities: Entities) -> set[tuple[str, str]]:
    """The (type, mention) pairs of one passage, mentions trimmed, empty ones dropped."""
    return {(t, m.strip()) for t, mentions in entities.items() for m in mentions if m.strip()}


def _scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def entity_f1(predicted: Sequence[Entities], reference: Sequence[Entities]) -> dict[str, float]:
    """Micro precision / recall / F1 (and the tp, fp, fn counts) of `predicted` against `reference`, one
    {type: [mentions]} per passage, in the same order."""
    if len(predicted) != len(reference):
        raise ValueError(f"entity_f1: {len(predicted)} predicted passages but {len(reference)} reference ones")
    tp = fp = fn = 0
    for pred, ref in zip(predicted, reference, strict=True):
        p, r = entity_pairs(pred), entity_pairs(ref)
        tp, fp, fn = tp + len(p & r), fp + len(p - r), fn + len(r - p)
    return _scores(tp, fp, fn)


def per_type(predicted: Sequence[Entities], reference: Sequence[Entities]) -> dict[str, dict[str, float]]:
    """`entity_f1` restricted to each type found in either side."""
    types = sorted({t for side in (predicted, reference) for ents in side for t in ents})
    return {t: entity_f1([{t: e.get(t, [])} for e in predicted], [{t: e.get(t, [])} for e in reference])
            for t in types}
