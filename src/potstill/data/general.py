"""`builtin:general`: general-domain distillation text, offline, from four sources, disjoint from the suite.

Sources (the `source` field of each record):
- "wikipedia": the 107 articles of the English Wikipedia dump shipped in gensim's test data
  (`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`; CC BY-SA), read with gensim's
  `extract_pages` and `filter_wiki` (redirects and namespaced pages skipped), then stripped of bold/italic
  quotes, headings, list, table and indented lines, and any sentence still holding markup (`| { } [ ] < > =`).
- "lee-background": the 300 news documents of the Lee background corpus (`lee_background.cor`), not the
  50 rated Lee documents that the suite's lee-sts task uses.
- "chatterbot": the English chatterbot corpus's questions and answers (BSD-3).
- "bbc": the paragraphs of the BBC News articles of `builtin:bbc`'s *train* split only, so that the BBC
  validation and test articles stay unseen.

Building: each source yields paragraphs. A paragraph of at most MAX_CHARS characters is kept whole (a short
passage); a longer one is split into sentences by a regex: a break after ".", "!" or "?" followed by
whitespace and an upper-case letter, a digit or an opening quote/bracket, except after common abbreviations
(Mr., Mrs., Dr., St., ...) and single initials ("J."). Pieces shorter than MIN_CHARS characters or
MIN_WORDS words, or longer than MAX_CHARS, are dropped. Whitespace runs become one space. Duplicates are
removed after normalisation (lower case, whitespace collapsed), the first one kept (sources in the order
above). Every text of the general evaluation suite (`potstill.data.suite_tasks`), and every sentence of
those texts, is excluded, so the suite stays held out.

Splits: a seeded shuffle (seed 0), 5 % validation, 5 % test, the rest train.
"""

from __future__ import annotations

import bz2
import functools
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from potstill.data.suite_sources import gensim_test_data, one_line

__all__ = ["MAX_CHARS", "MIN_CHARS", "SOURCES", "build_general_corpus", "general_corpus_stats", "general_records",
           "has_markup", "lee_background", "normalise", "split_sentences", "wiki_paragraphs"]

SOURCES = ("wikipedia", "lee-background", "chatterbot", "bbc")
MIN_CHARS = 15
MIN_WORDS = 3
MAX_CHARS = 300
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.05
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Prof", "Gen", "Col", "Lt", "Sgt", "Inc", "Ltd",
                  "Co", "vs", "etc", "No", "Vol", "Fig", "approx", "e.g", "i.e", "U.S")
_SENTENCE_BREAK = re.compile(
    "".join(rf"(?<!\b{re.escape(a)}\.)" for a in _ABBREVIATIONS)
    + r"(?<!\b[A-Z]\.)(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])"
)
_MARKUP = re.compile(r"[|{}\[\]<>=]")


def normalise(text: str) -> str:
    """The form texts are compared in: lower case, whitespace runs collapsed to one space."""
    return " ".join(text.lower().split())


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` by the regex described in the module docstring, whitespace collapsed."""
    return [s for s in (one_line(p) for p in _SENTENCE_BREAK.split(text)) if s]


def _pieces(paragraph: str) -> list[str]:
    paragraph = one_line(paragraph)
    if len(paragraph) <= MAX_CHARS:
        return [paragraph]
    return split_sentences(paragraph)


def _keep(piece: str) -> bool:
    return MIN_CHARS <= len(piece) <= MAX_CHARS and len(piece.split()) >= MIN_WORDS


def build_general_corpus(sources: Sequence[tuple[str, Iterable[str]]],
                         exclude: Iterable[str] = ()) -> list[dict[str, str]]:
    """Records {text, source} from (source name, paragraphs) pairs: short passages and sentences, de-duplicated
    across sources, without any text whose normalised form is in `exclude` (normalised here)."""
    seen = {normalise(t) for t in exclude}
    out: list[dict[str, str]] = []
    for name, paragraphs in sources:
        for paragraph in paragraphs:
            for piece in _pieces(paragraph):
                key = normalise(piece)
                if _keep(piece) and key not in seen:
                    seen.add(key)
                    out.append({"text": piece, "source": name})
    return out


def general_corpus_stats(records: Iterable[dict]) -> dict[str, int]:
    """Records per source, in SOURCES order (sources with no record left out), and "total"."""
    counts = Counter(r["source"] for r in records)
    stats = {s: counts[s] for s in SOURCES if counts[s]}
    stats.update({s: n for s, n in counts.items() if s not in stats})
    stats["total"] = sum(counts.values())
    return stats


def _clean_wiki(text: str) -> list[str]:
    text = re.sub(r"'{2,}", "", text)
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("=", "*", "#", ":", ";", "|", "!", "{")):
            continue
        paragraphs.append(line)
    return paragraphs


def wiki_paragraphs() -> list[str]:
    """The cleaned paragraphs of the Wikipedia dump's articles (redirects and namespaced pages skipped), unsplit."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out: list[str] = []
    with bz2.open(gensim_test_data() / WIKI_DUMP) as f:
        for title, text, _ in extract_pages(f):
            if ":" not in title and not text.lstrip().lower().startswith("#redirect"):
                out += _clean_wiki(filter_wiki(text))
    return out


def has_markup(text: str) -> bool:
    """Whether `text` still holds wiki markup (`| { } [ ] < > =`)."""
    return bool(_MARKUP.search(text))


def _wikipedia() -> list[str]:
    return [s for paragraph in wiki_paragraphs() for s in _pieces(paragraph) if not has_markup(s)]


def lee_background() -> list[str]:
    path = gensim_test_data() / "lee_background.cor"
    return [line for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def _chatterbot() -> list[str]:
    from potstill.assets import chatterbot_pairs

    return [turn for question, answer, _ in chatterbot_pairs() for turn in (question, answer)]


def suite_exclusions() -> set[str]:
    """Normalised suite texts and their sentences: what `builtin:general` must not contain."""
    from potstill.data.suite_tasks import suite_texts

    out: set[str] = set()
    for text in suite_texts():
        out.add(normalise(text))
        out.update(normalise(s) for s in split_sentences(text))
    return out


@functools.lru_cache(maxsize=2)
def _corpus(bbc_paragraphs: tuple[str, ...]) -> tuple[dict[str, str], ...]:
    sources = [("wikipedia", _wikipedia()), ("lee-background", lee_background()), ("chatterbot", _chatterbot()),
               ("bbc", bbc_paragraphs)]
    return tuple(build_general_corpus(sources, exclude=suite_exclusions()))


def general_records(split: str, bbc_paragraphs: Sequence[str]) -> list[dict[str, str]]:
    """The `split` ("train", "validation" or "test") of the corpus, in shuffled order (seed 0).

    `bbc_paragraphs` are the BBC paragraphs to include (`potstill.data.loaders` passes those of
    `builtin:bbc-sentences`' train split).
    """
    records = list(_corpus(tuple(bbc_paragraphs)))
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    held = max(1, int(len(order) * HELD_OUT_FRACTION))
    parts = {"validation": order[:held], "test": order[held:2 * held], "train": order[2 * held:]}
    return [dict(records[i]) for i in parts[split]]
