"""Cross-tokenizer distillation in the causal_lm task: a student whose tokenizer differs from the teacher's,
trained with the objectives `uld` / `gold` (`potstill.losses.uld`) or `first_token_kl`
(`potstill.losses.first_token_kl`) on aligned spans of text.

The student's tokenizer is `student.tokenizer` (a folder, or `bpe:<size>`: trained on data.train's text,
`potstill.students.tokenizer`), or a pretrained student's own (`student.path`). When it differs
from the teacher's, every objective must be uld, gold or first_token_kl (others compare token ids of one
vocabulary and are refused with the shared-tokenizer message). Then:

- each record is tokenized by both tokenizers (`potstill.data.cross_tokenizer.PairedEncoder`); the student
  trains on its own ids and the teacher runs on its own;
- a batch carries, per side, the row predicting each span's first token and the rows / ids of its later tokens;
  each side's signal is `SpanLogits` (`potstill.data.token_alignment.merge_spans`: the first row's logits and
  the later tokens' log-probabilities at the objectives' temperature), and the teacher's carries `matched_ids`
  (`vocab_mapping`) for gold and, when first_token_kl is asked for, `first_token_of` (`first_token_map`);
- the loop divides by the batch's aligned spans (`count_rows`); the hard-label term's token sum is rescaled
  by spans / tokens so that it stays a per-token mean;
- with `teacher.cache` (`potstill cache`), the teacher is read instead of run: the cache holds one row per
  aligned span, the top k of the span's merged distribution (its log scale added to the k log-probs and to
  the tail). A step hands the objectives a `TopKTeacher` (the first token's normalised log-probs) and the
  log scale, and the objectives take their top-k forms (`potstill.losses.uld_topk`, `first_token_kl_topk`: the
  tail mass spread evenly over the other V_t − k ids; exact for k = V_t);
- evaluation reports each model on its own tokens, plus `bits_per_byte` (summed NLL / ln 2 / bytes of target
  text), which does not depend on the tokenizer and so compares teacher and student.

Not combined with: generation (lmbda, seq_kd), data.packing, chat `messages` records,
step_by_step, trainer.fused_lm_head, data.domains, student.init layers_from_teacher.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.config import Recipe
from potstill.data.cross_tokenizer import PairedEncoder
from potstill.data.lm_records import tokenizer_fingerprint, tokenizer_name
from potstill.data.token_alignment import first_token_map, matched_ids, merge_spans, vocab_mapping
from potstill.errors import UserError
from potstill.losses.catalogue import CROSS_TOKENIZER_OBJECTIVES
from potstill.losses.sparse import TopKTeacher
from potstill.signals import SpanLogits
from potstill.students.tokenizer import BPE_PREFIX, bpe_vocab_size, train_byte_level_bpe
from potstill.tasks.models import resolve_model_path
from potstill.teachers.cache_format import top_k_of_dense_rows

Batch = dict[str, Any]


def _load_tokenizer(path: str, field: str) -> Any:
    from transformers import AutoTokenizer

    folder = resolve_model_path(path, field=field)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"field {field}: cannot load a tokenizer from {folder}: {exc}") from None


def student_tokenizer(recipe: Recipe, *, run_dir: Path, train_texts: Callable[[], list[str]]
                      ) -> tuple[Any, str] | None:
    """The student's own tokenizer and the field it comes from: student.tokenizer (a folder, or `bpe:<size>`:
    a byte-level BPE trained on `train_texts()` once, kept in `<run>/student_tokenizer`), else a pretrained
    student's folder's (None when it has none, or the student has no own tokenizer)."""
    cfg = recipe.student
    spec = getattr(cfg, "tokenizer", None)
    if spec and spec.startswith(BPE_PREFIX):
        size = bpe_vocab_size(spec)
        folder = Path(run_dir) / "student_tokenizer"
        if (folder / "tokenizer.json").is_file():
            tok = _load_tokenizer(str(folder), "student.tokenizer")
            if len(tok) == size:
                return tok, "student.tokenizer"
        return train_byte_level_bpe(train_texts(), size, folder), "student.tokenizer"
    if spec:
        return _load_tokenizer(spec, "student.tokenizer"), "student.tokenizer"
    if cfg.init != "pretrained":
        return None
    try:
        return _load_tokenizer(cfg.path, "student.path"), "student.path"
    except UserError:
        return None  # a folder without a tokenizer uses the teacher's


def cross_tokenizer_for(recipe: Recipe, tokenizer: Any, device: torch.device, *, run_dir: Path,
                        train_texts: Callable[[], list[str]]) -> CrossTokenizer | None:
    """The cross-tokenizer set-up when the student's tokenizer differs from the teacher's `tokenizer`, else None.

    A differing tokenizer is refused unless every objective is uld, gold or first_token_kl (no objective at all is plain
    fine-tuning of the student on its own tokens, the teacher then only evaluated)."""
    own = student_tokenizer(recipe, run_dir=run_dir, train_texts=train_texts)
    if own is None or tokenizer_fingerprint(own[0]) == tokenizer_fingerprint(tokenizer):
        return None
    student_tok, field = own
    others = [o.name for o in recipe.objectives if o.name not in CROSS_TOKENIZER_OBJECTIVES]
    if others:
        raise UserError(f"field {field}: the student's tokenizer {tokenizer_name(student_tok)} differs from the "
                        f"teacher's {tokenizer_name(tokenizer)}; cross-tokenizer distillation is not supported by "
                        f"{', '.join(others)}: teacher and student must share one tokenizer, or use the objectives "
                        f"{' / '.join(CROSS_TOKENIZER_OBJECTIVES)} only")
    return CrossTokenizer(recipe, tokenizer, student_tok, device)


def check_cross_recipe(recipe: Recipe) -> None:
    """The settings a cross-tokenizer run cannot combine with, each refused by its field."""
    refused = {
        "generation.lmbda": bool(recipe.generation.lmbda),
        "generation.seq_kd": recipe.generation.seq_kd,
        "data.packing": recipe.data.packing,
        "step_by_step": recipe.step_by_step is not None,
        "trainer.fused_lm_head": recipe.trainer.fused_lm_head,
        "data.domains": recipe.data.domains is not None,
        "student.init layers_from_teacher": recipe.student.init == "layers_from_teacher",
    }
    for field, on in refused.items():
        if on:
            raise UserError(f"field {field}: not supported when teacher and student tokenizers differ "
                            f"(cross-tokenizer distillation); remove it")
    if recipe.data.format == "messages":
        raise UserError("field data.format: cross-tokenizer distillation reads `text` or `prompt` + `completion` "
                        "records, not chat `messages`")


def _temperatures(recipe: Recipe) -> tuple[float, float]:
    """The (student, teacher) temperature of the cross objectives, which the span merge uses too: one pair for all."""
    pairs = {(float(o.params.get("temperature", 1.0)),
              float(o.params.get("teacher_temperature") or o.params.get("temperature", 1.0)))
             for o in recipe.objectives}
    if len(pairs) > 1:
        raise UserError("objectives: the cross-tokenizer objectives of one run must share temperature and "
                        "teacher_temperature (the merged spans are computed once per batch)")
    return pairs.pop() if pairs else (1.0, 1.0)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _pad_id(tokenizer: Any) -> int:
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


class CrossTokenizer:
    """What a cross-tokenizer causal_lm run adds: the paired encoder, the span indices of a batch, the two
    `SpanLogits` signals and the tokenizer-free evaluation."""

    def __init__(self, recipe: Recipe, teacher_tokenizer: Any, student_tokenizer: Any, device: torch.device):
        check_cross_recipe(recipe)
        self.recipe = recipe
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.encoder = PairedEncoder(student_tokenizer, teacher_tokenizer, recipe.data.max_length,
                                     recipe.data.add_eos)
        self.matched_ids = matched_ids(vocab_mapping(teacher_tokenizer, student_tokenizer)).to(device)
        self.temperature, self.teacher_temperature = _temperatures(recipe)
        self.teacher_vocab = len(teacher_tokenizer)
        self.teacher_pad = _pad_id(teacher_tokenizer)
        self.first_token_of = None
        if any(o.name == "first_token_kl" for o in recipe.objectives):
            self.first_token_of = first_token_map(teacher_tokenizer, student_tokenizer, self.teacher_vocab).to(device)

    # ------------------------------------------------------------------ student
    def build_student(self, teacher: nn.Module | None, auto_cls: Any) -> nn.Module:
        """The recipe's student; `init: from_config` takes the teacher's config with the student tokenizer's
        vocabulary size and special ids (student.config wins)."""
        from potstill.students.loading import build_student

        cfg = self.recipe.student
        if cfg.init == "from_config":
            if teacher is None:
                raise UserError("teacher.path: a student with its own tokenizer (student.tokenizer) is built from a "
                                "teacher model's config; give teacher.path, or a pretrained student")
            tok = self.student_tokenizer
            special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                       "eos_token_id": tok.eos_token_id}
            fields = {"vocab_size": len(tok), **{k: v for k, v in special.items() if v is not None}, **cfg.config}
            cfg = cfg.model_copy(update={"config": fields})
        return build_student(cfg, teacher, seed=self.recipe.seed, auto_cls=auto_cls)

    # ------------------------------------------------------------------ batches
    def collate(self, rows: list[dict], student_width: int) -> Batch:
        """The teacher's padded ids and, per side, the span rows: `*_first` (the flat row predicting each span's
        first token), `*_later_rows` / `*_later_tokens` / `*_later_span` (each later token of a span)."""
        teacher_ids = _pad([ex["teacher_ids"] for ex in rows], self.teacher_pad)
        teacher_mask = _pad([[1] * len(ex["teacher_ids"]) for ex in rows], 0)
        batch: Batch = {"teacher_input_ids": teacher_ids, "teacher_attention_mask": teacher_mask,
                        "spans_per_record": torch.tensor([len(ex["spans"]) for ex in rows], dtype=torch.long)}
        for side, ids_key, width, lo in (("s", "input_ids", student_width, 0), ("t", "teacher_ids",
                                                                                teacher_ids.shape[1], 2)):
            first, later_rows, later_tokens, later_span = [], [], [], []
            n = 0
            for b, ex in enumerate(rows):
                for span in ex["spans"]:
                    start, stop = span[lo], span[lo + 1]
                    first.append(b * width + start - 1)
                    for k in range(start + 1, stop):
                        later_rows.append(b * width + k - 1)
                        later_tokens.append(ex[ids_key][k])
                        later_span.append(n)
                    n += 1
            batch.update({f"{side}_first": torch.tensor(first, dtype=torch.long),
                          f"{side}_later_rows": torch.tensor(later_rows, dtype=torch.long),
                          f"{side}_later_tokens": torch.tensor(later_tokens, dtype=torch.long),
                          f"{side}_later_span": torch.tensor(later_span, dtype=torch.long)})
        return batch

    @staticmethod
    def count_rows(batch: Batch) -> int:
        """The batch's aligned spans (the loop's divisor)."""
        return int(batch["s_first"].numel())

    def hard_label_scale(self, batch: Batch) -> float:
        """spans / counted student tokens: keeps the hard-label term a per-token mean under the span divisor."""
        tokens = int((batch["targets"] != -100).sum())
        return self.count_rows(batch) / tokens if tokens else 0.0

    # ------------------------------------------------------------------ signals
    def _spans(self, logits: torch.Tensor, batch: Batch, side: str, temperature: float) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        flat = logits.reshape(-1, logits.shape[-1])
        return merge_spans(flat, batch[f"{side}_first"], batch[f"{side}_later_rows"], batch[f"{side}_later_tokens"],
                           batch[f"{side}_later_span"], temperature=temperature)

    def student_signal(self, logits: torch.Tensor, batch: Batch) -> SpanLogits:
        return SpanLogits(*self._spans(logits, batch, "s", self.temperature), token_logits=logits)

    def teacher_logits(self, teacher: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[B, T, V_t]` next-token logits of the teacher over its tokenizer's ids."""
        from potstill.tasks.lm_models import causal_logits

        return causal_logits(teacher, ids, mask)[..., :self.teacher_vocab]

    def teacher_signal(self, teacher: nn.Module, batch: Batch, cache: Any = None) -> SpanLogits:
        """The teacher's span rows: run live, or read from a `TopKCache` of span rows (`teacher_topk_spans`)."""
        if cache is not None:
            return self._cached_signal(cache, batch)
        with torch.inference_mode():
            logits = self.teacher_logits(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
            rows, scale = self._spans(logits, batch, "t", self.teacher_temperature)
        return SpanLogits(rows, scale, self.matched_ids, first_token_of=self.first_token_of)

    # ------------------------------------------------------------------ top-k cache of span rows
    def cache_meta(self, examples: list[dict]) -> dict[str, Any]:
        """What the cached span rows depend on besides the student's ids: the teacher's tokenizer and vocabulary,
        and the teacher's ids and aligned spans of every training example."""
        h = hashlib.sha256()
        for ex in examples:
            for part in (ex["teacher_ids"], [i for span in ex["spans"] for i in span]):
                h.update(torch.tensor(part, dtype=torch.int64).numpy().tobytes())
                h.update(b"|")
        return {"teacher_tokenizer_sha256": tokenizer_fingerprint(self.teacher_tokenizer),
                "alignment_sha256": h.hexdigest(), "vocab_size": self.teacher_vocab, "rows": "aligned spans"}

    def check_cache(self, cache: Any) -> None:
        """A span cache holds the teacher's rows at one temperature, which must be the objectives' teacher
        temperature (`_temperatures`: one for all cross-tokenizer objectives)."""
        if self.recipe.objectives and cache.temperature != self.teacher_temperature:
            params = self.recipe.objectives[0].params
            field = "teacher_temperature" if params.get("teacher_temperature") else "temperature"
            raise UserError(f"field objectives.0.params.{field}: {self.teacher_temperature:g}, but {cache.path} "
                            f"holds the teacher's span rows at temperature {cache.temperature:g}; use that "
                            f"temperature, or rebuild the cache with `potstill cache --temperature "
                            f"{self.teacher_temperature:g}`")

    def teacher_topk_spans(self, teacher: nn.Module, batch: Batch, k: int, temperature: float
                           ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per record of `batch`, one cache row per aligned span: the top `k` ids of the span's merged teacher
        distribution at `temperature`, their log-probs and the log tail mass, both plus the span's log scale."""
        logits = self.teacher_logits(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
        rows, scale = self._spans(logits, batch, "t", temperature)
        ids, logprobs, tail = top_k_of_dense_rows(rows, k, temperature)
        counts = batch["spans_per_record"].tolist()
        return list(zip(ids.split(counts), (logprobs + scale[:, None]).split(counts), (tail + scale).split(counts),
                        strict=True))

    def _cached_signal(self, cache: Any, batch: Batch) -> SpanLogits:
        top, mask = cache.get(batch["index"].tolist(), expect_lengths=batch["spans_per_record"].tolist(),
                              return_mask=True)
        keep = mask.reshape(-1)
        k = top.k
        logprobs, tail = top.logprobs.reshape(-1, k)[keep], top.tail().reshape(-1)[keep]
        log_scale = torch.logsumexp(torch.cat([logprobs, tail[:, None]], 1), 1)  # the span's mass, ≤ 0
        first = TopKTeacher(top.ids.reshape(-1, k)[keep], logprobs - log_scale[:, None], tail - log_scale)
        device = self.matched_ids.device
        return SpanLogits(first.to(device), log_scale.to(device), self.matched_ids, vocab=self.teacher_vocab,
                          first_token_of=self.first_token_of)

    # ------------------------------------------------------------------ evaluation
    def teacher_examples(self, examples: list[dict]) -> list[dict[str, list[int]]]:
        """The teacher's side of paired examples, in the shared-tokenizer example form (its span tokens counted)."""
        out = []
        for ex in examples:
            ids = ex["teacher_ids"]
            targets = [-100] * len(ids)
            for _, _, start, stop in ex["spans"]:
                for k in range(start, stop):
                    targets[k - 1] = ids[k]
            out.append({"input_ids": ids, "targets": targets})
        return out

    def teacher_batch(self, rows: list[dict], indices: list[int]) -> Batch:
        ids = _pad([ex["input_ids"] for ex in rows], self.teacher_pad)
        return {"input_ids": ids, "attention_mask": _pad([[1] * len(ex["input_ids"]) for ex in rows], 0),
                "targets": _pad([ex["targets"] for ex in rows], -100), "index": torch.tensor(indices)}

    def evaluate(self, stats: Callable[..., dict[str, float]], model: nn.Module, examples: list[dict], *,
                 teacher_role: bool) -> dict[str, float]:
        """perplexity / token_accuracy on the model's own tokens and bits_per_byte over the target text.

        `stats(model, examples, batch_of=None | fn, logits=None | fn)` is the task's token statistics."""
        from potstill.eval.lm import token_metrics

        n_bytes = sum(ex["n_bytes"] for ex in examples)
        if teacher_role:
            sums = stats(model, self.teacher_examples(examples), batch_of=self.teacher_batch,
                         logits=lambda m, b: self.teacher_logits(m, b["input_ids"], b["attention_mask"]))
        else:
            sums = stats(model, examples)
        metrics = token_metrics(sums)
        metrics["bits_per_byte"] = sums["nll"] / math.log(2) / n_bytes if n_bytes else float("nan")
        return metrics
