"""`builtin:general`: the corpus builder (sentence split, de-duplication, per-source counts) and its
disjointness from the general evaluation suite."""

from __future__ import annotations

from potstill.data.general import (
    MAX_CHARS,
    SOURCES,
    build_general_corpus,
    general_corpus_stats,
    normalise,
    split_sentences,
)
from potstill.data.loaders import BUILTIN_DATASETS, builtin_records
from potstill.data.suite_tasks import TASKS, task_texts


def test_split_sentences_keeps_abbreviations_and_initials():
    text = "Mr. Smith met J. Jones in St. Kilda. They left!  Did they?  \"Yes,\" he said. 3 went home."
    assert split_sentences(text) == ["Mr. Smith met J. Jones in St. Kilda.", "They left!", "Did they?",
                                     '"Yes," he said.', "3 went home."]


def test_builder_dedupes_filters_splits_and_counts():
    long_paragraph = " ".join(f"Sentence number {i} is here and long enough." for i in range(12))
    assert len(long_paragraph) > MAX_CHARS
    sources = [
        ("wikipedia", ["A short passage stays whole. It has two sentences.", long_paragraph, "Too short."]),
        ("chatterbot", ["a SHORT passage stays   whole. it has two sentences.", "What is your name?", "Hi"]),
        ("bbc", ["This sentence is held out of the corpus.", "Another plain news sentence here."]),
    ]
    records = build_general_corpus(sources, exclude=["THIS sentence is held out of the corpus."])
    texts = [r["text"] for r in records]
    assert texts[0] == "A short passage stays whole. It has two sentences."  # a short paragraph is kept whole
    assert "Sentence number 0 is here and long enough." in texts  # a long one is split into sentences
    assert sum(t.startswith("Sentence number") for t in texts) == 12
    assert "Too short." not in texts and "Hi" not in texts  # under MIN_CHARS / MIN_WORDS
    assert "This sentence is held out of the corpus." not in texts  # excluded
    assert len({normalise(t) for t in texts}) == len(texts)  # the chatterbot copy was a duplicate
    assert general_corpus_stats(records) == {"wikipedia": 13, "chatterbot": 1, "bbc": 1, "total": 15}


def test_builtin_general_has_no_suite_text_and_disjoint_splits():
    assert "general" in BUILTIN_DATASETS
    splits = {s: builtin_records("general", s) for s in ("train", "validation", "test")}
    corpus = {normalise(r["text"]) for rs in splits.values() for r in rs}
    assert sum(len(rs) for rs in splits.values()) == len(corpus)  # de-duplicated, splits disjoint
    assert all(set(r) == {"text", "source"} for rs in splits.values() for r in rs)
    stats = general_corpus_stats([r for rs in splits.values() for r in rs])
    assert set(SOURCES) <= set(stats) and stats["total"] > 20_000
    for name, task in TASKS.items():
        overlap = {normalise(t) for t in task_texts(task.load())} & corpus
        assert not overlap, f"{name}: {len(overlap)} suite texts are in builtin:general, e.g. {sorted(overlap)[0]!r}"
