"""UniversalNER's conversation builder (potstill.data.universal_ner) and entity-level F1 (potstill.eval.ner)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from test_causal_lm import make_tokenizer

from potstill.data.lm_records import LMRecordEncoder
from potstill.data.universal_ner import (
    ACKNOWLEDGEMENT,
    mention_form,
    mentions_in_passage,
    parse_answer,
    parse_teacher_entities,
    sample_negative_types,
    select_passages_by_type,
    type_frequencies,
    universal_ner_conversations,
)
from potstill.errors import UserError
from potstill.eval.ner import entity_f1, per_type

PASSAGES = ["Ann paid $5 in Paris on Monday.", "Bob flew to Rome.", "It rained in Oslo on Friday."]
ANNOTATIONS = [{"money": ["$5"], "city": ["Paris"], "weekday": ["Monday"]}, {"city": ["Rome"], "person": ["Bob"]},
               {"city": ["Oslo"], "weekday": ["Friday"]}]


def test_one_turn_per_type_and_negatives_answer_empty_lists():
    records = universal_ner_conversations(PASSAGES, ANNOTATIONS, negatives=2, seed=0)
    assert len(records) == 3
    msgs = records[1]["messages"]
    assert msgs[0] == {"role": "user", "content": "Text: Bob flew to Rome."}
    assert msgs[1] == {"role": "assistant", "content": ACKNOWLEDGEMENT}
    turns = {msgs[k]["content"]: msgs[k + 1]["content"] for k in range(2, len(msgs), 2)}
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 5
    assert turns["What describes city in the text?"] == '["Rome"]'
    assert turns["What describes person in the text?"] == '["Bob"]'
    # the two negatives are the types absent from this passage: weekday and money, the only ones left
    assert turns["What describes weekday in the text?"] == "[]" and turns["What describes money in the text?"] == "[]"


def test_negatives_are_drawn_by_type_frequency():
    freq = type_frequencies(ANNOTATIONS)
    assert freq == Counter({"city": 3, "weekday": 2, "money": 1, "person": 1})
    rng = random.Random(0)
    draws = Counter(sample_negative_types({"city"}, freq, 1, rng)[0] for _ in range(4000))
    assert set(draws) == {"weekday", "money", "person"}
    # weekday has weight 2 of 4: about half the single draws
    assert abs(draws["weekday"] / 4000 - 0.5) < 0.03 and abs(draws["money"] / 4000 - 0.25) < 0.03
    assert sorted(sample_negative_types({"city"}, freq, 9, rng)) == ["money", "person", "weekday"]


def test_passage_selection_takes_the_rare_types_first_then_empty_passages():
    pool = [{"date": ["May 1"]}, {"country": ["Peru"]}, {"country": ["Chad"], "city": ["Lima"]}, {}, {"year": []},
            {"country": ["Fiji"]}]
    for seed in range(6):
        chosen = select_passages_by_type(pool, 4, empty_share=0.25, seed=seed)
        # one turn each for city (passage 2) and date (0), the rarest, then country: 2 is taken, so 1 or 5;
        # then one of the two passages without a mention (4 has a type with no mention: empty)
        assert chosen == sorted(chosen) and len(chosen) == 4
        assert {0, 2} <= set(chosen) and len({1, 5} & set(chosen)) == 1 and len({3, 4} & set(chosen)) == 1
    assert select_passages_by_type(pool, 4, empty_share=0.25, seed=3) == select_passages_by_type(
        pool, 4, empty_share=0.25, seed=3)
    short = select_passages_by_type(pool, 5, empty_share=0.0)   # 4 passages hold a mention: an empty one fills
    assert short[:3] == [0, 1, 2] and short[4] == 5 and short[3] in (3, 4)
    assert len(select_passages_by_type(pool, 9)) == 6
    assert select_passages_by_type(pool, 2, empty_share=1.0) == [3, 4]
    with pytest.raises(UserError, match="empty_share is 1.5"):
        select_passages_by_type(pool, 2, empty_share=1.5)


def test_mention_forms_keep_the_shape_and_drop_the_words():
    assert [mention_form(m) for m in ("19 per cent", "19%", "2.5%", "35 percent", "Sept. 11", "27 August 2003",
                                      "US", "United States", "$5.2bn", "eBay")] == [
        "0 a a", "0%", "0.0%", "0 a", "Aa. 0", "0 Aa 0", "A", "Aa Aa", "$0.0bn", "eAa"]


def test_with_forms_a_types_rare_surface_form_gets_its_own_turn():
    # percentage: three passages of the form "0%", one of "0 a a"; country: four passages of one form
    pool = [{"percentage": ["5%"]}, {"percentage": ["7%"]}, {"percentage": ["9%"]},
            {"percentage": ["19 per cent"]}, {"country": ["Peru"]}, {"country": ["Chad"]}, {"country": ["Fiji"]},
            {"country": ["Mali"]}]
    for seed in range(6):
        # 4 picks, types alternating: two countries and two percentages, the rarer form first
        chosen = select_passages_by_type(pool, 4, empty_share=0.0, seed=seed, forms=True)
        assert 3 in chosen and len({0, 1, 2} & set(chosen)) == 1 and len({4, 5, 6, 7} & set(chosen)) == 2
    # without forms "19 per cent" is only one of four percentage passages, so some seed leaves it out
    assert any(3 not in select_passages_by_type(pool, 4, empty_share=0.0, seed=seed) for seed in range(6))
    # a passage with two forms of a type is in both forms' queues, and chosen once
    assert select_passages_by_type([{"percentage": ["5%", "6 per cent"]}], 3, forms=True) == [0]


def test_with_mentions_a_rare_name_gets_its_own_turn_inside_its_form():
    # country: "US" (form "A") in four passages, "Peru" in two and "Chad" in one (both form "Aa"); city: "Lima"
    pool = [{"country": ["US"]}, {"country": ["US"]}, {"country": ["US"]}, {"country": ["US"]},
            {"country": ["Peru"]}, {"country": ["Peru"]}, {"country": ["Chad"]},
            {"city": ["Lima"]}, {"city": ["Lima"]}, {"city": ["Lima"]}]
    for seed in range(6):
        # types alternate (city, country, city, country, ...): 3 country picks; with forms the first goes to
        # form "Aa" (3 passages) before "A" (4), and within "Aa" to "Chad" (1) before "Peru" (2)
        chosen = set(select_passages_by_type(pool, 6, empty_share=0.0, seed=seed, forms=True, mentions=True))
        assert 6 in chosen and len({4, 5} & chosen) == 1 and len({0, 1, 2, 3} & chosen) == 1
        # mentions alone: the three names take turns, rarest first
        chosen = set(select_passages_by_type(pool, 6, empty_share=0.0, seed=seed, mentions=True))
        assert 6 in chosen and len({4, 5} & chosen) == 1 and len({0, 1, 2, 3} & chosen) == 1
    # with forms only "Chad" is one of three "Aa" passages, so some seed leaves it out
    assert any(6 not in select_passages_by_type(pool, 6, empty_share=0.0, seed=seed, forms=True) for seed in range(6))
    # a passage naming two countries is in both names' queues, and chosen once; a name repeated counts once
    assert select_passages_by_type([{"country": ["US", "Chad", "US"]}], 3, mentions=True) == [0]


def test_labels_count_only_the_assistant_turns():
    tok = make_tokenizer(sentences=PASSAGES + ["What describes city in the text?", ACKNOWLEDGEMENT])
    record = universal_ner_conversations(PASSAGES[1:2], ANNOTATIONS[1:2], negatives=0, seed=0)[0]
    encoder = LMRecordEncoder(tok, max_length=256, add_eos=False)
    ex = encoder.examples([record], "messages", "data.train", packing=False)[0]
    counted = tok.decode([t for t in ex["targets"] if t != -100])
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    assert counted == "".join(a + "<|im_end|>\n" for a in answers)
    assert "Text:" not in counted and "What describes" not in counted


def test_teacher_json_is_parsed_or_refused_by_name():
    got = parse_teacher_entities('[["Paris", "City"], {"entity": "$5", "type": "money"}, ["Paris", "city"]]',
                                 where="passage 3")
    assert got == {"city": ["Paris"], "money": ["$5"]}
    with pytest.raises(UserError, match="passage 3: the teacher's answer is not JSON"):
        parse_teacher_entities('[["Paris", "city"]', where="passage 3")
    with pytest.raises(UserError, match="item 1"):
        parse_teacher_entities('[["Paris", "city"], ["Rome"]]', where="passage 3")
    with pytest.raises(UserError, match="UniversalNER|annotation"):
        universal_ner_conversations(PASSAGES, ANNOTATIONS[:2])


def test_student_answers_are_read_leniently():
    assert parse_answer('["Paris", "Rome"]<|im_end|>') == ["Paris", "Rome"]
    assert parse_answer('x [oops] then ["$5"]') == ["$5"]
    assert parse_answer("none") == [] and parse_answer('["unterminated') == []
    assert json.loads(json.dumps(parse_answer("[]"))) == []


def test_only_mentions_written_in_the_passage_are_kept():
    passage = "Prices rose 19 per cent in Paris on Monday."
    answered = ["19%", "19 per cent", "Paris", "paris", "Monday", "Tuesday"]
    assert mentions_in_passage(answered, passage) == ["19 per cent", "Paris", "Monday"]
    assert mentions_in_passage([], passage) == []


def test_entity_f1_by_hand():
    reference = [{"city": ["Paris"], "money": ["$5"]}, {"city": ["Rome"]}]
    predicted = [{"city": ["Paris", "Paris "], "weekday": ["$5"]}, {"city": ["Rome"], "person": ["Bob"]}]
    # tp: (city, Paris), (city, Rome) = 2; fp: (weekday, $5), (person, Bob) = 2; fn: (money, $5) = 1
    got = entity_f1(predicted, reference)
    assert (got["tp"], got["fp"], got["fn"]) == (2, 2, 1)
    assert got["precision"] == pytest.approx(0.5) and got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    types = per_type(predicted, reference)
    assert types["city"]["f1"] == 1.0 and types["money"]["recall"] == 0.0 and types["person"]["precision"] == 0.0
    assert entity_f1([{}], [{}])["f1"] == 0.0
    with pytest.raises(ValueError, match="2 predicted passages but 1"):
        entity_f1(predicted, reference[:1])
