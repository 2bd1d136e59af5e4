"""Masked-language-model (further) pre-training of a BERT-layout encoder, with an optional teacher on the
[CLS] vector: the text side of "Self-Distillation for Further Pre-training of Transformers" (Lee et al., ICLR
2023; the loss in `potstill.losses.further_pretraining`).

The student is a Hugging Face `*ForMaskedLM`. Each training text is tokenized (data.max_length), then
`masking.mlm_probability` of its real tokens are chosen, 80 % of those become the mask token, 10 % a random
token and 10 % stay (transformers' `DataCollatorForLanguageModeling`, the BERT / RoBERTa recipe). The masking
of micro-batch g is drawn from (seed, g, process), so a resumed run masks the same tokens.

Per batch the student runs twice: on the masked text for its MLM loss (cross-entropy at the chosen tokens,
weighted by `trainer.hard_label_weight`; the prediction head runs at those tokens only), and on the unmasked
text for its final-layer [CLS] vector (after the last layer norm), the signal an objective such as
`further_pretraining_sd` compares with the teacher's [CLS] vector of the same unmasked text. The teacher is
read only when there are objectives; with none (stage 1 of the paper: plain further pre-training) it is
loaded but never run.

Metrics on held-out text (data.eval): `mlm_loss` (mean cross-entropy per chosen token, fixed masking) and
`mlm_accuracy`; with eval.probe_train / probe_test (text, label) also `probe_accuracy`, a logistic regression
on the frozen [CLS] vectors. The student is saved with `save_pretrained` (MLM head included): it loads with
`AutoModelForMaskedLM` or, as an encoder, with `AutoModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.encoder_inputs import encoder_inputs
from potstill.errors import UserError
from potstill.eval import linear_probe_accuracy
from potstill.tasks.base import Task
from potstill.tasks.models import build_student, load_hf_teacher

EVAL_MASK_SEED = 7_919


@dataclass
class MaskedLMSignal:
    """The student's signal: `cls` `[B, D]`, the final-layer [CLS] vectors of the unmasked texts, and `logits`
    `[M, V]`, the MLM predictions at the M chosen tokens (in row-major order of `labels != -100`)."""

    cls: torch.Tensor
    logits: torch.Tensor


def mlm_head(model: nn.Module) -> nn.Module | None:
    """The prediction head of a BERT-layout (`.cls`) or RoBERTa-layout (`.lm_head`) masked LM, or None."""
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def cls_vectors(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Final-layer [CLS] vectors `[B, D]` of the unmasked inputs (the encoder's last hidden state, position 0)."""
    encoder = getattr(model, "base_model", model)
    inputs = encoder_inputs(batch)
    return encoder(**inputs).last_hidden_state[:, 0]


