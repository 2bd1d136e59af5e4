"""CycleAlign's data side (potstill.data.cyclealign): LCS agreement, prompt and parser, demo pool, state."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from potstill.data.cyclealign import (
    CycleAlignState,
    Demo,
    agreement_demo,
    agreement_rate,
    longest_common_subsequence,
    order_to_scores,
    parse_ranking,
    rank_by_scores,
    ranking_messages,
    select_demos,
    update_demo_pool,
)


@pytest.mark.parametrize(("first", "second", "expected"), [
    ([0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]),
    ([0, 1, 2, 3], [3, 2, 1, 0], [0]),            # reversed: one item; ties keep the first ranking's top
    ([2, 0, 1, 3], [0, 2, 1, 3], [2, 1, 3]),      # 2 and 0 swapped at the top: [0, 1, 3] is as long
    ([1, 3, 0, 2], [3, 1, 2, 0], [1, 0]),         # [1, 2], [3, 2], [3, 0] are as long
    ([4, 1, 0, 3, 2], [1, 4, 3, 2, 0], [4, 3, 2]),
    ([], [1, 2], []),
])
def test_longest_common_subsequence(first, second, expected) -> None:
    got = longest_common_subsequence(first, second)
    assert got == expected
    assert len(got) == len(longest_common_subsequence(second, first))


def _is_subsequence(part: list[int], whole: list[int]) -> bool:
    items = iter(whole)
    return all(x in items for x in part)


def test_lcs_is_longest_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(50):
        first, second = rng.sample(range(5), 5), rng.sample(range(5), 5)
        got = longest_common_subsequence(first, second)
        assert _is_subsequence(got, first) and _is_subsequence(got, second)
        longest = max(size for size in range(6) for part in itertools.combinations(first, size)
                      if _is_subsequence(list(part), second))
        assert len(got) == longest


def test_agreement_rate_and_white_box_ranking() -> None:
    assert agreement_rate([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert agreement_rate([4, 1, 0, 3, 2], [1, 4, 3, 2, 0]) == pytest.approx(3 / 5)
    assert rank_by_scores([-1.5, -0.2, -3.0, -0.2]) == [1, 3, 0, 2]


def test_order_to_scores_partial_ranking() -> None:
    scores, counted = order_to_scores([2, 0], 4)
    assert scores == [3.0, 0.0, 4.0, 0.0]
    assert counted == [True, False, True, False]


def test_ranking_messages_with_demos() -> None:
    demo = agreement_demo("q0", ["a", "b", "c", "d"], [3, 1], n=4, cycle=1)
    assert demo.responses == ("b", "d") and demo.ranking == (1, 0) and demo.agreement == 0.5
    messages = ranking_messages("what?", ["yes  please", "no"], [demo])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Query: q0\nResponses:\n[1] b\n[2] d\nRank all 2 responses, best first."
    assert messages[2]["content"] == "2 > 1"
    assert "[1] yes please\n[2] no" in messages[3]["content"]


@pytest.mark.parametrize(("reply", "expected"), [
    ("2 > 1 > 3", [1, 0, 2]),
    ("[3] > [1] > [2]", [2, 0, 1]),
    ("Response 2 is clearly best.\nRanking: 2 > 3 > 1.", [1, 2, 0]),
    ("3, 1, 2", [2, 0, 1]),
    ("1 > 2 > 3 was my first thought, but 3 > 2 > 1", [2, 1, 0]),
    ("2 > 1", None),                  # not all three
    ("2 > 2 > 1", None),              # repeated
    ("4 > 1 > 2", None),              # unknown number
    ("I cannot rank these.", None),
    ("", None),
])
def test_parse_ranking(reply, expected) -> None:
    assert parse_ranking(reply, 3) == expected


def test_parse_ranking_non_text() -> None:
    assert parse_ranking(None, 3) is None  # type: ignore[arg-type]


def _demo(query: str, agreement: float, cycle: int, ranked: int = 2) -> Demo:
    return Demo(query, tuple("xyzw"[:ranked]), tuple(range(ranked)), agreement, cycle)


def test_update_demo_pool_keeps_best_and_newest() -> None:
    pool = [_demo("a", 1.0, 1), _demo("b", 0.75, 1)]
    candidates = [_demo("c", 0.5, 2), _demo("b", 0.75, 2), _demo("d", 1.0, 2), _demo("e", 1.0, 2, ranked=1)]
    got = update_demo_pool(pool, candidates, capacity=3, min_agreement=0.75)
    # c is below the threshold, e ranks one response only; d ties a at 1.0 and is newer; b's newer copy wins
    assert [(d.query, d.cycle) for d in got] == [("d", 2), ("a", 1), ("b", 2)]
    assert select_demos(got, 2, exclude_query="d") == [got[1], got[2]]
    assert update_demo_pool(pool, [], capacity=0, min_agreement=0.0) == []


def test_state_round_trips_through_json() -> None:
    state = CycleAlignState(cycle=2, demos=[_demo("a", 1.0, 1)], history=[{"cycle": 1, "agreement": 0.5}])
    again = CycleAlignState.from_state_dict(json.loads(json.dumps(state.state_dict())))
    assert again == state
