"""Extractive decoding (potstill.data.extractive_decoding): answers constrained to JSON lists of a passage's spans."""

from __future__ import annotations

import json

import pytest
import torch
from test_causal_lm import llama, make_tokenizer

from potstill.data.extractive_decoding import (
    CLOSED,
    COMMA,
    DONE,
    OPENED,
    SEPARATED,
    START,
    STRING,
    ExtractiveListDecoding,
    TokenTexts,
    advance,
)
from potstill.data.universal_ner import parse_answer

PASSAGE = 'On Sept. 6 Paris paid $6billion to "Acme" in Rome.'


@pytest.fixture(scope="module")
def tok():
    answers = [json.dumps(a) for a in (["Sept. 6"], ["Paris", "Rome"], ["$6billion"], [], ["September 6"])]
    return make_tokenizer(sentences=[PASSAGE, *answers, "Paris Rome Sept 6 billion"], vocab_size=300)


def test_the_automaton_reads_lists_of_spans_by_hand():
    assert advance((START, ""), '["Sept. 6", "$6billion"]', PASSAGE) == (DONE, "")
    assert advance((START, ""), "[]", PASSAGE) == (DONE, "")
    assert advance((START, ""), '["Sept', PASSAGE) == (STRING, "Sept")
    assert advance((START, ""), '["Paris", ', PASSAGE) == (SEPARATED, "")
    assert advance((START, ""), '["Paris"', PASSAGE) == (CLOSED, "")
    assert advance((START, ""), '["Paris",', PASSAGE) == (COMMA, "")
    assert advance((START, ""), '[', PASSAGE) == (OPENED, "")
    # a rewritten span, an empty string, text after the list, another separator, a stray space
    for text in ('["September', '[""', '["Paris"] ', '["Paris","Rome"]', '[ "Paris"]', 'Paris'):
        assert advance((START, ""), text, PASSAGE) is None, text
    # escapes: \" only where the passage has a quote there, \\ only where it has a backslash
    assert advance((START, ""), '["\\"Acme\\""]', PASSAGE) == (DONE, "")
    assert advance((START, ""), '["Rome\\"', PASSAGE) is None
    assert advance((START, ""), '["\\n', PASSAGE) is None


@pytest.mark.parametrize("prefix", ["", "[", '["', '["Par', '["Sept. ', '["Paris"', '["Paris",', '["Paris", ',
                                    '["Paris", "R', "[]"])
def test_allowed_tokens_are_exactly_those_the_automaton_accepts(tok, prefix):
    tokens = TokenTexts.of(tok)
    constraint = ExtractiveListDecoding(tokens, PASSAGE, prompt_length=0)
    state = advance((START, ""), prefix, PASSAGE)
    assert state is not None
    brute = sorted(k for k, text in enumerate(tokens.texts) if text and advance(state, text, PASSAGE) is not None)
    if state[0] == DONE:
        assert constraint.allowed(state) == [tok.eos_token_id]
    else:
        assert constraint.allowed(state) == brute and brute


def test_special_tokens_and_partial_characters_are_never_allowed(tok):
    tokens = TokenTexts.of(tok)
    for special in tok.all_special_ids:
        assert tokens.texts[special] is None
    assert all(t is None or "\ufffd" not in t for t in tokens.texts)
    # the state of a generated sequence stops at end-of-sequence; an unknown token makes it invalid
    constraint = ExtractiveListDecoding(tokens, PASSAGE, prompt_length=0)
    ids = tok('["Paris"]', add_special_tokens=False)["input_ids"]
    assert constraint.state_of([*ids, tok.eos_token_id, *ids]) == (DONE, "")
    assert constraint.allowed(None) == [tok.eos_token_id]


def test_a_random_model_under_the_constraint_writes_only_spans(tok):
    tokens = TokenTexts.of(tok)
    for seed in range(3):
        model = llama(len(tok), seed=seed, init=0.5).eval()
        prompt = tok(["Rome", "Paris paid"], return_tensors="pt", padding=True)
        constraint = ExtractiveListDecoding(tokens, PASSAGE, prompt["input_ids"].shape[1])
        with torch.inference_mode():
            out = model.generate(**prompt, max_new_tokens=24, do_sample=True, top_k=0, temperature=1.0,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 prefix_allowed_tokens_fn=constraint)
        for row in out[:, prompt["input_ids"].shape[1]:].tolist():
            assert constraint.state_of(row) is not None
            text = tok.decode(row, skip_special_tokens=True)
            assert text.startswith("[")
            assert all(m and m in PASSAGE for m in parse_answer(text))
        # unconstrained, the same model writes something that is not such a list
        with torch.inference_mode():
            free = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert any(constraint.state_of(r) is None for r in free[:, prompt["input_ids"].shape[1]:].tolist())
