"""TAS-Balanced: topic-aware query batches with balanced teacher-margin pair sampling.

Hofstätter, Lin, Yang, Lin, Hanbury (2021), "Efficiently Teaching an Effective Dense Retriever with Balanced
Topic Aware Sampling", SIGIR. Official loader: `sebastian-hofstaetter/matchmaker`,
matchmaker/dataloaders/tas_balanced_training_loader.py (read for the definitions below).

The method, as implemented here:
1. Once, before training, cluster the training queries by their embedding from a baseline dense retriever
   (k-means; the paper's k = 2000, capped here at the number of queries).
2. For each query, put its (positive, negative) training pairs into `h = 10` equal-width bins of the teacher
   margin t⁺ − t⁻ over that query's own [min, max] margin range; the maximum falls in the last bin, and a
   query whose margins are all equal has them all in one bin.
3. Each batch takes its queries from one cluster; for each query, pick one of its non-empty bins uniformly,
   then one pair of that bin uniformly. Wide-margin and narrow-margin pairs are then seen equally often
   however skewed the teacher's margin distribution is.

Where this sampler departs from the official loader (which draws batches endlessly, each time from a
uniformly chosen cluster, sampling queries with replacement across batches):
- It has epochs. In epoch e every cluster's queries are shuffled and cut into chunks of `batch_size`
  (without replacement inside the cluster until it is exhausted), and the chunks of all clusters are shuffled
  into the epoch's batch order, so the cluster of each batch is random and every query is visited once per
  epoch. `len(sampler)` is the number of batches per epoch.
- A cluster whose remaining queries do not fill a batch (a small cluster, or the tail of a large one) gives
  a *short batch* (`short_batches="keep"`, the default: the batch stays single-topic and no query repeats).
  The official loader instead tops the batch up with queries of another random cluster, which breaks the
  one-cluster-per-batch rule; `short_batches="fill"` tops it up with queries drawn with replacement from the
  same cluster (those queries repeat, each with its own pair draw — beware of duplicate in-batch negatives).
- The official loader clusters with the FAISS IVF coarse quantiser and keeps only queries with >= 2 pairs
  (a side effect of its binning); here scikit-learn k-means is used (or pass your own `clusters`, e.g. FAISS
  IVF assignments) and queries with fewer than `min_pairs` (default 1) pairs are left out.

Randomness: the plan of epoch e comes from the seed and e, and the pairs of batch b from the seed, e and b,
so the sampler's whole state is (seed, epoch, position). `state_dict()` / `load_state_dict()` carry it, and a
resumed sampler yields exactly the batches an uninterrupted one would have yielded next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np

#: The paper's number of query clusters (k-means over ~400k MS MARCO training queries) [mem].
DEFAULT_CLUSTERS = 2000
#: The paper's and official loader's number of equal-width teacher-margin bins per query.
DEFAULT_BINS = 10
#: Batch size of the paper's main experiments (the released model used 256).
DEFAULT_BATCH_SIZE = 32
SHORT_BATCH_POLICIES = ("keep", "fill")
_STATE_FORMAT = 1
# Stream tags keep the epoch-plan and per-batch random streams apart.
_PLAN_STREAM, _PAIR_STREAM = 1, 2

Pair = tuple[Any, Any, float]
Item = tuple[int, Any, Any]


def as_matrix(x: Any, name: str = "query_embeddings") -> np.ndarray:
    """`x` (numpy array, torch tensor or nested lists) as a finite float (N, d) numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()  # numpy has no bfloat16
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (n_queries, dim), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32 if arr.dtype == np.float32 else np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def kmeans_labels(x: np.ndarray, n_clusters: int, seed: int, *, n_init: int = 1) -> np.ndarray:
    """Cluster id in [0, n_clusters) per row of `x`: scikit-learn k-means (k-means++ init), fixed by `seed`."""
    from sklearn.cluster import KMeans

    if n_clusters == 1:
        return np.zeros(x.shape[0], dtype=np.int64)
    model = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    return model.fit_predict(x).astype(np.int64)


