"""Ranking: teacher and student score (query, passage) pairs; the student learns the teacher's scores.

Records: `query`, `positive` (a relevant passage) and optionally `negatives` (a list of passages, the same
number for every record). The collection is every distinct positive of the data plus `data.collection`'s
passages. Relevance (`ranking.relevance`): a record's own positive, or (`query`) every positive given for the
same query text, so several records per query act as qrels. Records without negatives get
`ranking.negatives` of them mined from the collection by a bi-encoder, searched with an exact FAISS
inner-product index: the teacher's top ranks, or the untrained student's when the teacher is a
cross-encoder; relevant passages are skipped.

Each query's candidates are `[positive, *negatives]`, and the signal of a batch is the (B, 1 + N) matrix of
scores, positive first:
- a cross-encoder (an HF sequence classifier with one logit) scores each (query, passage) pair;
- a bi-encoder (HF encoder + `pooling`) scores `similarity(q, p)`: dot product or cosine of pooled vectors.
The teacher's scores of the training candidates are computed once per run and cached with a manifest
(`<run>/teacher_cache/`). Objectives of kind "scores" read the matrix: `margin_mse` (positive vs every
negative), `listwise_kl` (over the candidates), `pointwise_mse`; the hard-label loss is contrastive
cross-entropy with the positive as the class.

Metrics on held-out records: reranking each query's candidates (MRR@10, Kendall τ and top-1 agreement with
the teacher's order); for a bi-encoder, retrieval over the whole collection (MRR@10, nDCG@10, Recall@10 of
the query's positive; with a bi-encoder teacher also the overlap of the student's top 10 with the teacher's);
queries per second of teacher and student.

In-batch scores: with the `in_batch_margin_mse` objective or `ranking.in_batch_negatives`, a bi-encoder
student also scores every query against every positive of the batch, (B, B) with the own positive on the
diagonal; pairs whose passage is relevant to the query (its own positive, or any of its positives with
`ranking.relevance: query`) are masked. The teacher's (B, B) come from its
cached query and positive vectors (a bi-encoder teacher) or are scored live (a cross-encoder teacher, B²
pairs per batch, as TAS-B's online in-batch teacher).

`ranking.sampler: tas_balanced` (TAS-Balanced): the training unit becomes one (query, positive, negative)
pair, the queries are clustered once by k-means on the teacher's query vectors (the untrained student's
when the teacher is a cross-encoder; cluster ids cached in `<run>/tas_clusters/`), and each epoch is
`TopicBalancedSampler`'s: every global batch from one cluster, every query once, its negative drawn
uniformly over `tas_bins` bins of the teacher margin. Clusters smaller than a batch are filled with repeats
of their own queries (whose in-batch pairs the mask drops). The epoch order is a pure function of (seed,
epoch), so a resumed run replays it.

`ranking.towers: separate` gives a bi-encoder student two encoders, `query` and `passage` (`DualEncoder`).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.data import fingerprint_records
from potstill.errors import UserError
from potstill.signals import RankingScores
from potstill.tasks.base import Task, cached_tensor
from potstill.tasks.embedding import encode_texts, pool
from potstill.tasks.models import build_student, freeze_pooler, load_hf_teacher, resolve_model_path

CACHE_FORMAT = 1
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
QUERIES_PER_CLUSTER = 200  # TAS-B: 2,000 clusters for MS MARCO's ~400k training queries


class ScoresObjective:
    """A score loss of `potstill.losses` applied to one part of `RankingScores`: the candidates, or (for
    `in_batch_margin_mse`) the in-batch matrix with its mask."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor]) -> None:
        self.name, self.in_batch = name, name == "in_batch_margin_mse"
        self.fn = margin_mse_over_candidates if name == "margin_mse" else fn

    def __call__(self, student: RankingScores, teacher: RankingScores, **kwargs: Any) -> torch.Tensor:
        if self.in_batch:
            if student.in_batch is None or teacher.in_batch is None:
                raise RuntimeError("in_batch_margin_mse got no in-batch scores; the ranking task computes them "
                                   "when the recipe lists this objective")
            return self.fn(student.in_batch, teacher.in_batch, mask=student.in_batch_mask, **kwargs)
        return self.fn(student.candidates, teacher.candidates, **kwargs)