def masked_logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """MLM logits `[M, V]` at the chosen tokens (`mlm_labels != -100`) of the masked inputs."""
    chosen = batch["mlm_labels"] != -100
    inputs = {"input_ids": batch["masked_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    head = mlm_head(model)
    if head is None:  # another layout: the model's full logits, then the chosen rows
        return model(**inputs).logits[chosen]
    hidden = getattr(model, "base_model", model)(**inputs).last_hidden_state
    return head(hidden[chosen])


class MaskedLMTask(Task):
    signal_kind = "embedding"
    name = "masked_lm"
    captures_internals = False
    metric_names = ("mlm_loss", "mlm_accuracy", "probe_accuracy")

    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling

        r = self.recipe
        if r.teacher.path is None:
            raise UserError("field teacher.path: the masked_lm task needs a Hugging Face encoder folder (the "
                            "further-pretrained teacher, or the starting model itself for plain further pre-training)")
        self.teacher, self.tokenizer = load_hf_teacher(r.teacher.path, AutoModelForMaskedLM)
        self.teacher.to(self.device)
        self.student = build_student(r.student, self.teacher, seed=r.seed, auto_cls=AutoModelForMaskedLM)
        if getattr(self.student, "get_output_embeddings", lambda: None)() is None:
            raise UserError(f"field student: the masked_lm task trains a masked language model (e.g. "
                            f"BertForMaskedLM), got {type(self.student).__name__}")
        if self.tokenizer.mask_token is None:
            raise UserError(f"field teacher.path: the tokenizer of {r.teacher.path} has no mask token")
        m = r.masking
        self.collator = DataCollatorForLanguageModeling(
            self.tokenizer, mlm=True, mlm_probability=m.mlm_probability, mask_replace_prob=m.mask_replace_prob,
            random_replace_prob=m.random_replace_prob)
        self.train_records = self.load(r.data.train, required=("text",))
        self.eval_records = self.load(r.data.eval, required=("text",)) if r.data.eval else []

    # ---- batches
    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.recipe.data.max_length,
                             return_tensors="pt", return_special_tokens_mask=True)
        return encoder_inputs(enc, extra=("special_tokens_mask",))

    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        batch: dict[str, Any] = self._tokenize([rec["text"] for rec in records])
        batch["index"] = torch.tensor(indices)
        return batch

    def mask(self, batch: dict[str, Any], seed: int) -> dict[str, Any]:
        """`batch` with `masked_ids` and `mlm_labels` (-100 where not chosen), drawn from `seed`."""
        self.collator.generator = torch.Generator().manual_seed(seed)
        ids = batch["input_ids"].cpu()
        masked, labels = self.collator.torch_mask_tokens(ids.clone(), batch["special_tokens_mask"].cpu())
        return {**batch, "masked_ids": masked.to(self.device), "mlm_labels": labels.to(self.device)}

    def prepare_batch(self, batch: dict[str, Any], student: nn.Module, micro_batch: int) -> dict[str, Any]:
        """The masking of this micro-batch, drawn from (seed, micro-batch, process)."""
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return self.mask(batch, (self.recipe.seed * 1_000_003 + micro_batch) * 1_009 + rank)

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    # ---- signals
    def teacher_signal(self, batch: dict[str, Any]) -> torch.Tensor:
        assert self.teacher is not None
        with torch.no_grad():
            return cls_vectors(self.teacher, batch).float()

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> MaskedLMSignal:
        return MaskedLMSignal(cls=cls_vectors(model, batch), logits=masked_logits(model, batch))

    def adapt_objective(self, name: str, fn: Any) -> Any:
        """Objectives compare the student's [CLS] vectors with the teacher's."""

        def on_cls(student: MaskedLMSignal, teacher: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return fn(student.cls, teacher, **kwargs)

        return on_cls

    def hard_label_loss(self, student_signal: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The MLM loss: the mean cross-entropy over the batch's chosen tokens, × the batch's texts (the loop
        divides by the texts of the step)."""
        if student_signal.logits.shape[0] == 0:
            return student_signal.cls.sum() * 0.0
        gold = batch["mlm_labels"][batch["mlm_labels"] != -100]
        ce = nn.functional.cross_entropy(student_signal.logits.float(), gold)
        return ce * batch["index"].numel()

    # ---- evaluation
    def _batches(self, texts: list[str]):
        bs = self.recipe.eval.batch_size
        for start in range(0, len(texts), bs):
            chunk = texts[start:start + bs]
            yield start, self.to_device(self._tokenize(chunk))

    def mlm_scores(self, model: nn.Module, texts: list[str]) -> dict[str, float]:
        """Mean cross-entropy and accuracy per chosen token over `texts`, with a fixed masking."""
        total, right, count, was_training = 0.0, 0, 0, model.training
        model.eval()
        with torch.inference_mode():
            for start, batch in self._batches(texts):
                batch = self.mask(batch, EVAL_MASK_SEED + start)
                logits = masked_logits(model, batch).float()
                gold = batch["mlm_labels"][batch["mlm_labels"] != -100]
                total += float(nn.functional.cross_entropy(logits, gold, reduction="sum"))
                right += int((logits.argmax(-1) == gold).sum())
                count += int(gold.numel())
        model.train(was_training)
        return {"mlm_loss": total / max(count, 1), "mlm_accuracy": right / max(count, 1)}

    def features(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        """Final-layer [CLS] vectors of `texts` `[N, D]` (float32, CPU)."""
        out, was_training = [], model.training
        model.eval()
        with torch.inference_mode():
            for _, batch in self._batches(texts):
                out.append(cls_vectors(model, batch).float().cpu())
        model.train(was_training)
        return torch.cat(out)

    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        r, metrics = self.recipe, {}
        if self.eval_records and role == "student":
            metrics.update(self.mlm_scores(model, [rec["text"] for rec in self.eval_records]))
        if r.eval.probe_train and r.eval.probe_test:
            train = self.load(r.eval.probe_train, required=("text", "label"))
            test = self.load(r.eval.probe_test, required=("text", "label"))
            both = self.features(model, [x["text"] for x in train + test])
            metrics["probe_accuracy"] = linear_probe_accuracy(
                both[:len(train)], [x["label"] for x in train], both[len(train):], [x["label"] for x in test],
                seed=r.seed, standardize=True)
        return metrics

    # ---- output
    def save_student(self, model: nn.Module, path: Path) -> None:
        """`save_pretrained` with the MLM head and the tokenizer (loads with AutoModelForMaskedLM or AutoModel)."""
        from potstill.students import save_hf_student

        save_hf_student(model, self.tokenizer, path)
