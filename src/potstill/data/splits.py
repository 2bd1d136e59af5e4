"""Interpolation vs extrapolation splits of a query set, by query-embedding similarity.

Zhan et al. (2022), "Evaluating Interpolation and Extrapolation Performance of Neural Retrieval Models"
(ReSTrain / ReSTTest; code and resampled qrels: `jingtaozhan/extrapolate-eval`, the resampling script is not
released). A retriever that only memorises its training queries does well on test queries that resemble
them (interpolation) and badly on unseen topics (extrapolation); a single random split mixes the two.

Here (cosine similarity of the given query embeddings throughout):
- `extrapolation_split` — ReSTTest style: k-means the queries into K buckets (default K = 5, as in the
  paper) and hold one bucket out as the test set; its queries are far from every training query.
- `random_split` — the interpolation control: a uniform random test set of a given size.
- `interpolation_extrapolation_splits` — both, with the same test size, and the mean over test queries of
  their highest similarity to any training query for each, so the gap is visible.
- `restrain_train_sets` — ReSTrain style: for a fixed test set, a training set made of each test query's
  nearest training-pool queries (interpolation) and a size-matched random one that excludes them
  (extrapolation).
Everything is deterministic under `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from potstill.data.tas_balanced import as_matrix, kmeans_labels

#: ReSTTest's number of query buckets (folds).
DEFAULT_BUCKETS = 5
#: Rows of test queries per block when computing the max-similarity to the training set.
_SIM_BLOCK = 1024


@dataclass(frozen=True)
class Split:
    """A train/test split: sorted, disjoint index arrays, and how close the test queries are to training.

    `mean_max_similarity` is the mean over test queries of max_{train j} cos(test query, training query j).
    """

    kind: str
    train: np.ndarray
    test: np.ndarray
    mean_max_similarity: float


@dataclass(frozen=True)
class SplitPair:
    """An interpolation (random) and an extrapolation (held-out cluster) split with the same test size."""

    interpolation: Split
    extrapolation: Split

    @property
    def similarity_gap(self) -> float:
        """Mean max-similarity of the interpolation test set minus that of the extrapolation test set."""
        return self.interpolation.mean_max_similarity - self.extrapolation.mean_max_similarity

    def summary(self) -> dict[str, float | int]:
        """Sizes and mean max-similarities, for a table or a log line."""
        return {"n_train": int(self.interpolation.train.size), "n_test": int(self.interpolation.test.size),
                "interpolation_mean_max_similarity": self.interpolation.mean_max_similarity,
                "extrapolation_mean_max_similarity": self.extrapolation.mean_max_similarity,
                "similarity_gap": self.similarity_gap}


def _unit_rows(embeddings: Any) -> np.ndarray:
    x = as_matrix(embeddings).astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"query embedding row {bad} is all zeros; cosine similarity needs non-zero vectors")
    return x / norms


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _indices(idx: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D array of integer row indices, got shape {arr.shape}, "
                         f"dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name} holds indices outside [0, {n}) (the number of query embeddings)")
    if np.unique(arr).size != arr.size:
        raise ValueError(f"{name} holds repeated indices")
    return arr


def max_similarity_to_train(embeddings: Any, train: Any, test: Any) -> np.ndarray:
    """Per test query (in the order of `test`), its highest cosine similarity to any query of `train`."""
    unit = _unit_rows(embeddings)
    train = _indices(train, unit.shape[0], "train")
    test = _indices(test, unit.shape[0], "test")
    if train.size == 0:
        raise ValueError("train is empty; the max-similarity to the training set needs at least one query")
    ref = unit[train]
    out = np.empty(test.size, dtype=np.float64)
    for start in range(0, test.size, _SIM_BLOCK):
        block = test[start:start + _SIM_BLOCK]
        out[start:start + block.size] = (unit[block] @ ref.T).max(axis=1)
    return out


def _split(kind: str, unit: np.ndarray, test: np.ndarray) -> Split:
    mask = np.zeros(unit.shape[0], dtype=bool)
    mask[test] = True
    train, test = np.flatnonzero(~mask), np.flatnonzero(mask)
    sims = max_similarity_to_train(unit, train, test)
    return Split(kind, train, test, float(sims.mean()))


def query_buckets(embeddings: Any, n_buckets: int = DEFAULT_BUCKETS, *, seed: int = 0) -> np.ndarray:
    """Bucket id in [0, n_buckets) per query: k-means on L2-normalised embeddings (ReSTTest's clustering)."""
    unit = _unit_rows(embeddings)
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, (int, np.integer)) or n_buckets < 2:
        raise ValueError(f"n_buckets must be an integer >= 2, got {n_buckets!r}")
    if n_buckets > unit.shape[0]:
        raise ValueError(f"n_buckets={n_buckets} exceeds the number of queries ({unit.shape[0]})")
    labels = kmeans_labels(unit, int(n_buckets), _check_seed(seed), n_init=3)
    if np.unique(labels).size < n_buckets:
        raise ValueError(f"k-means found fewer than {n_buckets} distinct buckets (too many duplicate queries?)")
    return labels