class DualEncoder(nn.Module):
    """A bi-encoder with separate query and passage towers (`ranking.towers: separate`). `forward(query,
    passage)` runs both on their input dicts in one call (so that a DDP wrapper sees one forward per step)."""

    def __init__(self, query: nn.Module, passage: nn.Module) -> None:
        super().__init__()
        self.query, self.passage = query, passage

    def forward(self, query: dict[str, torch.Tensor], passage: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        return self.query(**query), self.passage(**passage)


def _joined_inputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Two tokenised batches as one, right-padded to the longer length (pad id, mask 0, token type 0)."""
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def padded(x: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    return {k: torch.cat([padded(a[k], pad_id if k == "input_ids" else 0), padded(b[k], pad_id if k == "input_ids"
                                                                                  else 0)]) for k in a}


def margin_mse_over_candidates(student_scores: torch.Tensor, teacher_scores: torch.Tensor, *,
                               reduction: str = "mean") -> torch.Tensor:
    """`margin_mse` on (B, 1 + N) candidate scores whose first column is the positive."""
    from potstill.losses import margin_mse

    if student_scores.dim() != 2 or student_scores.shape[1] < 2:
        raise ValueError(f"candidate scores must have shape (B, 1 + N) with N ≥ 1, got {tuple(student_scores.shape)}")
    return margin_mse(student_scores[:, 0], student_scores[:, 1:], teacher_scores[:, 0], teacher_scores[:, 1:],
                      reduction=reduction)


def _is_cross_encoder_config(path: str) -> bool:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _active_terms(weights: torch.Tensor) -> float:
    """Mean number of non-zero terms per row of sparse vectors."""
    return float((weights > 0).sum(1).float().mean()) if weights.numel() else 0.0


class RankingTask(Task):
    signal_kind = "scores"
    name = "ranking"

    def adapt_objective(self, name: str, fn: Any) -> Any:
        """Score losses read the candidates (B, 1 + N) or, for in_batch_margin_mse, the in-batch (B, B)."""
        return ScoresObjective(name, fn)

    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        from transformers import AutoModel, AutoModelForSequenceClassification

        r, rk = self.recipe, self.recipe.ranking
        self.score_files = []
        if rk.teacher_scores is not None:
            from potstill.teachers.score_file import ScoreFile

            paths = [rk.teacher_scores] if isinstance(rk.teacher_scores, str) else rk.teacher_scores
            self.score_files = [ScoreFile.load(path) for path in paths]
        elif r.teacher.path is None:
            raise UserError("field teacher.path: the ranking task needs a Hugging Face teacher (a cross-encoder or a "
                            "bi-encoder folder) or a file of its scores (ranking.teacher_scores)")
        self.student_type = rk.student_type
        self.in_batch = rk.in_batch_negatives or any(o.name == "in_batch_margin_mse" for o in r.objectives)
        self._check_kinds()
        if r.teacher.path is not None:
            path = resolve_model_path(r.teacher.path, field="teacher.path")
            self.teacher_type = rk.teacher_type
            if self.teacher_type == "auto":
                self.teacher_type = "cross_encoder" if _is_cross_encoder_config(path) else "bi_encoder"
            teacher_cls = AutoModelForSequenceClassification if self.teacher_type == "cross_encoder" else AutoModel
            self.teacher, self.tokenizer = load_hf_teacher(path, teacher_cls)
            if self.teacher_type == "cross_encoder" and self.teacher.config.num_labels != 1:
                raise UserError(f"field teacher.path: a cross-encoder teacher must have one output logit "
                                f"(num_labels=1); {path} has {self.teacher.config.num_labels}")
            self.teacher.to(self.device)
        else:
            self._no_teacher_model()
        self.student = self._build_student()
        self.queries = self._records(self.load(r.data.train, required=("query", "positive")), "data.train")
        self.eval_records = (self._records(self.load(r.data.eval, required=("query", "positive")), "data.eval")
                             if r.data.eval else [])
        extra = []
        if r.data.collection is not None:
            rows = self.load(r.data.collection)
            key = "passage" if rows and "passage" in rows[0] else "text"
            for i, row in enumerate(rows):
                if not isinstance(row.get(key), str):
                    raise UserError(f"data.collection: record {i + 1}: expected a `passage` (or `text`) string")
            extra = [row[key] for row in rows]
        self.collection = sorted({rec["positive"] for rec in self.queries + self.eval_records} | set(extra))
        self.relevant: dict[str, set[str]] = {}
        for rec in self.queries + self.eval_records:
            self.relevant.setdefault(rec["query"], set()).add(rec["positive"])
        if rk.inference_free:
            from potstill.students.splade import idf_from_collection

            self.student.query.idf.copy_(idf_from_collection(self.tokenizer, self.collection,
                                                             vocab_size=self.student.query.idf.numel()))
        if self.student_type == "splade":
            self._calibrate_new_head()
        self._mine_negatives(self.queries)
        self._mine_negatives(self.eval_records)
        self.train_records = self.queries
        self.query_scores = self._teacher_cache(is_main=is_main, barrier=barrier)
        self.teacher_cache = self.query_scores
        self._query_of = list(range(len(self.queries)))
        self.teacher_vectors = (self._teacher_vectors(is_main=is_main, barrier=barrier)
                                if self.in_batch and self.teacher_type == "bi_encoder" else None)
        self._sampler: Any = None
        if rk.sampler == "tas_balanced":
            self._setup_tas_balanced(is_main=is_main, barrier=barrier)
        self._eval_cache: dict[str, Any] | None = None

    def _check_kinds(self) -> None:
        """Refuse combinations of student kind and options that cannot work, before anything loads."""
        rk, bi = self.recipe.ranking, self.student_type != "cross_encoder"
        if not bi and (self.in_batch or rk.towers == "separate"):
            what = "in-batch scores" if self.in_batch else "ranking.towers: separate"
            raise UserError(f"field ranking.student_type: {what} need(s) a bi-encoder student; a cross-encoder "
                            f"scores only the pairs it is given")
        if rk.inference_free and self.student_type != "splade":
            raise UserError("field ranking.inference_free: only a splade student has an inference-free query side; "
                            "set ranking.student_type: splade")
        if self.student_type == "splade" and (rk.similarity != "dot" or rk.towers == "separate"):
            raise UserError("field ranking.student_type: a splade student scores by dot product with one encoder "
                            "(ranking.similarity: dot, towers: shared; for cheap queries use inference_free: true)")
        if self.in_batch and self.recipe.teacher.path is None:
            raise UserError("field teacher.path: in-batch teacher scores (in_batch_margin_mse) need a teacher model; "
                            "a score file holds only the pairs it lists")

    def _no_teacher_model(self) -> None:
        """Teacher scores only from ranking.teacher_scores: the tokenizer is the pretrained student's."""
        from transformers import AutoTokenizer

        cfg = self.recipe.student
        if cfg.init != "pretrained":
            raise UserError(f"field student.init: {cfg.init} builds the student from the teacher model, but the "
                            f"recipe gives only ranking.teacher_scores; use init: pretrained with student.path, or "
                            f"give teacher.path too")
        self.teacher, self.teacher_type = None, "scores"
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.path, field="student.path"))

    def _calibrate_new_head(self) -> None:
        """A splade student whose MLM head is new starts with ~128 active terms on the median passage of the
        collection (`calibrate_head_bias` on up to 256 of them), neither all terms nor a dead ReLU."""
        from potstill.students.splade import calibrate_head_bias

        encoder = self.student.passage if isinstance(self.student, DualEncoder) else self.student
        if getattr(encoder.mlm, "potstill_new_head", False):
            sample = self.to_device(self._tokenize(self.collection[:: max(1, len(self.collection) // 256)][:256]))
            calibrate_head_bias(encoder, **sample)

    def _build_student(self) -> nn.Module:
        from transformers import AutoModel, AutoModelForSequenceClassification

        cfg, rk = self.recipe.student, self.recipe.ranking
        if self.student_type == "splade":
            from potstill.students.splade import InferenceFreeQuery, splade_from_encoder

            if cfg.init == "pretrained":
                student = splade_from_encoder(resolve_model_path(cfg.path, field="student.path"))
            elif self.teacher_type != "bi_encoder":
                raise UserError(f"field student.init: {cfg.init} builds a splade student from a bi-encoder teacher's "
                                f"encoder; the teacher here is a {self.teacher_type.replace('_', '-')}: use init: "
                                f"pretrained (e.g. path: builtin:minilm)")
            else:
                student = splade_from_encoder(build_student(cfg, self.teacher, auto_cls=AutoModel))
            if rk.inference_free:
                return DualEncoder(query=InferenceFreeQuery(student.vocab_size, self.tokenizer.all_special_ids),
                                   passage=student)
            return student.train()
        same_kind = self.student_type == self.teacher_type
        if cfg.init in ("layers_from_teacher", "from_config") and not same_kind:
            raise UserError(f"field student.init: {cfg.init} builds a {self.teacher_type.replace('_', '-')} from "
                            f"the teacher, but ranking.student_type is {self.student_type}; use init: pretrained "
                            f"(e.g. path: builtin:minilm) or the teacher's kind")
        if cfg.init == "static":
            raise UserError("field student.init: static students are for the embedding task")
        if cfg.init == "pretrained" and self.student_type == "cross_encoder":
            path = resolve_model_path(cfg.path, field="student.path")
            try:
                student = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
            except (OSError, ValueError) as exc:
                raise UserError(f"field student.path: cannot load a cross-encoder from {path}: {exc}") from None
            return student.train()
        auto_cls = AutoModelForSequenceClassification if self.student_type == "cross_encoder" else AutoModel
        student = build_student(cfg, self.teacher, auto_cls=auto_cls)
        if self.student_type == "cross_encoder":
            return student
        freeze_pooler(student)
        if rk.towers == "separate":
            return DualEncoder(query=student, passage=copy.deepcopy(student))
        return student

    # ---- data
    def _records(self, records: list[dict], field: str) -> list[dict]:
        counts = {len(rec["negatives"]) for rec in records if rec.get("negatives") is not None}
        given = sum(rec.get("negatives") is not None for rec in records)
        if given and given != len(records):
            raise UserError(f"{field}: {given} of {len(records)} records have `negatives`; give them for every "
                            f"record, or for none (then {self.recipe.ranking.negatives} are mined per query)")
        for i, rec in enumerate(records):
            negatives = rec.get("negatives")
            if negatives is not None and (not isinstance(negatives, list) or not negatives
                                          or not all(isinstance(x, str) for x in negatives)):
                raise UserError(f"{field}: record {i + 1}: `negatives` must be a non-empty list of passages")
        if len(counts) > 1:
            raise UserError(f"{field}: every record needs the same number of negatives; found {sorted(counts)}")
        return [dict(rec) for rec in records]

    def _mine_negatives(self, records: list[dict]) -> None:
        """Give each record without negatives the top-ranked collection passages other than its positive."""
        todo = [rec for rec in records if rec.get("negatives") is None]
        if not todo:
            return
        n = self.recipe.ranking.negatives
        if len(self.collection) <= n:
            raise UserError(f"ranking.negatives is {n}, but the collection has only {len(self.collection)} distinct "
                            f"passages; lower ranking.negatives or give `negatives` in the data")
        use_teacher = self.recipe.ranking.mine_with == "teacher" and self.teacher_type == "bi_encoder"
        miner = self.teacher if use_teacher else self.student
        if self._is_cross(miner):
            raise UserError("mining negatives needs a bi-encoder teacher or student; give `negatives` in the data")
        passages = self.encode(miner, self.collection)
        queries = self.encode(miner, [rec["query"] for rec in todo], side="query")
        ranked = self._search(queries, passages, min(len(self.collection), n + 8))
        for rec, row in zip(todo, ranked, strict=True):
            relevant = self._relevant_to(rec)
            picks = [self.collection[j] for j in row if self.collection[j] not in relevant][:n]
            if len(picks) < n:  # positives among the top: take the next passages in collection order
                picks += [p for p in self.collection if p not in relevant and p not in picks][:n - len(picks)]
            rec["negatives"] = picks

    def _search(self, queries: torch.Tensor, passages: torch.Tensor, k: int) -> list[list[int]]:
        """Each query's top-k passages by `ranking.similarity`: an exact FAISS inner-product index (unit
        vectors for cosine), searched in blocks, so a large collection never needs a (Q, P) score matrix."""
        import faiss

        if self.recipe.ranking.similarity == "cosine":
            queries, passages = nn.functional.normalize(queries, dim=-1), nn.functional.normalize(passages, dim=-1)
        index = faiss.IndexFlatIP(passages.shape[1])
        index.add(passages.float().contiguous().numpy())
        ranked: list[list[int]] = []
        for start in range(0, len(queries), 4096):
            _, ids = index.search(queries[start:start + 4096].float().contiguous().numpy(), k)
            ranked += ids.tolist()
        return ranked

    def _relevant_to(self, rec: dict) -> set[str]:
        """The passages relevant to a record's query (`ranking.relevance`)."""
        if self.recipe.ranking.relevance == "query":
            return self.relevant[rec["query"]]
        return {rec["positive"]}

    def _is_cross(self, model: nn.Module) -> bool:
        return (self.teacher_type if model is self.teacher else self.student_type) == "cross_encoder"

    # ---- TAS-Balanced
    def _setup_tas_balanced(self, *, is_main: bool, barrier) -> None:
        """One (query, positive, negative) training record per negative, and the queries' cluster ids."""
        from potstill.data.tas_balanced import kmeans_labels

        rk, n_neg = self.recipe.ranking, len(self.queries[0]["negatives"])
        k = min(len(self.queries), rk.tas_clusters or max(1, len(self.queries) // QUERIES_PER_CLUSTER))
        clusterer = self.teacher if self.teacher_type == "bi_encoder" else self.student
        if self._is_cross(clusterer):
            raise UserError("ranking.sampler: tas_balanced clusters the training queries by bi-encoder vectors; with "
                            "a cross-encoder teacher the student must be a bi-encoder")
        manifest = {**self._manifest(), "clusters": k, "seed": self.recipe.seed,
                    "clustered_by": "teacher" if clusterer is self.teacher else "student (before training)"}

        def cluster() -> torch.Tensor:
            vectors = self.encode(clusterer, [rec["query"] for rec in self.queries], side="query")
            return torch.from_numpy(kmeans_labels(vectors.numpy(), k, self.recipe.seed))

        self.clusters = cached_tensor(self.run_dir / "tas_clusters", manifest, "clusters", cluster,
                                      is_main=is_main, barrier=barrier)
        self.train_records = [{"query": rec["query"], "positive": rec["positive"], "negatives": [neg]}
                              for rec in self.queries for neg in rec["negatives"]]
        self._query_of = [q for q in range(len(self.queries)) for _ in range(n_neg)]
        pairs = torch.arange(len(self.train_records)).reshape(len(self.queries), n_neg)
        self.teacher_cache = torch.stack([self.query_scores[:, :1].expand(-1, n_neg), self.query_scores[:, 1:]],
                                         dim=-1).reshape(-1, 2)
        margins = (self.query_scores[:, :1] - self.query_scores[:, 1:]).tolist()
        self._tas_pairs = [[(int(pairs[q, j]), None, m) for j, m in enumerate(row)] for q, row in enumerate(margins)]

    def epoch_order(self, epoch: int, batch_size: int) -> list[int] | None:
        """TAS-Balanced: the pair records of `TopicBalancedSampler.epoch_batches(epoch)` (short clusters
        filled); None (the loop's shuffle) otherwise."""
        if self.recipe.ranking.sampler != "tas_balanced":
            return None
        from potstill.data.tas_balanced import TopicBalancedSampler

        if self._sampler is None or self._sampler.batch_size != batch_size:
            self._sampler = TopicBalancedSampler(
                torch.zeros(len(self.queries), 1), self._tas_pairs, batch_size, clusters=self.clusters.tolist(),
                n_bins=self.recipe.ranking.tas_bins, seed=self.recipe.seed, short_batches="fill")
        return [pair for batch in self._sampler.epoch_batches(epoch) for _, pair, _ in batch]

    # ---- scoring
    def _tokenize(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.recipe.data.max_length,
                             return_tensors="pt")
        return {k: v for k, v in enc.items() if k in _INPUT_KEYS}

    def _embed(self, model: nn.Module, batch: dict[str, torch.Tensor], side: str = "passage") -> torch.Tensor:
        """Vectors of a bi-encoder's `side` tower ("query" or "passage"; the same model unless a DualEncoder)."""
        tower = getattr(model, side) if isinstance(model, DualEncoder) else model
        inputs = {k: v for k, v in batch.items() if k in _INPUT_KEYS}
        return self._vectors(tower(**inputs), inputs)

    def _vectors(self, out: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(out, torch.Tensor):  # a model that returns its vectors (splade, inference-free queries)
            return out
        return pool(out.last_hidden_state, inputs["attention_mask"], self.recipe.pooling)

    def _query_and_passage_vectors(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
        """A bi-encoder's vectors of the batch's queries and passages in ONE forward of `model` (which may be
        DDP-wrapped: DDP expects one forward per backward): both towers of a DualEncoder, or the shared
        encoder on the queries and passages joined into one padded batch."""
        queries, passages = self._inputs(batch, "query_"), self._inputs(batch, "passage_")
        if isinstance(getattr(model, "module", model), DualEncoder):
            q_out, p_out = model(queries, passages)
            return self._vectors(q_out, queries), self._vectors(p_out, passages)
        joined = _joined_inputs(queries, passages, self.tokenizer.pad_token_id or 0)
        vectors = self._vectors(model(**joined), joined)
        n = queries["input_ids"].shape[0]
        return vectors[:n], vectors[n:]

    def _similarity(self, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """(Q, P) scores of query and passage vectors, or (B, C) when passages are (B, C, D)."""
        if self.recipe.ranking.similarity == "cosine":
            queries = nn.functional.normalize(queries.float(), dim=-1)
            passages = nn.functional.normalize(passages.float(), dim=-1)
        if passages.dim() == 3:
            return torch.einsum("bd,bcd->bc", queries.float(), passages.float())
        return queries.float() @ passages.float().T

    def encode(self, model: nn.Module, texts: list[str], *, side: str = "passage") -> torch.Tensor:
        """Pooled vectors (float32, CPU) of a bi-encoder's `side` tower, in the input order."""
        return encode_texts(model, texts, lambda chunk: self._embed(model, self.to_device(self._tokenize(chunk)), side),
                            batch_size=self.recipe.eval.batch_size)

    def _score(self, model: nn.Module, batch: dict[str, Any]) -> RankingScores:
        """Scores of a collated batch: a cross-encoder on the pairs, a bi-encoder's similarities (and its
        in-batch matrix when the task computes one)."""
        b, c = batch["shape"]
        if self._is_cross(model):
            return RankingScores(model(**self._inputs(batch, "pair_")).logits.reshape(b, c).float())
        q, flat = self._query_and_passage_vectors(model, batch)
        p = flat.reshape(b, c, -1)
        in_batch = self._similarity(q, p[:, 0]) if "in_batch_mask" in batch else None
        scores = RankingScores(self._similarity(q, p), in_batch, batch.get("in_batch_mask"))
        if self.student_type == "splade" and model is not self.teacher:
            scores.query_terms = None if self.recipe.ranking.inference_free else q
            scores.passage_terms = flat
        return scores

    @staticmethod
    def _inputs(batch: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}

    # ---- the teacher cache
    def _manifest(self) -> dict[str, Any]:
        r = self.recipe
        config = self.teacher.config.to_json_string() if self.teacher is not None else ""
        return {"format": CACHE_FORMAT, "teacher": str(r.teacher.path), "teacher_type": self.teacher_type,
                "teacher_config": hashlib.sha256(config.encode()).hexdigest(),
                "teacher_scores": [f.sha256 for f in self.score_files], "ensemble_scale": r.ranking.ensemble_scale,
                "tokenizer": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer),
                "data": fingerprint_records(self.queries), "rows": len(self.queries),
                "max_length": r.data.max_length, "pooling": r.pooling, "similarity": r.ranking.similarity}

    def _teacher_cache(self, *, is_main: bool, barrier) -> torch.Tensor:
        if self.score_files:
            return self._file_scores(self.queries)
        return cached_tensor(self.run_dir / "teacher_cache", self._manifest(), "scores",
                             lambda: self._scores_of(self.teacher, self.queries), is_main=is_main,
                             barrier=barrier)

    def _file_scores(self, records: list[dict]) -> torch.Tensor:
        """(B, 1 + N) teacher scores from the score file, or from several: the heterogeneous ensemble
        `minmax_ensemble` (each file min–max normalised per query over its candidates, then
        ranking.ensemble_scale × their mean)."""
        scores = [f.scores_for_records(records) for f in self.score_files]
        if len(scores) == 1:
            return scores[0]
        from potstill.teachers.ensemble import minmax_ensemble

        return minmax_ensemble(scores, scale=self.recipe.ranking.ensemble_scale)

    def _teacher_vectors(self, *, is_main: bool, barrier) -> torch.Tensor:
        """A bi-encoder teacher's vectors of the training queries, then of their positives: (2Q, D)."""
        def compute() -> torch.Tensor:
            return torch.cat([self.encode(self.teacher, [rec["query"] for rec in self.queries], side="query"),
                              self.encode(self.teacher, [rec["positive"] for rec in self.queries])])

        return cached_tensor(self.run_dir / "teacher_cache" / "in_batch", self._manifest(), "vectors", compute,
                             is_main=is_main, barrier=barrier)

    def _scores_of(self, model: nn.Module, records: list[dict]) -> torch.Tensor:
        from potstill.ui import task_progress

        bs = max(1, self.recipe.eval.batch_size // (1 + len(records[0]["negatives"])))
        out = []
        was_training = model.training
        model.eval()
        label = "teacher" if model is self.teacher else "student"
        with task_progress(f"{label} scores of the candidates", len(records)) as advance, torch.inference_mode():
            for start in range(0, len(records), bs):
                chunk = records[start:start + bs]
                batch = self.to_device(self.collate(chunk, list(range(len(chunk))), in_batch=False))
                out.append(self._score(model, batch).candidates.cpu())
                advance(len(chunk))
        model.train(was_training)
        return torch.cat(out)

    # ---- batches
    def collate(self, records: list[dict], indices: list[int], *, in_batch: bool | None = None) -> dict[str, Any]:
        queries = [rec["query"] for rec in records]
        candidates = [[rec["positive"], *rec["negatives"]] for rec in records]
        c = len(candidates[0])
        flat = [p for row in candidates for p in row]
        batch: dict[str, Any] = {"index": torch.tensor(indices), "shape": (len(records), c)}
        if self.teacher_type == "cross_encoder" or self.student_type == "cross_encoder":
            pairs = self._tokenize([q for q in queries for _ in range(c)], flat)
            batch.update({f"pair_{k}": v for k, v in pairs.items()})
        if self.teacher_type == "bi_encoder" or self.student_type != "cross_encoder":
            batch.update({f"query_{k}": v for k, v in self._tokenize(queries).items()})
            batch.update({f"passage_{k}": v for k, v in self._tokenize(flat).items()})
        if self.in_batch if in_batch is None else in_batch:
            positives = [row[0] for row in candidates]
            relevant = [self._relevant_to(rec) for rec in records]
            batch["in_batch_mask"] = torch.tensor([[p not in rel for p in positives] for rel in relevant])
            if self.teacher_type == "cross_encoder":  # the live in-batch teacher scores every query × positive
                pairs = self._tokenize([q for q in queries for _ in positives], positives * len(queries))
                batch.update({f"in_batch_pair_{k}": v for k, v in pairs.items()})
        return batch

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def teacher_signal(self, batch: dict[str, Any]) -> RankingScores:
        index = batch["index"].cpu()
        scores = RankingScores(self.teacher_cache[index].to(self.device))
        if "in_batch_mask" in batch:
            if self.teacher_vectors is not None:
                q = torch.tensor([self._query_of[i] for i in index.tolist()])
                vectors = self.teacher_vectors.to(self.device)
                scores.in_batch = self._similarity(vectors[q], vectors[q + len(self.queries)])
            else:
                with torch.inference_mode():
                    b = len(index)
                    scores.in_batch = self.teacher(**self._inputs(batch, "in_batch_pair_")).logits.reshape(b, b)
                scores.in_batch = scores.in_batch.float()
        return scores

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> RankingScores:
        return self._score(model, batch)

    def hard_label_loss(self, student_signal: RankingScores, batch: dict[str, Any]) -> torch.Tensor:
        """Contrastive cross-entropy, the positive as the class among the query's candidates (and, with
        ranking.in_batch_negatives, the other queries' positives)."""
        cosine = self.student_type != "cross_encoder" and self.recipe.ranking.similarity == "cosine"
        scale = self.recipe.ranking.label_scale or (20.0 if cosine else 1.0)
        logits = student_signal.candidates.float()
        if self.recipe.ranking.in_batch_negatives:
            others = student_signal.in_batch_mask & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device)
            logits = torch.cat([logits, student_signal.in_batch.float().masked_fill(~others, float("-inf"))], dim=1)
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return nn.functional.cross_entropy(logits * scale, target, reduction="sum")

    # ---- evaluation
    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        from potstill.eval.retrieval import kendall_tau, mrr_at_k, ndcg_at_k, recall_at_k, top_k_overlap

        if not self.eval_records:
            return {}
        if self._eval_cache is None:
            self._eval_cache = {"teacher": self._eval_teacher_scores()}
            if self.teacher_type == "bi_encoder":
                self._eval_cache["teacher_full"] = self._similarity(*self._full_vectors(self.teacher))
        teacher = self._eval_cache["teacher"]
        if role == "teacher" and teacher is None:
            return {}
        scores = teacher if role == "teacher" else self._scores_of(model, self.eval_records)
        relevant = torch.zeros_like(scores)
        relevant[:, 0] = 1  # the positive is candidate 0
        metrics = {"rerank_mrr@10": mrr_at_k(scores, relevant, k=10)}
        if teacher is not None:
            metrics.update({"teacher_kendall_tau": kendall_tau(scores, teacher),
                            "teacher_top1_agreement": float((scores.argmax(1) == teacher.argmax(1)).float().mean())})
        if role == "teacher" and self.teacher_type == "scores":
            return metrics
        cross = (self.teacher_type if role == "teacher" else self.student_type) == "cross_encoder"
        if not cross:
            if role == "teacher":
                full = self._eval_cache["teacher_full"]
            else:
                queries, passages = self._full_vectors(model)
                full = self._similarity(queries, passages)
                if self.student_type == "splade":
                    metrics["passage_active_terms"] = _active_terms(passages)
                    metrics["query_active_terms"] = _active_terms(queries)
            where = {p: i for i, p in enumerate(self.collection)}
            positives = torch.zeros_like(full)
            for i, rec in enumerate(self.eval_records):
                positives[i, [where[p] for p in self._relevant_to(rec)]] = 1
            metrics.update({"mrr@10": mrr_at_k(full, positives, k=10), "ndcg@10": ndcg_at_k(full, positives, k=10),
                            "recall@10": recall_at_k(full, positives, k=10)})
            if "teacher_full" in self._eval_cache:
                metrics["teacher_top10_overlap"] = top_k_overlap(full, self._eval_cache["teacher_full"], k=10)
        return metrics

    def _eval_teacher_scores(self) -> torch.Tensor | None:
        """The teacher's scores of the held-out candidates: from the score file when it has every pair, else
        from the teacher model; None with neither."""
        if self.score_files and all(f.has_pair(rec["query"], p) for f in self.score_files
                                    for rec in self.eval_records for p in (rec["positive"], *rec["negatives"])):
            return self._file_scores(self.eval_records)
        if self.teacher is None:
            return None
        return self._scores_of(self.teacher, self.eval_records)

    def _full_vectors(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """A bi-encoder's vectors of the eval queries and of the whole collection (encoded once per evaluation:
        the retrieval metrics and a sparse student's active-term counts both read them)."""
        queries = self.encode(model, [rec["query"] for rec in self.eval_records], side="query")
        return queries, self.encode(model, self.collection)

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        """Queries per second: a bi-encoder encodes the query (passages are indexed offline); a cross-encoder
        scores the query against its 1 + N candidates."""
        records = (self.eval_records or self.queries)[:256]

        def runner(model: nn.Module):
            def run(chunk: list[dict]) -> Any:
                if self._is_cross(model):
                    batch = self.to_device(self.collate(chunk, list(range(len(chunk))), in_batch=False))
                    return model(**self._inputs(batch, "pair_")).logits
                return self._embed(model, self.to_device(self._tokenize([rec["query"] for rec in chunk])), "query")

            return run

        return self.compare_speed(student, records, runner, unit="queries_per_s",
                                  batch_size=max(1, self.recipe.eval.batch_size // 4), min_seconds=1.0)

    # ---- output
    def save_student(self, model: nn.Module, path: Path) -> None:
        """A bi-encoder as a sentence-transformers folder (separate towers: a Router with query and document
        routes, for `encode_query` / `encode_document`); a splade student as a sentence-transformers
        `SparseEncoder` (inference-free: its query route is the static IDF weights); a cross-encoder as an HF
        sequence classifier (which sentence-transformers' `CrossEncoder` loads)."""
        from potstill.students import save_hf_student, save_sentence_transformer

        if self.student_type == "cross_encoder":
            save_hf_student(model, self.tokenizer, path)
            return
        if self.student_type == "splade":
            from potstill.students.splade import save_sparse_encoder

            free = isinstance(model, DualEncoder)
            save_sparse_encoder(model.passage if free else model, self.tokenizer, path,
                                max_seq_length=self.recipe.data.max_length, query_idf=model.query.idf if free else None)
            return
        options = {"pooling": self.recipe.pooling, "normalize": self.recipe.ranking.similarity == "cosine",
                   "max_seq_length": self.recipe.data.max_length}
        if isinstance(model, DualEncoder):
            save_sentence_transformer(model.passage, self.tokenizer, path, query_model=model.query, **options)
            return
        save_sentence_transformer(model, self.tokenizer, path, **options)
