"""Dynamic few-shot exemplars for program distillation: the verified programs of the most similar questions.

Jie & Lu (ACL Findings 2023) embed every annotated training question and, for a new question, put the k most
similar ones with their *correct* programs in the prompt (cosine similarity of sentence embeddings; k = 8 in
their code, `find_top_k_train_idx`). `ExemplarIndex` holds such (question, program) pairs and returns the k
nearest by cosine similarity, ties broken by insertion order; a pair whose question is the query's own text is
never its own exemplar.

Two embedders, both offline:
- ``"minilm"``: the packaged all-MiniLM-L6-v2 sentence encoder (`potstill.assets.minilm_path`, the `assets`
  extra), mean-pooled and L2-normalised by sentence-transformers; embeddings are cached by text.
- ``"tfidf"`` (default: it needs no model and is exact for templated text): scikit-learn's TF-IDF over word
  unigrams and bigrams (sublinear tf, L2-normalised rows), fitted on the questions in the index at query time.
Any callable `list[str] -> array [n, d]` of L2-normalised rows works too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from potstill.errors import UserError

Embedder = Callable[[list[str]], np.ndarray]
EMBEDDERS = ("tfidf", "minilm")


@dataclass(frozen=True)
class Exemplar:
    """A question with a program known to give its gold answer."""

    question: str
    program: str


def minilm_embedder() -> Embedder:
    """The packaged MiniLM sentence encoder as an embedder (normalised rows, cached by text)."""
    from sentence_transformers import SentenceTransformer

    from potstill.assets import minilm_path

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    cache: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in cache})
        if missing:
            vectors = model.encode(missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)
            cache.update(zip(missing, np.asarray(vectors, dtype=np.float32), strict=True))
        return np.stack([cache[t] for t in texts]) if texts else np.zeros((0, 1), np.float32)

    return embed


def _tfidf_similarities(pool: list[str], queries: list[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
    pool_vectors = vectorizer.fit_transform(pool)
    return np.asarray((vectorizer.transform(queries) @ pool_vectors.T).todense(), dtype=np.float64)


class ExemplarIndex:
    """Verified (question, program) pairs, searchable by question similarity (see the module docstring)."""

    def __init__(self, embedder: str | Embedder = "tfidf", exemplars: Sequence[Exemplar] = ()) -> None:
        if isinstance(embedder, str):
            if embedder not in EMBEDDERS:
                raise UserError(f"exemplar embedder: expected one of {', '.join(EMBEDDERS)} or a function, "
                                f"got {embedder!r}")
            self._embed: Embedder | None = minilm_embedder() if embedder == "minilm" else None
        else:
            self._embed = embedder
        self.name = embedder if isinstance(embedder, str) else getattr(embedder, "__name__", "custom")
        self.exemplars: list[Exemplar] = []
        self._questions: set[str] = set()
        for exemplar in exemplars:
            self.add(exemplar.question, exemplar.program)

    def __len__(self) -> int:
        return len(self.exemplars)

    def add(self, question: str, program: str) -> bool:
        """Add a verified pair; False (and nothing added) when the question is already in the index."""
        if question in self._questions:
            return False
        self._questions.add(question)
        self.exemplars.append(Exemplar(question, program))
        return True

    def similarities(self, queries: list[str]) -> np.ndarray:
        """Cosine similarity [len(queries), len(self)] of each query to each indexed question."""
        pool = [e.question for e in self.exemplars]
        if not pool or not queries:
            return np.zeros((len(queries), len(pool)))
        if self._embed is None:
            return _tfidf_similarities(pool, queries)
        return np.asarray(self._embed(list(queries)), np.float64) @ np.asarray(self._embed(pool), np.float64).T

    def nearest(self, queries: list[str], k: int) -> list[list[Exemplar]]:
        """For each query, the (at most) k most similar exemplars, most similar first; never the query itself."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise UserError(f"exemplars: expected a whole number >= 0 of exemplars per prompt, got {k!r}")
        if k == 0 or not self.exemplars:
            return [[] for _ in queries]
        scores = self.similarities(queries)
        out = []
        for row, query in zip(scores, queries, strict=True):
            order = sorted(range(len(row)), key=lambda j: (-row[j], j))
            out.append([self.exemplars[j] for j in order if self.exemplars[j].question != query][:k])
        return out


def exemplar_records(rows: Sequence[dict[str, Any]], *, question: str = "prompt",
                     program: str = "completion") -> list[Exemplar]:
    """Exemplars from verified dataset rows (e.g. the output of `potstill generate --filter program`)."""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row.get(question), str) or not isinstance(row.get(program), str):
            raise UserError(f"exemplar row {i + 1}: expected text fields {question!r} and {program!r}")
        out.append(Exemplar(row[question], row[program]))
    return out
