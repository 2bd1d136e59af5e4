"""Sentence embeddings: an HF encoder plus pooling (mean over real tokens, or CLS) for both models.

The teacher's embeddings of the training texts are computed once per run and cached on disk
(`<run>/teacher_cache/`, with a manifest: teacher, tokenizer, data fingerprint, max length, pooling,
checksum); a resumed run reuses them. With `teacher.sources` (DistillWeighted) the cached target is the sources'
weighted concatenation (`tasks/embedding_sources.py`), and the objectives compare the student's vectors with it
through one learned projection (a head per source). Metrics: mean cosine to the teacher, teacher-neighbour recall@10,
linear-probe accuracy (when labelled probe data is given), Spearman against human similarity ratings
(when pairs are given), encode throughput (sentences/s) and parameter count.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.data import fingerprint_records
from potstill.encoder_inputs import encoder_inputs
from potstill.errors import UserError
from potstill.eval import (
    embedding_metrics,
    linear_probe_accuracy,
    pair_spearman,
    similarity_spearman,
)
from potstill.students.encode import encode_texts, pool
from potstill.students.loading import build_student, freeze_pooler
from potstill.students.pruning import Calibration
from potstill.tasks.base import Task
from potstill.tasks.models import load_hf_teacher
from potstill.teachers.score_cache import cached_tensor

CACHE_FORMAT = 1


class EmbeddingTask(Task):
    export_kind = "embedding"
    signal_kind = "embedding"
    name = "embedding"
    metric_names = ("cosine_to_teacher", "neighbour_recall@10", "probe_accuracy", "similarity_spearman")

    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        from transformers import AutoModel

        r = self.recipe
        self.teacher, self.tokenizer = load_hf_teacher(r.teacher.path, AutoModel)
        self.teacher.to(self.device)
        if r.student.init == "static":
            self.student = self._static_student(is_main=is_main)
        else:
            self.student = freeze_pooler(build_student(r.student, self.teacher, seed=r.seed, auto_cls=AutoModel,
                                                       calibration=self._calibration()))
        self.train_records = self.load(r.data.train, required=("text",))
        self.eval_records = self.load(r.data.eval, required=("text",)) if r.data.eval else []
        self._texts = [rec["text"] for rec in self.train_records]
        self.teacher_cache = self._teacher_cache(is_main=is_main, barrier=barrier)
        self._eval_sets: dict[str, Any] | None = None

    def _calibration(self) -> Calibration:
        """The training texts `student.init: pruned` measures importance on (read only when it is used)."""
        r = self.recipe
        n = r.student.calibration_batches * r.student.calibration_batch_size
        source = r.data.train.model_copy(update={"limit": min(n, r.data.train.limit or n)})
        return Calibration(lambda: [rec["text"] for rec in self.load(source, required=("text",))], self.tokenizer,
                           "embedding", r.data.max_length)

    def _static_student(self, *, is_main: bool) -> nn.Module:
        """A model2vec-style static student built from the teacher without data (`students/static.py`)."""
        from potstill.students.static import StaticStudent
        from potstill.ui import task_progress

        options = {"pca_dims": 256, "sif_coefficient": 1e-4, "normalize": True, **self.recipe.student.config}
        try:
            if is_main:
                with task_progress("static student: teacher over the vocabulary", len(self.tokenizer)) as advance:
                    return StaticStudent.from_teacher(self.teacher, self.tokenizer, progress=advance, **options)
            return StaticStudent.from_teacher(self.teacher, self.tokenizer, **options)
        except ValueError as err:
            raise UserError(f"field student.config: {err}") from None

    # ---- encoding
    def encode(self, model: nn.Module, texts: list[str], *, progress: Any = None) -> torch.Tensor:
        """Embeddings (float32, CPU) of `texts`, batched by length for speed, in the input order."""
        return encode_texts(model, texts, lambda chunk: self._embed(model, self.to_device(self._tokenize(chunk))),
                            batch_size=self.recipe.eval.batch_size, width=_width(model), progress=progress)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.recipe.data.max_length,
                             return_tensors="pt")
        return encoder_inputs(enc)

    def _embed(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = encoder_inputs(batch)
        out = model(**inputs)
        if isinstance(out, torch.Tensor):  # a model that returns sentence vectors (the static student)
            return out
        return pool(out.last_hidden_state, batch["attention_mask"], self.recipe.pooling)

    # ---- the teacher cache
    def _manifest(self) -> dict[str, Any]:
        r = self.recipe
        sources = [{"path": str(src.path), "weight": src.weight} for src in r.teacher.sources]
        return {"format": CACHE_FORMAT, "teacher": str(r.teacher.path), **({"sources": sources} if sources else {}),
                "teacher_config": hashlib.sha256(self.teacher.config.to_json_string().encode()).hexdigest(),
                "tokenizer": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer),
                "data": fingerprint_records(self.train_records), "rows": len(self.train_records),
                "max_length": r.data.max_length, "pooling": r.pooling}

    def _teacher_cache(self, *, is_main: bool, barrier) -> torch.Tensor:
        def compute() -> torch.Tensor:
            from potstill.ui import task_progress

            r = self.recipe
            if r.teacher.sources:
                from potstill.tasks.embedding_sources import weighted_source_vectors

                return weighted_source_vectors(r.teacher.sources, self._texts, pooling=r.pooling,
                                               max_length=r.data.max_length, batch_size=r.eval.batch_size)
            with task_progress("teacher embeddings (cached once per run)", len(self._texts)) as advance:
                return self.encode(self.teacher, self._texts, progress=advance)

        return cached_tensor(self.run_dir / "teacher_cache", self._manifest(), "embeddings", compute,
                             is_main=is_main, barrier=barrier)

    def model_shape(self, role: str) -> Any:
        """The models' shapes; with `teacher.sources` the teacher's `output` is the width of the sources' weighted
        concatenation, which the embedding objectives project the student's vectors to."""
        shape = super().model_shape(role)
        sources = self.recipe.teacher.sources
        if role == "teacher" and sources:
            from potstill.tasks.embedding_sources import source_widths
            from potstill.teachers.ensemble import source_scales

            widths = source_widths(sources)
            if sum(widths) != self.teacher_cache.shape[1]:
                raise UserError(f"field teacher.sources: the sources' hidden sizes sum to {sum(widths)}, but their "
                                f"pooled vectors are {self.teacher_cache.shape[1]} wide")
            blocks = tuple(zip(widths, source_scales([s.weight for s in sources]), strict=True))
            return dataclasses.replace(shape, output=int(self.teacher_cache.shape[1]), output_blocks=blocks)
        return shape

    # ---- batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        batch: dict[str, Any] = self._tokenize([rec["text"] for rec in records])
        batch["index"] = torch.tensor(indices)
        return batch

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def teacher_signal(self, batch: dict[str, Any]) -> Any:
        """The cached teacher embeddings; with objectives on internals, a live teacher forward as well (its
        hidden states / q, k, v, and the cached embeddings as the main signal)."""
        cached = self.teacher_cache[batch["index"].cpu()].to(self.device)
        if not self.internals.get("teacher"):
            return cached
        from potstill.teachers import teacher_outputs

        signals = teacher_outputs(self.with_internals, "teacher", self._embed, self.teacher, batch)
        signals.main = cached
        return signals

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        return self.with_internals("student", self._embed, model, batch)

    # ---- evaluation
    def _eval_data(self) -> dict[str, Any]:
        if self._eval_sets is not None:
            return self._eval_sets
        r, sets = self.recipe, {}
        if self.eval_records:
            sets["eval"] = [rec["text"] for rec in self.eval_records]
        if r.eval.probe_train and r.eval.probe_test:
            train = self.load(r.eval.probe_train, required=("text", "label"))
            test = self.load(r.eval.probe_test, required=("text", "label"))
            sets["probe"] = ([x["text"] for x in train], [x["label"] for x in train],
                             [x["text"] for x in test], [x["label"] for x in test])
        if r.eval.pairs:
            sets["pairs"] = self._pairs(r.eval.pairs)
        self._eval_sets = sets
        return sets

    def _pairs(self, source) -> tuple[list[str], Any, Any]:
        if source.path == "builtin:lee":
            from potstill.assets import lee_corpus

            docs, ratings = lee_corpus()
            return docs, ratings, None
        records = self.load(source, required=("text_a", "text_b", "score"))
        texts = sorted({x["text_a"] for x in records} | {x["text_b"] for x in records})
        where = {t: i for i, t in enumerate(texts)}
        pairs = torch.tensor([[where[x["text_a"]], where[x["text_b"]]] for x in records])
        scores = torch.tensor([float(x["score"]) for x in records])
        return texts, scores, pairs

    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        sets, metrics = self._eval_data(), {}
        if "eval" in sets:
            key = "_teacher_eval"
            if not hasattr(self, key):
                setattr(self, key, self.encode(self.teacher, sets["eval"]))
            teacher_emb = getattr(self, key)
            emb = teacher_emb if role == "teacher" else self.encode(model, sets["eval"])
            metrics.update(embedding_metrics(emb, teacher_emb, k=10))
        if "probe" in sets:
            train_x, train_y, test_x, test_y = sets["probe"]
            both = self.encode(model, train_x + test_x)
            metrics["probe_accuracy"] = linear_probe_accuracy(both[:len(train_x)], train_y, both[len(train_x):],
                                                              test_y, seed=self.recipe.seed)
        if "pairs" in sets:
            texts, scores, pairs = sets["pairs"]
            emb = self.encode(model, texts)
            if pairs is None:
                metrics["similarity_spearman"] = similarity_spearman(emb, scores)
            else:
                metrics["similarity_spearman"] = pair_spearman(emb[pairs[:, 0]], emb[pairs[:, 1]], scores)
        return metrics

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        texts = ([rec["text"] for rec in self.eval_records] or self._texts)[:256]

        def runner(model: nn.Module):
            def run(chunk: list[str]) -> torch.Tensor:
                return self._embed(model, self.to_device(self._tokenize(chunk)))

            return run

        return self.compare_speed(student, texts, runner, unit="sentences_per_s",
                                  batch_size=self.recipe.eval.batch_size, min_seconds=1.0)

    # ---- output
    def export_output(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self._embed(model, batch)

    def save_student(self, model: nn.Module, path: Path) -> None:
        from potstill.students import save_sentence_transformer

        if hasattr(model, "save_sentence_transformer"):  # static student: StaticEmbedding (+ Normalize)
            model.save_sentence_transformer(self.tokenizer, path, max_tokens=max(1, self.recipe.data.max_length - 2))
            return

        save_sentence_transformer(model, self.tokenizer, path, pooling=self.recipe.pooling,
                                  normalize=self._teacher_normalizes(), max_seq_length=self.recipe.data.max_length)

    def _teacher_normalizes(self) -> bool:
        """A student of a teacher whose sentence-transformers pipeline ends in Normalize keeps it, so that its
        vectors are unit length like the teacher's (dot-product search and k-means see the same geometry)."""
        from potstill.students.loading import resolve_model_path
        from potstill.students.save import normalizes_embeddings

        path = self.recipe.teacher.path
        return path is not None and normalizes_embeddings(resolve_model_path(path, field="teacher.path"))


def _width(model: nn.Module) -> int:
    """Embedding width of an encoder (its hidden size) or of a static student."""
    return model.dim if hasattr(model, "dim") else model.config.hidden_size
