"""Ranking: teacher and student score (query, passage) pairs; the student learns the teacher's scores.

Records: `query`, `positive` (a relevant passage) and optionally `negatives` (a list of passages, the same
number for every record). Records without negatives get `ranking.negatives` of them mined from the
collection (every distinct positive of the data) by a bi-encoder: the teacher's top ranks, or the untrained
student's when the teacher is a cross-encoder; passages equal to the query's positive are skipped.

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
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.data import fingerprint_records
from potstill.errors import UserError
from potstill.tasks.base import Task, cached_tensor
from potstill.tasks.embedding import pool
from potstill.tasks.models import build_student, load_hf_teacher, resolve_model_path

CACHE_FORMAT = 1
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


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


class RankingTask(Task):
    signal_kind = "scores"
    name = "ranking"

    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        from transformers import AutoModel, AutoModelForSequenceClassification

        r, rk = self.recipe, self.recipe.ranking
        if r.teacher.path is None:
            raise UserError("field teacher.path: the ranking task needs a Hugging Face teacher (a cross-encoder or a "
                            "bi-encoder folder)")
        path = resolve_model_path(r.teacher.path, field="teacher.path")
        self.teacher_type = rk.teacher_type
        if self.teacher_type == "auto":
            self.teacher_type = "cross_encoder" if _is_cross_encoder_config(path) else "bi_encoder"
        self.student_type = rk.student_type
        teacher_cls = AutoModelForSequenceClassification if self.teacher_type == "cross_encoder" else AutoModel
        self.teacher, self.tokenizer = load_hf_teacher(path, teacher_cls)
        if self.teacher_type == "cross_encoder" and self.teacher.config.num_labels != 1:
            raise UserError(f"field teacher.path: a cross-encoder teacher must have one output logit (num_labels=1); "
                            f"{path} has {self.teacher.config.num_labels}")
        self.teacher.to(self.device)
        self.student = self._build_student()
        self.train_records = self._records(self.load(r.data.train, required=("query", "positive")), "data.train")
        self.eval_records = (self._records(self.load(r.data.eval, required=("query", "positive")), "data.eval")
                             if r.data.eval else [])
        self.collection = sorted({rec["positive"] for rec in self.train_records + self.eval_records})
        self._mine_negatives(self.train_records)
        self._mine_negatives(self.eval_records)
        self.teacher_cache = self._teacher_cache(is_main=is_main, barrier=barrier)
        self._eval_cache: dict[str, Any] | None = None

    def _build_student(self) -> nn.Module:
        from transformers import AutoModel, AutoModelForSequenceClassification

        cfg = self.recipe.student
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
        return build_student(cfg, self.teacher, auto_cls=auto_cls)

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
        queries = self.encode(miner, [rec["query"] for rec in todo])
        scores = self._similarity(queries, passages)
        ranked = scores.topk(min(len(self.collection), n + 8), dim=1).indices.tolist()
        for rec, row in zip(todo, ranked, strict=True):
            picks = [self.collection[j] for j in row if self.collection[j] != rec["positive"]][:n]
            if len(picks) < n:  # a positive repeated among the top: take the next passages in collection order
                picks += [p for p in self.collection if p != rec["positive"] and p not in picks][:n - len(picks)]
            rec["negatives"] = picks

    def _is_cross(self, model: nn.Module) -> bool:
        return (self.teacher_type if model is self.teacher else self.student_type) == "cross_encoder"

    # ---- scoring
    def _tokenize(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.recipe.data.max_length,
                             return_tensors="pt")
        return {k: v for k, v in enc.items() if k in _INPUT_KEYS}

    def _embed(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**{k: v for k, v in batch.items() if k in _INPUT_KEYS})
        return pool(out.last_hidden_state, batch["attention_mask"], self.recipe.pooling)

    def _similarity(self, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """(Q, P) scores of query and passage vectors, or (B, C) when passages are (B, C, D)."""
        if self.recipe.ranking.similarity == "cosine":
            queries = nn.functional.normalize(queries.float(), dim=-1)
            passages = nn.functional.normalize(passages.float(), dim=-1)
        if passages.dim() == 3:
            return torch.einsum("bd,bcd->bc", queries.float(), passages.float())
        return queries.float() @ passages.float().T

    def encode(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        """Pooled vectors (float32, CPU) of a bi-encoder, in the input order."""
        bs, order = self.recipe.eval.batch_size, sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: torch.Tensor | None = None
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), bs):
                idx = order[start:start + bs]
                emb = self._embed(model, self.to_device(self._tokenize([texts[i] for i in idx]))).float().cpu()
                if out is None:
                    out = torch.empty(len(texts), emb.shape[-1])
                out[idx] = emb
        model.train(was_training)
        return out if out is not None else torch.empty(0, 0)

    def _score(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(B, C) scores of a collated batch: a cross-encoder on the pairs, a bi-encoder's similarities."""
        b, c = batch["shape"]
        if self._is_cross(model):
            return model(**self._inputs(batch, "pair_")).logits.reshape(b, c).float()
        q = self._embed(model, self._inputs(batch, "query_"))
        p = self._embed(model, self._inputs(batch, "passage_"))
        return self._similarity(q, p.reshape(b, c, -1))

    @staticmethod
    def _inputs(batch: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}

    # ---- the teacher cache
    def _manifest(self) -> dict[str, Any]:
        r = self.recipe
        return {"format": CACHE_FORMAT, "teacher": str(r.teacher.path), "teacher_type": self.teacher_type,
                "teacher_config": hashlib.sha256(self.teacher.config.to_json_string().encode()).hexdigest(),
                "tokenizer": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer),
                "data": fingerprint_records(self.train_records), "rows": len(self.train_records),
                "max_length": r.data.max_length, "pooling": r.pooling, "similarity": r.ranking.similarity}

    def _teacher_cache(self, *, is_main: bool, barrier) -> torch.Tensor:
        return cached_tensor(self.run_dir / "teacher_cache", self._manifest(), "scores",
                             lambda: self._scores_of(self.teacher, self.train_records), is_main=is_main,
                             barrier=barrier)

    def _scores_of(self, model: nn.Module, records: list[dict]) -> torch.Tensor:
        from potstill.train.progress import task_progress

        bs = max(1, self.recipe.eval.batch_size // (1 + len(records[0]["negatives"])))
        out = []
        was_training = model.training
        model.eval()
        label = "teacher" if model is self.teacher else "student"
        with task_progress(f"{label} scores of the candidates", len(records)) as advance, torch.inference_mode():
            for start in range(0, len(records), bs):
                chunk = records[start:start + bs]
                out.append(self._score(model, self.to_device(self.collate(chunk, list(range(len(chunk)))))).cpu())
                advance(len(chunk))
        model.train(was_training)
        return torch.cat(out)

    # ---- batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        queries = [rec["query"] for rec in records]
        candidates = [[rec["positive"], *rec["negatives"]] for rec in records]
        c = len(candidates[0])
        flat = [p for row in candidates for p in row]
        batch: dict[str, Any] = {"index": torch.tensor(indices), "shape": (len(records), c)}
        if self.teacher_type == "cross_encoder" or self.student_type == "cross_encoder":
            pairs = self._tokenize([q for q in queries for _ in range(c)], flat)
            batch.update({f"pair_{k}": v for k, v in pairs.items()})
        if self.teacher_type == "bi_encoder" or self.student_type == "bi_encoder":
            batch.update({f"query_{k}": v for k, v in self._tokenize(queries).items()})
            batch.update({f"passage_{k}": v for k, v in self._tokenize(flat).items()})
        return batch

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def teacher_signal(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.teacher_cache[batch["index"].cpu()].to(self.device)

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self._score(model, batch)

    def hard_label_loss(self, student_signal: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        cosine = self.student_type == "bi_encoder" and self.recipe.ranking.similarity == "cosine"
        scale = self.recipe.ranking.label_scale or (20.0 if cosine else 1.0)
        target = torch.zeros(student_signal.shape[0], dtype=torch.long, device=student_signal.device)
        return nn.functional.cross_entropy(student_signal.float() * scale, target, reduction="sum")

    # ---- evaluation
    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        from potstill.eval.retrieval import kendall_tau, mrr_at_k, ndcg_at_k, recall_at_k, top_k_overlap

        if not self.eval_records:
            return {}
        if self._eval_cache is None:
            self._eval_cache = {"teacher": self._scores_of(self.teacher, self.eval_records)}
            if self.teacher_type == "bi_encoder":
                self._eval_cache["teacher_full"] = self._full_scores(self.teacher)
        teacher = self._eval_cache["teacher"]
        scores = teacher if role == "teacher" else self._scores_of(model, self.eval_records)
        relevant = torch.zeros_like(scores)
        relevant[:, 0] = 1  # the positive is candidate 0
        metrics = {"rerank_mrr@10": mrr_at_k(scores, relevant, k=10),
                   "teacher_kendall_tau": kendall_tau(scores, teacher),
                   "teacher_top1_agreement": float((scores.argmax(1) == teacher.argmax(1)).float().mean())}
        cross = (self.teacher_type if role == "teacher" else self.student_type) == "cross_encoder"
        if not cross:
            full = self._eval_cache["teacher_full"] if role == "teacher" else self._full_scores(model)
            where = {p: i for i, p in enumerate(self.collection)}
            positives = torch.zeros_like(full)
            positives[torch.arange(len(self.eval_records)), [where[rec["positive"]] for rec in self.eval_records]] = 1
            metrics.update({"mrr@10": mrr_at_k(full, positives, k=10), "ndcg@10": ndcg_at_k(full, positives, k=10),
                            "recall@10": recall_at_k(full, positives, k=10)})
            if "teacher_full" in self._eval_cache:
                metrics["teacher_top10_overlap"] = top_k_overlap(full, self._eval_cache["teacher_full"], k=10)
        return metrics

    def _full_scores(self, model: nn.Module) -> torch.Tensor:
        """(eval queries, collection) similarity of a bi-encoder."""
        passages = self.encode(model, self.collection)
        return self._similarity(self.encode(model, [rec["query"] for rec in self.eval_records]), passages)

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        """Queries per second: a bi-encoder encodes the query (passages are indexed offline); a cross-encoder
        scores the query against its 1 + N candidates."""
        records = (self.eval_records or self.train_records)[:256]

        def runner(model: nn.Module):
            def run(chunk: list[dict]) -> Any:
                if self._is_cross(model):
                    batch = self.to_device(self.collate(chunk, list(range(len(chunk)))))
                    return model(**self._inputs(batch, "pair_")).logits
                return self._embed(model, self.to_device(self._tokenize([rec["query"] for rec in chunk])))

            return run

        return self.compare_speed(student, records, runner, unit="queries_per_s",
                                  batch_size=max(1, self.recipe.eval.batch_size // 4), min_seconds=1.0)

    # ---- output
    def save_student(self, model: nn.Module, path: Path) -> None:
        """A bi-encoder as a sentence-transformers folder; a cross-encoder as an HF sequence classifier (which
        sentence-transformers' `CrossEncoder` loads)."""
        from potstill.students import save_hf_student, save_sentence_transformer

        if self.student_type == "cross_encoder":
            save_hf_student(model, self.tokenizer, path)
            return
        save_sentence_transformer(model, self.tokenizer, path, pooling=self.recipe.pooling,
                                  normalize=self.recipe.ranking.similarity == "cosine",
                                  max_seq_length=self.recipe.data.max_length)
