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
    bbc, held = bench.training_passages(6), bench.held_out(4)
    mixed = bench.training_passages(7, ("bbc", "wikipedia"))
    wiki = bench.passages_of(bench.training_texts("wikipedia"), limit=3)
    assert [source for source, _ in held] == ["lee", "lee", "newsgroups", "newsgroups"]
    assert mixed == [bbc[0], wiki[0], bbc[1], wiki[1], bbc[2], wiki[2], bbc[3]]
    assert not set(mixed) & {p for _, p in held}


def test_lee_background_passages_are_other_articles_than_the_held_out_lee_ones():
    mixed = bench.training_passages(6, ("bbc", "wikipedia", "lee-background"))
    background = bench.passages_of(bench.training_texts("lee-background"), limit=5000)
    assert mixed[2::3] == background[:2]
    assert not set(background) & {p for _, p in bench.held_out(80)}


def test_scores_split_by_held_out_source(monkeypatch):
    held = [{"passage": "In Paris.", "source": "lee", "entities": {"city": ["Paris"]}},
            {"passage": "In Rome.", "source": "newsgroups", "entities": {"city": ["Rome"]}}]
    answers = [{"city": ["Paris", "Lyon"]}, {"city": []}]
    monkeypatch.setattr(bench, "predict", lambda model, tokenizer, passages: answers)
    scores = bench.score(None, None, held)
    assert scores["per_source"] == {"lee": 0.667, "newsgroups": 0.0}
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 1, 1)
    extractive = scores["extractive"]  # "Lyon" is not in its passage, so only the filtered scores drop it
    assert (extractive["tp"], extractive["fp"], extractive["fn"], extractive["f1"]) == (1, 0, 1, 2 / 3)
    assert extractive["per_source"] == {"lee": 1.0, "newsgroups": 0.0}
    assert scores["predicted"] == answers


def test_write_data_keeps_a_type_balanced_share_of_a_labelled_pool(tmp_path):
    plain = bench.write_data(tmp_path / "plain", train=40, heldout=2, negatives=7, sources=("bbc", "wikipedia"))
    balanced = bench.write_data(tmp_path / "bal", train=40, heldout=2, negatives=7, sources=("bbc", "wikipedia"),
                                pool=400, empty_share=0.25)
    assert plain["train_passages"] == balanced["train_passages"] == 40
    records = [json.loads(line) for line in (tmp_path / "bal" / "train.jsonl").read_text().splitlines()]
    empty = [r for r in records if all(m["content"] == "[]" for m in r["messages"][3::2])]
    assert len(empty) == 10                                  # a quarter of the 40 passages hold no mention
    assert balanced["train_mentions"] > plain["train_mentions"]
    pool = set(bench.training_passages(400, ("bbc", "wikipedia")))
    assert {r["messages"][0]["content"].removeprefix("Text: ") for r in records} <= pool


def test_soup_members_share_the_data_and_differ_in_run_seed_and_folder(monkeypatch, tmp_path):
    import potstill.train

    trained = []
    monkeypatch.setattr(potstill.train, "run_recipe", trained.append)
    overrides = [f"output_dir={tmp_path}", "trainer.max_steps=67", "seed=3", "data.train.path=/data/train.jsonl"]
    folders = [bench.train_member(overrides, "ner", k, 3) for k in range(3)]
    assert folders == [tmp_path / f"ner-member{k}" / "student" for k in range(3)]
    assert [r.seed for r in trained] == [3, 103, 203]
    assert {str(r.data.train.path) for r in trained} == {"/data/train.jsonl"}
    assert all(r.data.eval is None and r.trainer.max_steps == 67 for r in trained)
