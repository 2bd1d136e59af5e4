"""Ranking students and how ranking models score (query, passage) pairs.

Three kinds of scorer:
- a cross-encoder (an HF sequence classifier with one logit) scores each (query, passage) pair;
- a bi-encoder (HF encoder + pooling) scores similarity(q, p), the dot product or cosine of pooled vectors, with
  one encoder shared by queries and passages or two towers (`DualEncoder`, `ranking.towers: separate`);
- a SPLADE student (`potstill.students.splade`) is a bi-encoder whose vectors are vocabulary term weights,
  scored by dot product; inference-free, its query tower is the static IDF lookup
  (`potstill.students.splade_inference_free`).

`RankingScorer` turns tokenised batches into vectors and scores; `build_ranking_student` builds the student the
`ranking` recipe section names; `save_ranking_student` writes it as a model sentence-transformers loads
(`SentenceTransformer`, with a Router for separate towers; `SparseEncoder`; `CrossEncoder`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.encoder_inputs import encoder_inputs
from potstill.errors import UserError
from potstill.signals import RankingScores
from potstill.students.encode import encode_texts, pool
from potstill.students.loading import build_student, freeze_pooler, resolve_model_path, with_recipe_dropout


class DualEncoder(nn.Module):
    """A bi-encoder with separate query and passage towers (`ranking.towers: separate`). `forward(query,
    passage)` runs both on their input dicts in one call (so that a DDP wrapper sees one forward per step)."""

    def __init__(self, query: nn.Module, passage: nn.Module) -> None:
        super().__init__()
        self.query, self.passage = query, passage

    def forward(self, query: dict[str, torch.Tensor], passage: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        return self.query(**query), self.passage(**passage)


def joined_inputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Two tokenised batches as one, right-padded to the longer length (pad id, mask 0, token type 0)."""
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def padded(x: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    return {k: torch.cat([padded(a[k], pad_id if k == "input_ids" else 0), padded(b[k], pad_id if k == "input_ids"
                                                                                  else 0)]) for k in a}


def batch_inputs(batch: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The model inputs stored in a collated batch under `prefix` ("pair_", "query_", "passage_", ...)."""
    return {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}


def is_cross_encoder_folder(path: str) -> bool:
    """Whether the model folder's config names a *ForSequenceClassification architecture."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


class RankingScorer:
    """Tokenisation, bi-encoder vectors and scores of ranking models, with the recipe's `max_length`, `pooling`,
    `similarity` ("dot" or "cosine") and encoding `batch_size`; `to_device` moves a tokenised batch."""

    def __init__(self, tokenizer: Any, *, max_length: int, pooling: str, similarity: str, batch_size: int,
                 to_device: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.tokenizer, self.max_length, self.pooling = tokenizer, max_length, pooling
        self.similarity_kind, self.batch_size, self.to_device = similarity, batch_size, to_device

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return encoder_inputs(enc)

    def embed(self, model: nn.Module, batch: dict[str, torch.Tensor], side: str = "passage") -> torch.Tensor:
        """Vectors of a bi-encoder's `side` tower ("query" or "passage"; the same model unless a DualEncoder)."""
        tower = getattr(model, side) if isinstance(model, DualEncoder) else model
        inputs = encoder_inputs(batch)
        return self.vectors(tower(**inputs), inputs)

    def vectors(self, out: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(out, torch.Tensor):  # a model that returns its vectors (splade, inference-free queries)
            return out
        return pool(out.last_hidden_state, inputs["attention_mask"], self.pooling)

    def query_and_passage_vectors(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
        """A bi-encoder's vectors of the batch's queries and passages in ONE forward of `model` (which may be
        DDP-wrapped: DDP expects one forward per backward): both towers of a DualEncoder, or the shared
        encoder on the queries and passages joined into one padded batch."""
        queries, passages = batch_inputs(batch, "query_"), batch_inputs(batch, "passage_")
        if isinstance(getattr(model, "module", model), DualEncoder):
            q_out, p_out = model(queries, passages)
            return self.vectors(q_out, queries), self.vectors(p_out, passages)
        joined = joined_inputs(queries, passages, self.tokenizer.pad_token_id or 0)
        vectors = self.vectors(model(**joined), joined)
        n = queries["input_ids"].shape[0]
        return vectors[:n], vectors[n:]

    def similarity(self, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """(Q, P) scores of query and passage vectors, or (B, C) when passages are (B, C, D)."""
        if self.similarity_kind == "cosine":
            queries = nn.functional.normalize(queries.float(), dim=-1)
            passages = nn.functional.normalize(passages.float(), dim=-1)
        if passages.dim() == 3:
            return torch.einsum("bd,bcd->bc", queries.float(), passages.float())
        return queries.float() @ passages.float().T

    def encode(self, model: nn.Module, texts: list[str], *, side: str = "passage") -> torch.Tensor:
        """Pooled vectors (float32, CPU) of a bi-encoder's `side` tower, in the input order."""
        return encode_texts(model, texts, lambda chunk: self.embed(model, self.to_device(self.tokenize(chunk)), side),
                            batch_size=self.batch_size)

    def collate(self, records: list[dict], indices: list[int], *, pairs: bool, towers: bool,
                relevant_to: Callable[[dict], set[str]] | None = None, in_batch_pairs: bool = False) -> dict[str, Any]:
        """Tensors of (query, positive, negatives) records, `index` (`indices`) and `shape` (B, 1 + N): with
        `pairs` the tokenised (query, candidate) pairs of a cross-encoder ("pair_*"), with `towers` the queries
        and candidates apart for a bi-encoder ("query_*", "passage_*"); with `relevant_to`, the (B, B)
        `in_batch_mask` (True where item j's positive is not relevant to query i) and, with `in_batch_pairs`,
        every query × positive pair for a live cross-encoder teacher ("in_batch_pair_*")."""
        queries = [rec["query"] for rec in records]
        candidates = [[rec["positive"], *rec["negatives"]] for rec in records]
        c = len(candidates[0])
        flat = [p for row in candidates for p in row]
        batch: dict[str, Any] = {"index": torch.tensor(indices), "shape": (len(records), c)}
        if pairs:
            tokens = self.tokenize([q for q in queries for _ in range(c)], flat)
            batch.update({f"pair_{k}": v for k, v in tokens.items()})
        if towers:
            batch.update({f"query_{k}": v for k, v in self.tokenize(queries).items()})
            batch.update({f"passage_{k}": v for k, v in self.tokenize(flat).items()})
        if relevant_to is not None:
            positives = [row[0] for row in candidates]
            relevant = [relevant_to(rec) for rec in records]
            batch["in_batch_mask"] = torch.tensor([[p not in rel for p in positives] for rel in relevant])
            if in_batch_pairs:
                tokens = self.tokenize([q for q in queries for _ in positives], positives * len(queries))
                batch.update({f"in_batch_pair_{k}": v for k, v in tokens.items()})
        return batch

    def score(self, model: nn.Module, batch: dict[str, Any], *, cross: bool, terms: bool = False,
              query_terms: bool = True) -> RankingScores:
        """Scores of a collated batch (`batch["shape"]` = (B, C)): a cross-encoder on the pairs, a bi-encoder's
        similarities (and its in-batch matrix when the batch has an `in_batch_mask`). `terms`: also hand over
        the vectors as term weights (a SPLADE student, for `sparse_flops`), the query side when `query_terms`."""
        b, c = batch["shape"]
        if cross:
            return RankingScores(model(**batch_inputs(batch, "pair_")).logits.reshape(b, c).float())
        q, flat = self.query_and_passage_vectors(model, batch)
        p = flat.reshape(b, c, -1)
        in_batch = self.similarity(q, p[:, 0]) if "in_batch_mask" in batch else None
        scores = RankingScores(self.similarity(q, p), in_batch, batch.get("in_batch_mask"))
        if terms:
            scores.query_terms = q if query_terms else None
            scores.passage_terms = flat
        return scores


def check_ranking_kinds(ranking: Any, *, student_type: str, in_batch: bool, teacher_model: bool) -> None:
    """Refuse combinations of student kind and `ranking` options that cannot work, before anything loads;
    `in_batch`: in-batch scores are needed, `teacher_model`: the recipe names a teacher model."""
    if student_type == "cross_encoder" and (in_batch or ranking.towers == "separate"):
        what = "in-batch scores" if in_batch else "ranking.towers: separate"
        raise UserError(f"field ranking.student_type: {what} need(s) a bi-encoder student; a cross-encoder "
                        f"scores only the pairs it is given")
    if ranking.inference_free and student_type != "splade":
        raise UserError("field ranking.inference_free: only a splade student has an inference-free query side; "
                        "set ranking.student_type: splade")
    if student_type == "splade" and (ranking.similarity != "dot" or ranking.towers == "separate"):
        raise UserError("field ranking.student_type: a splade student scores by dot product with one encoder "
                        "(ranking.similarity: dot, towers: shared; for cheap queries use inference_free: true)")
    if in_batch and not teacher_model:
        raise UserError("field teacher.path: in-batch teacher scores (in_batch_margin_mse) need a teacher model; "
                        "a score file holds only the pairs it lists")


def build_ranking_student(cfg: Any, ranking: Any, *, student_type: str, teacher: nn.Module | None,
                          teacher_type: str, tokenizer: Any, seed: int) -> nn.Module:
    """The student of the recipe's `student` (`cfg`) and `ranking` sections: a cross-encoder, a bi-encoder
    (its HF pooler frozen; two towers with `ranking.towers: separate`) or a SPLADE student (inference-free: a
    `DualEncoder` whose query tower is `InferenceFreeQuery`, IDF still zero)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    if student_type == "splade":
        from potstill.students.splade import splade_from_encoder
        from potstill.students.splade_inference_free import InferenceFreeQuery

        if cfg.init == "pretrained":
            student = with_recipe_dropout(splade_from_encoder(resolve_model_path(cfg.path, field="student.path")),
                                          cfg)
        elif teacher_type != "bi_encoder":
            raise UserError(f"field student.init: {cfg.init} builds a splade student from a bi-encoder teacher's "
                            f"encoder; the teacher here is a {teacher_type.replace('_', '-')}: use init: "
                            f"pretrained (e.g. path: builtin:minilm)")
        else:
            student = splade_from_encoder(build_student(cfg, teacher, seed=seed, auto_cls=AutoModel))
        if ranking.inference_free:
            return DualEncoder(query=InferenceFreeQuery(student.vocab_size, tokenizer.all_special_ids),
                               passage=student)
        return student.train()
    same_kind = student_type == teacher_type
    if cfg.init in ("layers_from_teacher", "from_config") and not same_kind:
        raise UserError(f"field student.init: {cfg.init} builds a {teacher_type.replace('_', '-')} from "
                        f"the teacher, but ranking.student_type is {student_type}; use init: pretrained "
                        f"(e.g. path: builtin:minilm) or the teacher's kind")
    if cfg.init == "static":
        raise UserError("field student.init: static students are for the embedding task")
    if cfg.init == "pretrained" and student_type == "cross_encoder":
        path = resolve_model_path(cfg.path, field="student.path")
        try:
            student = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        except (OSError, ValueError) as exc:
            raise UserError(f"field student.path: cannot load a cross-encoder from {path}: {exc}") from None
        return with_recipe_dropout(student, cfg).train()
    auto_cls = AutoModelForSequenceClassification if student_type == "cross_encoder" else AutoModel
    student = build_student(cfg, teacher, seed=seed, auto_cls=auto_cls)
    if student_type == "cross_encoder":
        return student
    freeze_pooler(student)
    if ranking.towers == "separate":
        return DualEncoder(query=student, passage=copy.deepcopy(student))
    return student


def prepare_sparse_student(student: nn.Module, scorer: RankingScorer, collection: list[str]) -> None:
    """A SPLADE student before training: an inference-free query tower gets the IDF of the collection, and a new
    MLM head starts with ~128 active terms on the median passage of the collection (`calibrate_head_bias` on
    up to 256 of them), neither all terms nor a dead ReLU."""
    from potstill.students.splade import calibrate_head_bias
    from potstill.students.splade_inference_free import InferenceFreeQuery, idf_from_collection

    if isinstance(student, DualEncoder) and isinstance(student.query, InferenceFreeQuery):
        student.query.idf.copy_(idf_from_collection(scorer.tokenizer, collection,
                                                    vocab_size=student.query.idf.numel()))
    encoder = student.passage if isinstance(student, DualEncoder) else student
    if getattr(encoder.mlm, "potstill_new_head", False):
        sample = scorer.to_device(scorer.tokenize(collection[:: max(1, len(collection) // 256)][:256]))
        calibrate_head_bias(encoder, **sample)


def save_ranking_student(model: nn.Module, tokenizer: Any, path: Path, *, student_type: str, pooling: str,
                         similarity: str, max_length: int) -> None:
    """A bi-encoder as a sentence-transformers folder (separate towers: a Router with query and document
    routes, for `encode_query` / `encode_document`); a splade student as a sentence-transformers
    `SparseEncoder` (inference-free: its query route is the static IDF weights); a cross-encoder as an HF
    sequence classifier (which sentence-transformers' `CrossEncoder` loads)."""
    from potstill.students.save import save_hf_student, save_sentence_transformer

    if student_type == "cross_encoder":
        save_hf_student(model, tokenizer, path)
        return
    if student_type == "splade":
        from potstill.students.splade import save_sparse_encoder

        free = isinstance(model, DualEncoder)
        save_sparse_encoder(model.passage if free else model, tokenizer, path, max_seq_length=max_length,
                            query_idf=model.query.idf if free else None)
        return
    options: dict[str, Any] = {"pooling": pooling, "normalize": similarity == "cosine", "max_seq_length": max_length}
    if isinstance(model, DualEncoder):
        save_sentence_transformer(model.passage, tokenizer, path, query_model=model.query, **options)
        return
    save_sentence_transformer(model, tokenizer, path, **options)
