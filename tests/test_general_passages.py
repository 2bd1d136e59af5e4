"""benchmarks/general_passages.py's packing of consecutive sentences into passages, checked by hand."""

from __future__ import annotations

from conftest import load_benchmark

bench = load_benchmark("general_passages")


def test_pack_joins_sentences_up_to_the_limit_and_keeps_only_long_enough_passages():
    sentences = ["a" * 40, "b" * 40, "c" * 40, "d" * 10]
    # 40 + 1 + 40 = 81 fits 90; adding c would be 122 > 90, so c starts the next passage; "c… d…" is 51 chars
    assert bench.pack(sentences, min_chars=60, max_chars=90, excluded=set()) == ["a" * 40 + " " + "b" * 40]
    assert bench.pack(sentences, min_chars=50, max_chars=90, excluded=set()) == [
        "a" * 40 + " " + "b" * 40, "c" * 40 + " " + "d" * 10]


def test_pack_drops_excluded_and_markup_sentences_and_closes_the_passage_there():
    sentences = ["first sentence here.", "A suite text.", "third one is here.", "fourth | markup.", "fifth."]
    out = bench.pack(sentences, min_chars=10, max_chars=200, excluded={"a suite text."})
    assert out == ["first sentence here.", "third one is here."]
    assert bench.pack(["x" * 300], min_chars=10, max_chars=200, excluded=set()) == []  # too long alone
