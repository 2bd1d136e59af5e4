"""Ranking: teacher and student score (query, passage) pairs; the student learns the teacher's scores.

Records: `query`, `positive` and optionally `negatives` (the same number for every record); the collection is
every distinct positive plus `data.collection`'s passages, relevance is a record's own positive or (`ranking.
relevance: query`) every positive of the same query text. Records without negatives get `ranking.negatives`
mined by a bi-encoder (the teacher's top ranks, or the untrained student's when the teacher is a
cross-encoder), never a relevant passage (`potstill.data.negatives`).

Each query's candidates are `[positive, *negatives]`; the signal of a batch is `RankingScores`, the (B, 1 + N)
scores, positive first, of a cross-encoder (one logit per pair), a bi-encoder (dot product or cosine of pooled
vectors; `ranking.towers: separate` gives it query and passage towers) or a splade student (dot product of term
weights) (`potstill.students.ranking`). The teacher's scores of the training candidates are computed once per
run and cached (`<run>/teacher_cache/`), or read from `ranking.teacher_scores` files
(`potstill.teachers.score_cache`). Score objectives read the candidates, `in_batch_margin_mse` the in-batch
matrix, `sparse_flops` the student's term weights (`potstill.tasks.ranking_objectives`); the hard-label loss is
contrastive cross-entropy with the positive as the class.

In-batch scores (`in_batch_margin_mse` or `ranking.in_batch_negatives`): a bi-encoder student also scores every
query against every positive of the batch, (B, B), pairs whose passage is relevant to the query masked; the
teacher's come from its cached query and positive vectors (a bi-encoder) or are scored live (a cross-encoder,
B² pairs per batch, as TAS-B's online in-batch teacher).

`ranking.sampler: tas_balanced` (`potstill.data.tas_balanced`): the training unit becomes one (query, positive,
negative) pair, the queries are clustered once by k-means on the teacher's query vectors (the untrained
student's with a cross-encoder teacher; cached in `<run>/tas_clusters/`), and `epoch_order` gives
`TopicBalancedSampler`'s batches: each from one cluster, every query once per epoch, replayed on resume.

Metrics on held-out records (`potstill.eval.retrieval`): reranking the candidates (MRR@10, Kendall τ and top-1
agreement with the teacher), for a bi-encoder retrieval over the whole collection (MRR@10, nDCG@10, Recall@10,
overlap with a bi-encoder teacher's top 10); queries per second of teacher and student.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.data.negatives import Relevance, build_collection, collection_passages, mine_negatives, ranking_records
from potstill.errors import UserError
from potstill.signals import RankingScores
from potstill.students.ranking import (
    RankingScorer,
    batch_inputs,
    build_ranking_student,
    check_ranking_kinds,
    prepare_sparse_student,
    save_ranking_student,
)
from potstill.tasks.base import Task
from potstill.tasks.models import load_ranking_teacher
from potstill.tasks.ranking_objectives import adapt_ranking_objective, contrastive_loss
from potstill.teachers.score_cache import TeacherScoreCache, cached_tensor, load_score_files, score_manifest


class RankingTask(Task):
    signal_kind = "scores"
    name = "ranking"
    captures_internals = False
    metric_names = ("rerank_mrr@10", "teacher_kendall_tau", "teacher_top1_agreement", "mrr@10", "ndcg@10", "recall@10",
                    "teacher_top10_overlap", "passage_active_terms", "query_active_terms")

    def adapt_objective(self, name: str, fn: Any) -> Any:
        """Score losses read the candidates (B, 1 + N) or, for in_batch_margin_mse, the in-batch (B, B);
        sparse_flops reads the student's term weights."""
        return adapt_ranking_objective(name, fn)

    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        r, rk = self.recipe, self.recipe.ranking
        self.score_files = load_score_files(rk.teacher_scores)
        if rk.teacher_scores is None and r.teacher.path is None:
            raise UserError("field teacher.path: the ranking task needs a Hugging Face teacher (a cross-encoder or a "
                            "bi-encoder folder) or a file of its scores (ranking.teacher_scores)")
        self.student_type = rk.student_type
        self.in_batch = rk.in_batch_negatives or any(o.name == "in_batch_margin_mse" for o in r.objectives)
        check_ranking_kinds(rk, student_type=self.student_type, in_batch=self.in_batch,
                            teacher_model=r.teacher.path is not None)
        self.teacher, self.tokenizer, self.teacher_type = load_ranking_teacher(r.teacher.path, rk.teacher_type,
                                                                               r.student, self.device)
        self.scorer = RankingScorer(self.tokenizer, max_length=r.data.max_length, pooling=r.pooling,
                                    similarity=rk.similarity, batch_size=r.eval.batch_size, to_device=self.to_device)
        self.student = build_ranking_student(r.student, rk, student_type=self.student_type, teacher=self.teacher,
                                             teacher_type=self.teacher_type, tokenizer=self.tokenizer, seed=r.seed)
        self.queries = ranking_records(self.load(r.data.train, required=("query", "positive")), "data.train",
                                       rk.negatives)
        self.eval_records = (ranking_records(self.load(r.data.eval, required=("query", "positive")), "data.eval",
                                             rk.negatives) if r.data.eval else [])
        extra = collection_passages(self.load(r.data.collection)) if r.data.collection is not None else []
        self.collection = build_collection(self.queries + self.eval_records, extra)
        self._relevant_to = Relevance(self.queries + self.eval_records, rk.relevance)
        if self.student_type == "splade":
            prepare_sparse_student(self.student, self.scorer, self.collection)
        self._mine_negatives(self.queries)
        self._mine_negatives(self.eval_records)
        self.train_records = self.queries
        self.scores_cache = TeacherScoreCache(self.run_dir / "teacher_cache", score_manifest(
            teacher_path=r.teacher.path, teacher_type=self.teacher_type, teacher=self.teacher,
            score_files=self.score_files, ensemble_scale=rk.ensemble_scale, tokenizer=self.tokenizer,
            records=self.queries, max_length=r.data.max_length, pooling=r.pooling, similarity=rk.similarity),
            self.score_files, ensemble_scale=rk.ensemble_scale)
        self.query_scores = self.scores_cache.candidate_scores(
            self.queries, lambda: self._scores_of(self.teacher, self.queries), is_main=is_main, barrier=barrier)
        self.teacher_cache = self.query_scores
        self._query_of = list(range(len(self.queries)))
        self.teacher_vectors = (self.scores_cache.in_batch_vectors(self._teacher_vectors, is_main=is_main,
                                                                   barrier=barrier)
                                if self.in_batch and self.teacher_type == "bi_encoder" else None)
        self.tas: Any = None
        if rk.sampler == "tas_balanced":
            self._setup_tas_balanced(is_main=is_main, barrier=barrier)
        self._eval_cache: dict[str, Any] | None = None

    def _mine_negatives(self, records: list[dict]) -> None:
        """Records without negatives get the miner's top-ranked collection passages not relevant to them."""
        def encode(texts: list[str], side: str) -> torch.Tensor:
            use_teacher = self.recipe.ranking.mine_with == "teacher" and self.teacher_type == "bi_encoder"
            miner = self.teacher if use_teacher else self.student
            if self._is_cross(miner):
                raise UserError("mining negatives needs a bi-encoder teacher or student; give `negatives` in the data")
            return self.encode(miner, texts, side=side)

        mine_negatives(records, self.collection, self._relevant_to, negatives=self.recipe.ranking.negatives,
                       encode=encode, similarity=self.recipe.ranking.similarity)

    def _is_cross(self, model: nn.Module) -> bool:
        return (self.teacher_type if model is self.teacher else self.student_type) == "cross_encoder"

    def _teacher_vectors(self) -> torch.Tensor:
        """A bi-encoder teacher's vectors of the training queries, then of their positives: (2Q, D)."""
        return torch.cat([self.encode(self.teacher, [rec["query"] for rec in self.queries], side="query"),
                          self.encode(self.teacher, [rec["positive"] for rec in self.queries])])

    # ---- TAS-Balanced
    def _setup_tas_balanced(self, *, is_main: bool, barrier) -> None:
        """One (query, positive, negative) training record per negative, and the queries' cluster ids."""
        from potstill.data.tas_balanced import TasBalancedEpochs, cluster_count, kmeans_labels

        rk = self.recipe.ranking
        k = cluster_count(len(self.queries), rk.tas_clusters)
        clusterer = self.teacher if self.teacher_type == "bi_encoder" else self.student
        if self._is_cross(clusterer):
            raise UserError("ranking.sampler: tas_balanced clusters the training queries by bi-encoder vectors; with "
                            "a cross-encoder teacher the student must be a bi-encoder")
        manifest = {**self.scores_cache.manifest, "clusters": k, "seed": self.recipe.seed,
                    "clustered_by": "teacher" if clusterer is self.teacher else "student (before training)"}

        def cluster() -> torch.Tensor:
            vectors = self.encode(clusterer, [rec["query"] for rec in self.queries], side="query")
            return torch.from_numpy(kmeans_labels(vectors.numpy(), k, self.recipe.seed))

        self.clusters = cached_tensor(self.run_dir / "tas_clusters", manifest, "clusters", cluster,
                                      is_main=is_main, barrier=barrier)
        self.tas = TasBalancedEpochs(self.queries, self.query_scores, self.clusters.tolist(), n_bins=rk.tas_bins,
                                     seed=self.recipe.seed)
        self.train_records, self._query_of = self.tas.records, self.tas.query_of
        self.teacher_cache = self.tas.pair_scores

    def epoch_order(self, epoch: int, batch_size: int) -> list[int] | None:
        """TAS-Balanced: the pair records of `TopicBalancedSampler.epoch_batches(epoch)` (short clusters
        filled); None (the loop's shuffle) otherwise."""
        return None if self.tas is None else self.tas.order(epoch, batch_size)

    # ---- scoring
    def encode(self, model: nn.Module, texts: list[str], *, side: str = "passage") -> torch.Tensor:
        """Pooled vectors (float32, CPU) of a bi-encoder's `side` tower, in the input order."""
        return self.scorer.encode(model, texts, side=side)

    def _score(self, model: nn.Module, batch: dict[str, Any]) -> RankingScores:
        terms = self.student_type == "splade" and model is not self.teacher
        return self.scorer.score(model, batch, cross=self._is_cross(model), terms=terms,
                                 query_terms=not self.recipe.ranking.inference_free)

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
        in_batch = self.in_batch if in_batch is None else in_batch
        return self.scorer.collate(records, indices, pairs="cross_encoder" in (self.teacher_type, self.student_type),
                                   towers=self.teacher_type == "bi_encoder" or self.student_type != "cross_encoder",
                                   relevant_to=self._relevant_to if in_batch else None,
                                   in_batch_pairs=self.teacher_type == "cross_encoder")

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def teacher_signal(self, batch: dict[str, Any]) -> RankingScores:
        index = batch["index"].cpu()
        scores = RankingScores(self.teacher_cache[index].to(self.device))
        if "in_batch_mask" in batch:
            if self.teacher_vectors is not None:
                q = torch.tensor([self._query_of[i] for i in index.tolist()])
                vectors = self.teacher_vectors  # the batch's rows move to the device, not the whole bank
                scores.in_batch = self.scorer.similarity(vectors[q].to(self.device),
                                                         vectors[q + len(self.queries)].to(self.device))
            else:
                with torch.inference_mode():
                    b = len(index)
                    scores.in_batch = self.teacher(**batch_inputs(batch, "in_batch_pair_")).logits.reshape(b, b)
                scores.in_batch = scores.in_batch.float()
        return scores

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> RankingScores:
        return self._score(model, batch)

    def hard_label_loss(self, student_signal: RankingScores, batch: dict[str, Any]) -> torch.Tensor:
        """Contrastive cross-entropy, the positive as the class among the query's candidates (and, with
        ranking.in_batch_negatives, the other queries' positives)."""
        cosine = self.student_type != "cross_encoder" and self.recipe.ranking.similarity == "cosine"
        scale = self.recipe.ranking.label_scale or (20.0 if cosine else 1.0)
        return contrastive_loss(student_signal, scale=scale, in_batch_negatives=self.recipe.ranking.in_batch_negatives)

    # ---- evaluation
    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        from potstill.eval.retrieval import relevance_matrix, rerank_metrics, retrieval_metrics
        from potstill.students.splade import sparsity_stats

        if not self.eval_records:
            return {}
        if self._eval_cache is None:
            self._eval_cache = {"teacher": self._eval_teacher_scores()}
            if self.teacher_type == "bi_encoder":
                self._eval_cache["teacher_full"] = self.scorer.similarity(*self._full_vectors(self.teacher))
        teacher = self._eval_cache["teacher"]
        if role == "teacher" and teacher is None:
            return {}
        scores = teacher if role == "teacher" else self._scores_of(model, self.eval_records)
        metrics = rerank_metrics(scores, teacher)
        if role == "teacher" and self.teacher_type == "scores":
            return metrics
        if (self.teacher_type if role == "teacher" else self.student_type) == "cross_encoder":
            return metrics
        if role == "teacher":
            full = self._eval_cache["teacher_full"]
        else:
            queries, passages = self._full_vectors(model)
            full = self.scorer.similarity(queries, passages)
            if self.student_type == "splade":
                metrics["passage_active_terms"] = sparsity_stats(passages)["active_terms"]
                metrics["query_active_terms"] = sparsity_stats(queries)["active_terms"]
        relevant = relevance_matrix([self._relevant_to(rec) for rec in self.eval_records], self.collection)
        metrics.update(retrieval_metrics(full, relevant, self._eval_cache.get("teacher_full")))
        return metrics

    def _eval_teacher_scores(self) -> torch.Tensor | None:
        """The teacher's scores of the held-out candidates: from the score file when it has every pair, else
        from the teacher model; None with neither."""
        if self.scores_cache.covers(self.eval_records):
            return self.scores_cache.file_scores(self.eval_records)
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
                    return model(**batch_inputs(batch, "pair_")).logits
                return self.scorer.embed(model, self.to_device(self.scorer.tokenize([rec["query"] for rec in chunk])),
                                         "query")

            return run

        return self.compare_speed(student, records, runner, unit="queries_per_s",
                                  batch_size=max(1, self.recipe.eval.batch_size // 4), min_seconds=1.0)

    # ---- output
    def save_student(self, model: nn.Module, path: Path) -> None:
        """The student as a model sentence-transformers loads (`potstill.students.ranking.save_ranking_student`)."""
        save_ranking_student(model, self.tokenizer, path, student_type=self.student_type, pooling=self.recipe.pooling,
                             similarity=self.recipe.ranking.similarity, max_length=self.recipe.data.max_length)