def margin_bins(margins: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """Bin in [0, n_bins) of each margin: equal-width bins over [min, max] of `margins`, max in the last bin.

    This is the binning of the official loader (np.digitize against edges min, min + w, …, min + (h−1)·w,
    w = (max − min)/h); equal margins all land in bin 0.
    """
    margins = np.asarray(margins, dtype=np.float64)
    lo, hi = float(margins.min()), float(margins.max())
    if hi <= lo:
        return np.zeros(margins.shape, dtype=np.int64)
    idx = np.floor((margins - lo) / (hi - lo) * n_bins).astype(np.int64)
    return np.clip(idx, 0, n_bins - 1)


def _check_pairs(pairs: Sequence[Sequence[Pair]], n_queries: int) -> list[list[Pair]]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise ValueError("pairs must be a sequence with one list of (positive, negative, teacher_margin) "
                         f"tuples per query, got {type(pairs).__name__}")
    if len(pairs) != n_queries:
        raise ValueError(f"pairs has {len(pairs)} entries but query_embeddings has {n_queries} rows; "
                         "expected one pair list per query, in row order")
    out: list[list[Pair]] = []
    for q, plist in enumerate(pairs):
        if isinstance(plist, (str, bytes)) or not isinstance(plist, Sequence):
            raise ValueError(f"pairs[{q}] must be a list of (positive, negative, teacher_margin) tuples, "
                             f"got {type(plist).__name__}")
        rows: list[Pair] = []
        for j, pair in enumerate(plist):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 3:
                raise ValueError(f"pairs[{q}][{j}] must be a (positive, negative, teacher_margin) tuple, "
                                 f"got {pair!r}")
            try:
                margin = float(pair[2])
            except (TypeError, ValueError):
                raise ValueError(f"pairs[{q}][{j}]: the teacher margin (third field) must be a number, "
                                 f"got {pair[2]!r}") from None
            if not np.isfinite(margin):
                raise ValueError(f"pairs[{q}][{j}]: the teacher margin must be finite, got {margin}")
            rows.append((pair[0], pair[1], margin))
        out.append(rows)
    return out


class TopicBalancedSampler:
    """Batches of (query_index, positive, negative) items, TAS-Balanced style (Hofstätter et al., 2021).

    Inputs:
    - `query_embeddings`: (Q, d) array or tensor, one row per training query, from a baseline dense
      retriever (or the teacher); used only to cluster the queries.
    - `pairs`: a sequence of Q lists; `pairs[q]` holds the training pairs of query q as
      `(positive, negative, teacher_margin)` tuples, with `teacher_margin = t⁺ − t⁻` (the teacher's score of
      the positive minus its score of the negative). `positive` / `negative` are passed through untouched:
      document ids, texts, or anything else your collator understands.

    Each batch is a list of `(q, positive, negative)` tuples whose queries all belong to one cluster (see the
    module docstring for the epoch plan and the short-batch policy). Defaults: `n_clusters=2000` (capped at
    the number of usable queries), `n_bins=10`, `batch_size=32`, `short_batches="keep"`.
    `clusters`, if given, is a cluster id per query (length Q) used instead of k-means; `normalize=True`
    L2-normalises the embeddings before k-means (cosine geometry).

    Iterating yields the remaining batches of the current epoch and then moves to the next epoch, so
    `for batch in sampler` once per epoch works with or without `set_epoch`. Call `set_epoch`,
    `load_state_dict` only between iterations. As a `batch_sampler` of a torch DataLoader it hands each
    `(q, positive, negative)` to the dataset's `__getitem__`; with worker processes prefetching, checkpoint
    the loop's own count of consumed batches instead of this object's position.
    """

    def __init__(self, query_embeddings: Any, pairs: Sequence[Sequence[Pair]], batch_size: int = DEFAULT_BATCH_SIZE,
                 *, n_clusters: int = DEFAULT_CLUSTERS, n_bins: int = DEFAULT_BINS, seed: int = 0,
                 short_batches: str = "keep", min_pairs: int = 1, clusters: Sequence[Hashable] | None = None,
                 normalize: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
        if isinstance(min_pairs, bool) or not isinstance(min_pairs, (int, np.integer)) or min_pairs < 1:
            raise ValueError(f"min_pairs must be an integer >= 1, got {min_pairs!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if short_batches not in SHORT_BATCH_POLICIES:
            raise ValueError(f"short_batches must be one of {SHORT_BATCH_POLICIES}, got {short_batches!r}")
        emb = as_matrix(query_embeddings)
        n_queries = emb.shape[0]
        self.batch_size, self.n_bins, self.seed = int(batch_size), int(n_bins), int(seed)
        self.short_batches = short_batches
        self._pairs = _check_pairs(pairs, n_queries)

        kept = np.array([q for q in range(n_queries) if len(self._pairs[q]) >= min_pairs], dtype=np.int64)
        if kept.size == 0:
            raise ValueError(f"no query has at least min_pairs={min_pairs} training pair(s); "
                             "expected a non-empty pair list for some queries")
        if clusters is not None:
            labels = self._given_labels(clusters, n_queries)[kept]
        else:
            x = emb[kept]
            if normalize:
                norms = np.linalg.norm(x, axis=1, keepdims=True)
                if (norms == 0).any():
                    raise ValueError("normalize=True but some query embeddings are all zeros")
                x = x / norms
            labels = kmeans_labels(x, min(int(n_clusters), kept.size), self.seed)
        # Clusters in order of first appearance; empty ones never exist here.
        self.cluster_of = np.full(n_queries, -1, dtype=np.int64)
        self.clusters: list[np.ndarray] = []
        for lab in dict.fromkeys(labels.tolist()):
            members = kept[labels == lab]
            self.cluster_of[members] = len(self.clusters)
            self.clusters.append(members)
        self.queries = kept

        # Per query: its non-empty margin bins, each an array of indices into pairs[q].
        self._bins: dict[int, list[np.ndarray]] = {}
        for q in kept.tolist():
            ids = margin_bins(np.array([p[2] for p in self._pairs[q]]), self.n_bins)
            self._bins[q] = [np.flatnonzero(ids == b) for b in range(self.n_bins) if (ids == b).any()]

        self._len = sum(-(-c.size // self.batch_size) for c in self.clusters)
        self._fingerprint = self._make_fingerprint()
        self._epoch, self._position = 0, 0
        self._plan: list[np.ndarray] | None = None
        self._plan_epoch = -1

    @staticmethod
    def _given_labels(clusters: Sequence[Hashable], n_queries: int) -> np.ndarray:
        if isinstance(clusters, (str, bytes)) or len(clusters) != n_queries:
            raise ValueError(f"clusters must give one cluster id per query ({n_queries}), "
                             f"got {len(clusters) if not isinstance(clusters, (str, bytes)) else 'a string'}")
        ids: dict[Hashable, int] = {}
        try:
            return np.array([ids.setdefault(c, len(ids)) for c in np.asarray(clusters).tolist()], dtype=np.int64)
        except TypeError:
            raise ValueError("clusters must hold hashable cluster ids (ints or strings)") from None

    def _make_fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.batch_size}|{self.n_bins}|{self.short_batches}|{len(self._pairs)}".encode())
        h.update(self.cluster_of.tobytes())
        for q in self.queries.tolist():
            h.update(np.array([p[2] for p in self._pairs[q]], dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ plan
    def _epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """Query indices of every batch of `epoch`, in order (cached for the current epoch)."""
        if self._plan is not None and self._plan_epoch == epoch:
            return self._plan
        rng = np.random.default_rng((_PLAN_STREAM, self.seed, epoch, 0))
        chunks: list[np.ndarray] = []
        for members in self.clusters:
            order = members[rng.permutation(members.size)]
            for start in range(0, order.size, self.batch_size):
                chunk = order[start:start + self.batch_size]
                if chunk.size < self.batch_size and self.short_batches == "fill":
                    extra = members[rng.integers(0, members.size, self.batch_size - chunk.size)]
                    chunk = np.concatenate([chunk, extra])
                chunks.append(chunk)
        plan = [chunks[i] for i in rng.permutation(len(chunks))]
        self._plan, self._plan_epoch = plan, epoch
        return plan

    def _batch(self, epoch: int, index: int, queries: np.ndarray) -> list[Item]:
        rng = np.random.default_rng((_PAIR_STREAM, self.seed, epoch, index))
        out: list[Item] = []
        for q in queries.tolist():
            bins = self._bins[q]
            chosen = bins[int(rng.integers(len(bins)))]
            pos, neg, _ = self._pairs[q][int(chosen[int(rng.integers(chosen.size))])]
            out.append((q, pos, neg))
        return out

    def epoch_batches(self, epoch: int) -> list[list[Item]]:
        """Every batch of `epoch` in order, as iterating that epoch yields them, without moving the iterator:
        a pure function of (seed, epoch), which is how a training loop that counts its steps resumes."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        return [self._batch(int(epoch), i, queries) for i, queries in enumerate(self._epoch_plan(int(epoch)))]

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        """Batches per epoch: Σ over clusters of ⌈cluster size / batch_size⌉."""
        return self._len

    def __iter__(self) -> Iterator[list[Item]]:
        if self._position >= self._len:  # resumed right after an epoch's last batch
            self._epoch, self._position = self._epoch + 1, 0
        epoch = self._epoch
        plan = self._epoch_plan(epoch)
        while self._epoch == epoch and self._position < len(plan):
            index = self._position
            batch = self._batch(epoch, index, plan[index])
            self._position = index + 1
            yield batch
        if self._epoch == epoch and self._position >= len(plan):
            self._epoch, self._position = epoch + 1, 0

    @property
    def epoch(self) -> int:
        """The epoch whose batches the next iteration yields."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._position

    @property
    def n_clusters(self) -> int:
        """Number of (non-empty) query clusters in use."""
        return len(self.clusters)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch at the next iteration."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._epoch, self._position = int(epoch), 0

    def nonempty_bins(self, query: int) -> list[np.ndarray]:
        """The non-empty margin bins of `query`: arrays of indices into its pair list, lowest margin first."""
        if query not in self._bins:
            raise ValueError(f"query {query} is not sampled (no such row, or fewer pairs than min_pairs)")
        return [b.copy() for b in self._bins[query]]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: seed, epoch, batches already yielded, and a fingerprint of the data."""
        return {"format": _STATE_FORMAT, "seed": self.seed, "epoch": self._epoch, "position": self._position,
                "batches_per_epoch": self._len, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; refused when it was written for other pairs, clusters or settings."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from TopicBalancedSampler.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("format", "seed", "epoch", "position", "fingerprint") if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks {missing}; expected the dict from TopicBalancedSampler.state_dict()")
        if state["format"] != _STATE_FORMAT:
            raise ValueError(f"sampler state has format {state['format']!r}, expected {_STATE_FORMAT}")
        if state["fingerprint"] != self._fingerprint:
            raise ValueError("sampler state was written for different pairs, clusters, batch_size, n_bins or "
                             f"short_batches (fingerprint {state['fingerprint']!r}, this sampler "
                             f"{self._fingerprint!r})")
        seed, epoch, position = state["seed"], state["epoch"], state["position"]
        for name, value in (("seed", seed), ("epoch", epoch), ("position", position)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"sampler state field {name} must be a non-negative integer, got {value!r}")
        if position > self._len:
            raise ValueError(f"sampler state position {position} is past the {self._len} batches of an epoch")
        self.seed, self._epoch, self._position = int(seed), int(epoch), int(position)
        self._plan, self._plan_epoch = None, -1


# ------------------------------------------------------------------ ranking-task wiring
QUERIES_PER_CLUSTER = 200  # TAS-B: 2,000 clusters for MS MARCO's ~400k training queries


def cluster_count(n_queries: int, clusters: int | None = None) -> int:
    """Query clusters k: `clusters` when given, else one per `QUERIES_PER_CLUSTER` queries (at least 1), at
    most one per query."""
    return min(n_queries, clusters or max(1, n_queries // QUERIES_PER_CLUSTER))


class TasBalancedEpochs:
    """TAS-Balanced training over (query, positive, negative) records, one per negative of each query.

    From `queries` (records with `query`, `positive` and N `negatives`), the teacher's (Q, 1 + N) candidate
    scores `query_scores` (positive first) and a cluster id per query: `records` holds the Q·N pair records
    (query q's j-th negative at q·N + j), `query_of` each pair record's query, `pair_scores` its teacher scores
    (P, 2) of (positive, negative), and `order(epoch, batch_size)` the pair records of
    `TopicBalancedSampler.epoch_batches(epoch)` flattened (short clusters filled with repeats of their own
    queries), a pure function of (seed, epoch)."""

    def __init__(self, queries: list[dict], query_scores: Any, clusters: Sequence[Hashable], *,
                 n_bins: int = DEFAULT_BINS, seed: int = 0) -> None:
        import torch

        n_neg = len(queries[0]["negatives"])
        self.records = [{"query": rec["query"], "positive": rec["positive"], "negatives": [neg]}
                        for rec in queries for neg in rec["negatives"]]
        self.query_of = [q for q in range(len(queries)) for _ in range(n_neg)]
        self.pair_scores = torch.stack([query_scores[:, :1].expand(-1, n_neg), query_scores[:, 1:]],
                                       dim=-1).reshape(-1, 2)
        margins = (query_scores[:, :1] - query_scores[:, 1:]).tolist()
        self._pairs = [[(q * n_neg + j, None, m) for j, m in enumerate(row)] for q, row in enumerate(margins)]
        self.clusters, self.n_bins, self.seed = list(clusters), n_bins, seed
        self._sampler: TopicBalancedSampler | None = None

    def order(self, epoch: int, batch_size: int) -> list[int]:
        """Indices into `records` in the order epoch `epoch` visits them, `batch_size` per topic batch."""
        if self._sampler is None or self._sampler.batch_size != batch_size:
            self._sampler = TopicBalancedSampler(np.zeros((len(self._pairs), 1), dtype=np.float32), self._pairs,
                                                 batch_size, clusters=self.clusters, n_bins=self.n_bins,
                                                 seed=self.seed, short_batches="fill")
        return [pair for batch in self._sampler.epoch_batches(epoch) for _, pair, _ in batch]