def extrapolation_split(embeddings: Any, *, n_buckets: int = DEFAULT_BUCKETS, fold: int = 0,
                        seed: int = 0) -> Split:
    """Hold out one query bucket: test = bucket `fold` of `query_buckets`, train = all other buckets.

    Buckets are numbered by size, largest first, so `fold=0` holds out the largest topic. Averaging a metric
    over `fold = 0 … n_buckets − 1` gives ReSTTest's extrapolation score.
    """
    unit = _unit_rows(embeddings)
    labels = query_buckets(unit, n_buckets, seed=seed)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < n_buckets:
        raise ValueError(f"fold must be an integer in [0, {n_buckets}), got {fold!r}")
    sizes = np.bincount(labels, minlength=n_buckets)
    by_size = np.argsort(-sizes, kind="stable")
    return _split("extrapolation", unit, np.flatnonzero(labels == by_size[fold]))


def random_split(embeddings: Any, n_test: int, *, seed: int = 0) -> Split:
    """A uniformly random test set of `n_test` queries (the interpolation control), train = the rest."""
    unit = _unit_rows(embeddings)
    n = unit.shape[0]
    if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)) or not 1 <= n_test < n:
        raise ValueError(f"n_test must be an integer in [1, {n}) (the number of queries), got {n_test!r}")
    rng = np.random.default_rng((_check_seed(seed), 25))
    return _split("interpolation", unit, rng.choice(n, size=int(n_test), replace=False))


def interpolation_extrapolation_splits(embeddings: Any, *, n_buckets: int = DEFAULT_BUCKETS, fold: int = 0,
                                       seed: int = 0) -> SplitPair:
    """The held-out-bucket split of `extrapolation_split` and a random split with the same test size."""
    extrapolation = extrapolation_split(embeddings, n_buckets=n_buckets, fold=fold, seed=seed)
    interpolation = random_split(embeddings, int(extrapolation.test.size), seed=seed)
    return SplitPair(interpolation=interpolation, extrapolation=extrapolation)


def restrain_train_sets(embeddings: Any, pool: Any, test: Any, *, n_neighbors: int = 5,
                        seed: int = 0) -> tuple[Split, Split]:
    """ReSTrain: two size-matched training sets drawn from `pool` for the fixed test set `test`.

    Interpolation: the union of every test query's `n_neighbors` most similar pool queries. Extrapolation: a
    random sample of the same size from the pool queries outside that union. (The paper gives only the
    resulting MS MARCO sizes, 14k / 45k / 200k, not the neighbour count; `n_neighbors=5` is this library's
    choice.) Returns `(interpolation, extrapolation)`; both share `test`.
    """
    unit = _unit_rows(embeddings)
    n = unit.shape[0]
    pool = _indices(pool, n, "pool")
    test = _indices(test, n, "test")
    if np.intersect1d(pool, test).size:
        raise ValueError("pool and test overlap; the training pool must exclude the test queries")
    if pool.size == 0 or test.size == 0:
        raise ValueError("pool and test must both be non-empty")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}")
    k = min(int(n_neighbors), pool.size)
    near: set[int] = set()
    ref = unit[pool]
    for start in range(0, test.size, _SIM_BLOCK):
        sims = unit[test[start:start + _SIM_BLOCK]] @ ref.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < pool.size else np.tile(np.arange(pool.size),
                                                                                            (sims.shape[0], 1))
        near.update(pool[top.ravel()].tolist())
    interp = np.array(sorted(near), dtype=np.int64)
    rest = np.setdiff1d(pool, interp)
    if rest.size < interp.size:
        raise ValueError(f"the pool has {rest.size} queries outside the test queries' {interp.size} nearest "
                         "neighbours, too few for a size-matched extrapolation set; use a larger pool or a "
                         "smaller n_neighbors")
    rng = np.random.default_rng((_check_seed(seed), 26))
    extrap = np.sort(rng.choice(rest, size=interp.size, replace=False))
    test_sorted = np.sort(test)

    def build(kind: str, train: np.ndarray) -> Split:
        sims = max_similarity_to_train(unit, train, test_sorted)
        return Split(kind, train, test_sorted, float(sims.mean()))

    return build("interpolation", interp), build("extrapolation", extrap)
