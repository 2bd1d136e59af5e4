"""Pieces of benchmarks/universal_ner.py checked by hand: the scripted teacher's labels on a written passage, and
the training passages drawn alternately from several sources, none of them a held-out passage."""

from __future__ import annotations

import json

from conftest import load_benchmark

bench = load_benchmark("universal_ner")


def test_scripted_teacher_labels_a_written_passage():
    passage = ("On Monday, August 27, 2001, Microsoft paid $5m to Paris, France; shares rose 20 per cent in 1999 "
               "and 3.5% on 3 May.")
    assert json.loads(bench.scripted_teacher(passage)) == [
        ["Monday", "weekday"], ["August 27, 2001", "date"], ["Microsoft", "organization"], ["$5m", "money"],
        ["Paris", "city"], ["France", "country"], ["20 per cent", "percentage"], ["1999", "year"],
        ["3.5%", "percentage"], ["3 May", "date"]]


def test_passages_pair_consecutive_sentences_within_bounds():
    text = "One two three four five six. Seven eight nine ten eleven! Short. Tiny? " + "x" * 500 + ". End here."
    assert bench.passages_of([text], limit=10) == ["One two three four five six. Seven eight nine ten eleven!"]


def test_training_passages_alternate_between_sources_and_leave_out_held_out_ones():
    bbc, held = bench.corpora(6, 4)
    mixed, held_again = bench.corpora(7, 4, ("bbc", "wikipedia"))
    wiki = bench.passages_of(bench.training_texts("wikipedia"), limit=3)
    assert held_again == held and len(held) == 4
    assert mixed == [bbc[0], wiki[0], bbc[1], wiki[1], bbc[2], wiki[2], bbc[3]]
    assert not set(mixed) & set(held)


def test_lee_background_passages_are_other_articles_than_the_held_out_lee_ones():
    mixed, held = bench.corpora(6, 80, ("bbc", "wikipedia", "lee-background"))
    background = bench.passages_of(bench.training_texts("lee-background"), limit=2)
    assert mixed[2::3] == background
    assert not set(bench.passages_of(bench.training_texts("lee-background"), limit=5000)) & set(held)
