"""Preference pairs from plain text (`continuation_pairs`) and `builtin:bbc-continuations`."""

from __future__ import annotations

import pytest

from potstill.data.loaders import builtin_records
from potstill.data.preference import continuation_pairs


def _passage(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def test_pairs_by_hand():
    texts = [_passage("a", 6), _passage("b", 5), _passage("c", 4), _passage("d", 7)]  # c: too short
    pairs = continuation_pairs(texts, context_words=3, option_words=2)
    assert [p["prompt"] for p in pairs] == ["a0 a1 a2", "b0 b1 b2", "d0 d1 d2"]
    assert [p["chosen"] for p in pairs] == [" a3 a4", " b3 b4", " d3 d4"]
    # the rejected span: the same words (3 and 4) of another passage
    others = {" a3 a4", " b3 b4", " d3 d4"}
    for p in pairs:
        assert p["rejected"] in others - {p["chosen"]}
    assert continuation_pairs(texts, context_words=3, option_words=2) == pairs  # seeded
    # passages whose spans are all equal make no pair: nothing else to reject
    assert continuation_pairs(["x y z"] * 3, context_words=2, option_words=1) == []


def test_builtin_bbc_continuations_splits_are_disjoint_and_not_the_suites():
    from potstill.data.lm_suite_sources import LM_SOURCES, continuation_items, source_texts

    splits = {s: builtin_records("bbc-continuations", s) for s in ("train", "validation", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 1488, "validation": 201, "test": 412}
    prompts = {s: {r["prompt"] for r in rows} for s, rows in splits.items()}
    # no prompt twice: BBC News holds a few near-copies (same lead, other body), kept in the earliest split only
    assert not prompts["train"] & prompts["validation"]
    assert not (prompts["train"] | prompts["validation"]) & prompts["test"]
    for row in splits["validation"]:
        assert len(row["prompt"].split()) == 40 and len(row["chosen"].split()) == 12
        assert row["chosen"].startswith(" ") and row["chosen"] != row["rejected"]
    # the LM suite's held-out continuation items come from other sources
    suite = {item.context for name in LM_SOURCES for item in continuation_items(source_texts(name), n_items=40)}
    assert not suite & (prompts["train"] | prompts["validation"])


def test_builtin_bbc_continuations_has_no_other_split():
    from potstill.errors import UserError

    with pytest.raises(UserError, match='builtin:bbc-continuations has no split "dev"'):
        builtin_records("bbc-continuations", "dev")
