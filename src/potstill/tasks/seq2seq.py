"""Encoder–decoder students (`AutoModelForSeq2SeqLM`, e.g. T5) trained on text targets; the signals are the
decoder's logits `[B, T, V]`.

Records become token ids once, in `setup`:

- plain: fields `input` and `target` (map other names with `columns: {input: ..., target: ...}`); the input's
  tokens (with the tokenizer's special tokens) go to the encoder, the target's tokens (plus EOS with
  `data.add_eos`) are the decoder labels.
- `step_by_step` (distilling step-by-step, `potstill.data.step_by_step`): each record (input, label,
  rationale) gives a label view (label_prefix + input → label) and a rationale view (rationale_prefix + input
  → rationale), as in the official T5 code. alpha = 1 drops the rationale view.

Inputs and targets are each cut to `data.max_length` tokens. `train_records[i]` is
``{"input_ids": [...], "labels": [...]}`` (plus `rationale`, the same for the rationale view). A micro-batch
holds right-padded encoder inputs and labels padded with -100; the model shifts the labels right behind its
`decoder_start_token_id` to feed the decoder. With step-by-step views it has 2B rows, the label views then
the rationale views, and `view` says which (as in the causal_lm task).

The loss is the summed token cross-entropy of the labels (`trainer.hard_label_weight`), α-mixed over the
views. KD objectives are not supported for seq2seq students (the recipe refuses them), so the teacher is
optional: `teacher.path` (a Hugging Face seq2seq model) supplies the tokenizer and the weights for
`layers_from_teacher` / `from_config`, and is scored next to the student; without it the tokenizer comes
from `teacher.tokenizer` or a pretrained student's folder, and `init: from_config` builds
`student.config.model_type` (e.g. t5) from scratch.

Metrics on `data.eval` (`potstill.eval.lm`): perplexity and token_accuracy of the teacher-forced targets (the
label view), label_accuracy (the greedy-generated target, up to EOS, decodes to the reference's text) and, for
step-by-step eval records with rationales, rationale_perplexity. The student is saved with
`save_pretrained` and its tokenizer (loads with AutoModelForSeq2SeqLM, no potstill).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.config import DataSource
from potstill.data.lm_records import text_field
from potstill.data.step_by_step import (
    count_label_tokens,
    has_rationales,
    required_columns,
    step_by_step_examples,
    step_by_step_loss,
    step_by_step_rows,
)
from potstill.errors import UserError
from potstill.eval.lm import length_batches, seq2seq_label_accuracy, token_metrics, token_stats
from potstill.tasks.base import Task
from potstill.tasks.lm_models import build_text_student, pad_id_of, resolve_builtin_paths, text_tokenizer, unwrap
from potstill.tasks.models import load_hf_teacher

PLAIN_FIELDS = ("input", "target")


class Seq2SeqTask(Task):
    signal_kind = "logits"
    name = "seq2seq"
    captures_internals = False
    metric_names = ("perplexity", "token_accuracy", "label_accuracy", "rationale_perplexity")

    # ------------------------------------------------------------------ set-up
    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        from transformers import AutoModelForSeq2SeqLM

        r = self.recipe
        resolve_builtin_paths(r, is_main=is_main, barrier=barrier)
        tokenizer = None
        if r.teacher.path is not None:
            self.teacher, tokenizer = load_hf_teacher(r.teacher.path, AutoModelForSeq2SeqLM,
                                                      tokenizer=not r.teacher.tokenizer)
            self.teacher.to(self.device)
        self.tokenizer = text_tokenizer(r, tokenizer, task=self.name)
        self.student = build_text_student(r, self.teacher, self.tokenizer, AutoModelForSeq2SeqLM)
        config = getattr(self.student, "config", None)
        if not getattr(config, "is_encoder_decoder", False):
            raise UserError(f"field student: the seq2seq task needs a Hugging Face encoder-decoder student "
                            f"(AutoModelForSeq2SeqLM, e.g. model_type t5); got {type(self.student).__name__}")
        if config.decoder_start_token_id is None:
            raise UserError("field student.config.decoder_start_token_id: the student's config has none (the token "
                            "its decoder starts from); set it, e.g. to the tokenizer's pad id")
        self.vocab_size = len(self.tokenizer)
        for model, role in ((self.teacher, "teacher"), (self.student, "student")):
            if model is not None and model.config.vocab_size < self.vocab_size:
                raise UserError(f"{role}: the model predicts {model.config.vocab_size} token ids but the tokenizer "
                                f"has {self.vocab_size}; they do not belong together")
        self.pad_id = pad_id_of(self.tokenizer)
        self.train_records = self._examples(r.data.train, "data.train", is_main=is_main)
        self.eval_records = self._examples(r.data.eval, "data.eval", is_main=is_main) if r.data.eval else []
        if not any(ex["labels"] for ex in self.train_records):
            raise UserError("data.train: no target token in any record; check the data")

    # ------------------------------------------------------------------ records → token ids
    def _encode(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _pair(self, source: str, target: str) -> dict[str, list[int]]:
        """Encoder input ids (with special tokens) and decoder labels (plus EOS), each cut to max_length."""
        eos = self.tokenizer.eos_token_id
        max_len = self.recipe.data.max_length
        labels = self._encode(target, special=False) + ([eos] if self.recipe.data.add_eos and eos is not None else [])
        return {"input_ids": self._encode(source, special=True)[:max_len], "labels": labels[:max_len]}

    def _examples(self, source: DataSource, field: str, *, is_main: bool) -> list[dict[str, Any]]:
        sbs = self.recipe.step_by_step
        if sbs is None:
            records = self.load(source, required=PLAIN_FIELDS)
            examples = [self._pair(text_field(rec["input"], "input", f"{field}, record {i}"),
                                   text_field(rec["target"], "target", f"{field}, record {i}"))
                        for i, rec in enumerate(records)]
            with_rationale = False
        else:
            train = field == "data.train"
            records = self.load(source, required=required_columns(sbs, train=train))
            with_rationale = has_rationales(records, sbs, train=train)
            examples = step_by_step_examples(records, sbs, field, self._pair)
        if is_main:
            from potstill.ui import console

            targets = sum(len(ex["labels"]) for ex in examples)
            extra = sum(len(ex["rationale"]["labels"]) for ex in examples) if with_rationale else 0
            console.print(f"{field}: {len(records):,} {'step-by-step' if sbs else 'input/target'} records → "
                          f"{targets:,} target" + (f" + {extra:,} rationale" if with_rationale else "") + " tokens")
        return examples

    def record_lengths(self) -> list[int]:
        return [max(len(v["input_ids"]) + len(v["labels"]) for v in (ex, ex.get("rationale", ex)))
                for ex in self.train_records]

    # ------------------------------------------------------------------ batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        views = step_by_step_rows(records)
        rows = records if views is None else views[0]
        src = max(len(ex["input_ids"]) for ex in rows)
        tgt = max(1, max(len(ex["labels"]) for ex in rows))
        ids = torch.full((len(rows), src), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), src), dtype=torch.long)
        labels = torch.full((len(rows), tgt), -100, dtype=torch.long)
        for b, ex in enumerate(rows):
            n, m = len(ex["input_ids"]), len(ex["labels"])
            ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            mask[b, :n] = 1
            labels[b, :m] = torch.tensor(ex["labels"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.tensor(indices)}
        if views is not None:
            batch["view"] = views[1]
        return batch

    def count_rows(self, batch: dict[str, Any]) -> int:
        """Label tokens (of the label view, with step-by-step views)."""
        return count_label_tokens(batch["labels"], batch.get("view"))

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Decoder logits `[R, T, V]` (teacher-forced on the labels), over the tokenizer's ids."""
        inner = unwrap(model)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if hasattr(inner, "prepare_decoder_input_ids_from_labels"):
            inputs["decoder_input_ids"] = inner.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        else:
            inputs["labels"] = batch["labels"]
        logits = model(**inputs, use_cache=False).logits
        return logits[..., :self.vocab_size] if logits.shape[-1] != self.vocab_size else logits

    def teacher_signal(self, batch: dict[str, Any]) -> torch.Tensor:
        raise UserError("KD objectives are not supported for seq2seq students; train on text targets "
                        "(trainer.hard_label_weight, step_by_step)")

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.logits(model, batch)

    def signal_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["labels"] != -100

    def hard_label_loss(self, student_signal: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Summed token cross-entropy (float32) on the labels; with step-by-step views their α-mix."""
        view, labels = batch.get("view"), batch["labels"]
        if view is None:
            return nn.functional.cross_entropy(student_signal.flatten(0, 1).float(), labels.flatten(),
                                               ignore_index=-100, reduction="sum")
        return step_by_step_loss(student_signal, labels, view, self.recipe.step_by_step.alpha)

    # ------------------------------------------------------------------ evaluation
    def _batch_of(self, records: list[dict], _indices: list[int]) -> dict[str, Any]:
        return self.to_device(self.collate(records, list(range(len(records)))))

    def token_stats(self, model: nn.Module, examples: list[dict]) -> dict[str, float]:
        """Summed teacher-forced nll, correct argmax and counted tokens of `model` on `examples`' labels."""
        return token_stats(model, examples, length_batches(examples, self.recipe.eval.batch_size, None),
                           batch_of=self._batch_of, logits=self.logits, targets_key="labels", row_chunk=None)

    def evaluate(self, model: nn.Module | None, *, role: str = "student") -> dict[str, float]:
        if not self.eval_records or model is None:
            return {}
        mode = model.training
        model.eval()
        labels = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in self.eval_records]
        metrics = token_metrics(self.token_stats(model, labels))
        metrics["label_accuracy"] = seq2seq_label_accuracy(
            model, labels, length_batches(labels, self.recipe.eval.batch_size, None), batch_of=self._batch_of,
            tokenizer=self.tokenizer, pad_id=self.pad_id)
        rationales = [ex["rationale"] for ex in self.eval_records if "rationale" in ex]
        if rationales:
            metrics["rationale_perplexity"] = token_metrics(self.token_stats(model, rationales))["perplexity"]
        model.train(mode)
        return metrics

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        examples = [{"input_ids": ex["input_ids"], "labels": ex["labels"]}
                    for ex in (self.eval_records or self.train_records)[:8]]

        def runner(model: nn.Module):
            def run(chunk: list[dict]) -> torch.Tensor:
                return self.logits(model, self._batch_of(chunk, []))

            return run

        return self.compare_speed(student, examples, runner, unit="examples_per_s",
                                  batch_size=min(4, self.recipe.eval.batch_size), rounds=4)

    # ------------------------------------------------------------------ output
    def save_student(self, model: nn.Module, path: Path) -> None:
        """`save_pretrained` + tokenizer: loads with AutoModelForSeq2SeqLM and AutoTokenizer, no potstill."""
        from potstill.students import save_hf_student

        save_hf_student(model, self.tokenizer, path)
