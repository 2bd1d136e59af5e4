"""Causal language modelling: teacher and student predict the next token; the signals are logits `[B, T, V]`.

Records become token sequences once, in `setup` (`data.format`, or inferred from the columns):

- `text`: the text's tokens (with the tokenizer's special tokens, plus EOS when `data.add_eos`); every token
  after the first is a target.
- `prompt_completion`: the prompt's tokens (with special tokens) followed by the completion's tokens (plus
  EOS); only completion tokens are targets.
- `messages`: a chat (a list of {role, content}) rendered by the tokenizer's chat template; only the tokens
  of assistant turns (content and end-of-turn marker) are targets. The turns are found by rendering the
  conversation's prefixes (`messages[:k]` with the generation prompt, `messages[:k+1]`) and mapping those
  character spans onto the tokens through the tokenizer's offsets; a template whose prefixes are not prefixes
  of the whole falls back to locating the assistant's text.

Each sequence is cut to `data.max_length` tokens; with `data.packing` the sequences are concatenated instead
and the stream is cut into blocks of `max_length` tokens (the last block may be shorter), so that every
block position has a target and attention runs across record boundaries inside a block.

`train_records[i]` is example i: ``{"input_ids": [...], "targets": [...]}`` of equal length, where
``targets[j]`` is the token the model should predict at position j (the sequence's token j + 1) or -100 when
that token is not counted. Without packing example i is data record i, in file order; with packing it is
block i of the stream. The rows of example i are its positions j with ``targets[j] != -100``, ascending.

Teacher and student must share the tokenizer (their vocabularies are compared); a model whose output has
more ids than the tokenizer (a padded vocabulary) has its logits cut to the tokenizer's ids, so only real
tokens are compared.

Metrics on `data.eval`: perplexity (exp of the mean token NLL over counted targets), token_accuracy (argmax
equals the target), and for a student token_agreement (argmax equals the teacher's) and kl_to_teacher (mean
per-token KL(teacher ‖ student) at temperature 1). `measure` gives parameters and tokens/s.

Distilling step-by-step (`step_by_step`, Hsieh et al. 2023): each record (input, label, rationale — the
teacher's text, e.g. written by `potstill generate`) gives a label view (label_prefix + input → label) and a
rationale view (rationale_prefix + input → rationale), both prompt/completion sequences; a micro-batch holds
both views of the same records, and the hard-label loss mixes the two views' token means with alpha
(`step_by_step_sum`). alpha = 1 drops the rationale view: plain fine-tuning on (label_prefix + input → label).
At inference only the label prefix is used (the official code's `predict: ` / `explain: ` prefixes and its
α·L_label + (1 − α)·L_rationale, checked in google-research/distilling-step-by-step run.py / model_utils.py).
Such a black-box run needs no teacher model: without objectives the recipe may leave teacher.path out and
take the tokenizer from teacher.tokenizer (or a pretrained student's folder); `student.init: from_config`
then builds `student.config.model_type` from scratch (`build_text_student`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.config import DataSource, Recipe
from potstill.errors import UserError
from potstill.io import atomic_write_json
from potstill.losses.fused import LMHeadInputs, fused_linear_cross_entropy
from potstill.tasks.base import Task
from potstill.tasks.models import build_student, load_factory_teacher, load_hf_teacher, resolve_model_path

FORMATS = ("text", "prompt_completion", "messages")
FORMAT_FIELDS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}
# Evaluation runs at most this many tokens per forward pass (bounds the [B, T, V] logits in memory).
EVAL_TOKENS = 1024
# Metric rows are reduced this many at a time (bounds the float32 log-softmax copies).
EVAL_ROW_CHUNK = 256


def shift_targets(ids: list[int], counted: list[bool]) -> list[int]:
    """Targets of one sequence: position j predicts token j + 1 when that token is counted, else -100."""
    targets = [tok if keep else -100 for tok, keep in zip(ids[1:], counted[1:], strict=True)]
    return targets + [-100] if ids else []


def pack(sequences: list[tuple[list[int], list[bool]]], block: int) -> list[dict[str, list[int]]]:
    """Concatenate sequences and cut the stream into examples of `block` input tokens.

    Example b holds stream tokens [b·block, (b+1)·block) as inputs; its targets are the next tokens, so the
    block's last position predicts the first token of the next block. Every stream token but the first is
    the target of exactly one position.
    """
    ids = [t for seq, _ in sequences for t in seq]
    counted = [c for _, flags in sequences for c in flags]
    out = []
    for start in range(0, max(len(ids) - 1, 0), block):
        inputs = ids[start:start + block]
        nxt = range(start + 1, start + 1 + len(inputs))
        targets = [ids[k] if k < len(ids) and counted[k] else -100 for k in nxt]
        out.append({"input_ids": inputs, "targets": targets})
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token → id, added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def _tokenizer_name(tokenizer: Any) -> str:
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or '?'}, {len(tokenizer)} tokens)"


def infer_format(record: dict, *, field: str) -> str:
    """`messages`, else `prompt_completion` (prompt and completion), else `text`, from a record's fields."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise UserError(f"{field}: cannot tell the data format from the fields {sorted(record)}; a causal_lm record "
                    f"needs `text`, or `prompt` and `completion`, or `messages` (map other column names with "
                    f"columns: {{text: your_column}}), or set data.format")


def text_tokenizer(recipe: Recipe, teacher_tokenizer: Any, *, task: str) -> Any:
    """The tokenizer teacher and student share: teacher.tokenizer, else the teacher's own, else (no teacher)
    a pretrained student's (student.path)."""
    from transformers import AutoTokenizer

    field, path = None, None
    if recipe.teacher.tokenizer:
        field, path = "teacher.tokenizer", recipe.teacher.tokenizer
    elif teacher_tokenizer is not None:
        return teacher_tokenizer
    elif recipe.teacher.path is None and recipe.teacher.factory is None and recipe.student.init == "pretrained":
        field, path = "student.path", recipe.student.path
    if path is None:
        raise UserError(f"field teacher.tokenizer: the {task} task needs a tokenizer; a factory teacher has none, so "
                        f"give teacher.tokenizer (a tokenizer folder or builtin:smollm2)")
    path = resolve_model_path(path, field=field)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        hint = "; give teacher.tokenizer" if field == "student.path" else ""
        raise UserError(f"field {field}: cannot load a tokenizer from {path}: {exc}{hint}") from None


def build_text_student(recipe: Recipe, teacher: nn.Module | None, tokenizer: Any, auto_cls: Any) -> nn.Module:
    """The recipe's student; without a teacher, `init: from_config` builds `student.config.model_type` from
    transformers' default config with the tokenizer's vocabulary size and special ids (student.config wins),
    its weights drawn from the recipe's seed."""
    cfg = recipe.student
    if teacher is not None or cfg.init != "from_config":
        return build_student(cfg, teacher, auto_cls=auto_cls)
    from potstill.students.build import from_model_type

    fields = dict(cfg.config)
    model_type = fields.pop("model_type")
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    defaults = {"vocab_size": len(tokenizer), **{k: v for k, v in special.items() if v is not None}}
    if getattr(auto_cls, "__name__", "") == "AutoModelForSeq2SeqLM":
        # the decoder starts from the pad token, as T5 does
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        defaults["decoder_start_token_id"] = pad
    try:
        student = from_model_type(str(model_type), auto_cls, seed=recipe.seed, defaults=defaults, **fields)
    except (ValueError, TypeError) as exc:
        raise UserError(f"field student.config: cannot build the student: {exc}") from None
    for p in student.parameters():
        p.requires_grad_(True)
    return student


class CausalLMTask(Task):
    signal_kind = "logits"
    name = "causal_lm"

    # ------------------------------------------------------------------ set-up
    def setup(self, *, is_main: bool = True, barrier=lambda: None, capture: bool = False) -> None:
        """Load models and data. `capture=True` is `potstill cache` writing `teacher.cache` (not reading it)."""
        from transformers import AutoModelForCausalLM

        r = self.recipe
        for field, path in (("teacher.path", r.teacher.path), ("teacher.tokenizer", r.teacher.tokenizer),
                            ("student.path", r.student.path)):
            if path and path.startswith("builtin:"):  # one-time conversions happen on the main process
                if is_main:
                    resolve_model_path(path, field=field)
                barrier()
        if r.teacher.path is not None:
            self.teacher, self.tokenizer = load_hf_teacher(r.teacher.path, AutoModelForCausalLM)
        elif r.teacher.factory is not None:
            self.teacher, self.tokenizer = load_factory_teacher(r.teacher), None
        else:  # black-box methods (step-by-step): the teacher's text is the data
            self.teacher, self.tokenizer = None, None
        self.tokenizer = text_tokenizer(r, self.tokenizer, task=self.name)
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.student = build_text_student(r, self.teacher, self.tokenizer, AutoModelForCausalLM)
        self._check_student_tokenizer()
        self.vocab_size = len(self.tokenizer)
        self.pad_id = next((t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None),
                           0)
        for model, role in ((self.teacher, "teacher"), (self.student, "student")):
            if model is not None:
                self._check_vocab(model, role)
        if r.trainer.fused_lm_head:
            self._check_fused_head()
        self.train_records = self._examples(r.data.train, "data.train", is_main=is_main)
        self.eval_records = self._examples(r.data.eval, "data.eval", is_main=is_main) if r.data.eval else []
        gen = r.generation
        if (gen.lmbda or gen.seq_kd) and (r.data.packing or self.train_format == "text"):
            raise UserError("generation.lmbda and generation.seq_kd sample completions after each record's prompt: "
                            "they need prompt/completion or messages records, without data.packing")
        cache = None
        if r.teacher.cache and not capture:
            from potstill.teachers.cache import TopKCache

            cache = TopKCache(r.teacher.cache)
        self.seq_kd_file: dict[str, Any] | None = None
        if gen.seq_kd:
            self.train_records = self._seq_kd_examples(cache, is_main=is_main, barrier=barrier, capture=capture)
        self.topk_cache = None
        if cache is not None:
            from potstill.teachers.capture import expected_cache_meta

            cache.check_expect(expected_cache_meta(self))
            self._check_objectives_for_cache(cache)
            self.topk_cache = cache
        if not any(t != -100 for ex in self.train_records for t in ex["targets"]):
            raise UserError("data.train: no token is counted in any record (prompts longer than data.max_length, "
                            "or no assistant turns); raise data.max_length or check data.format")

    def _check_student_tokenizer(self) -> None:
        """Different vocabularies cannot be compared token by token: refuse them with both names."""
        cfg = self.recipe.student
        if cfg.init != "pretrained":
            return
        from transformers import AutoTokenizer

        path = resolve_model_path(cfg.path, field="student.path")
        try:
            student_tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            return  # a folder without a tokenizer uses the teacher's
        if tokenizer_fingerprint(student_tok) != tokenizer_fingerprint(self.tokenizer):
            raise UserError(f"field student.path: the student's tokenizer {_tokenizer_name(student_tok)} differs "
                            f"from the teacher's {_tokenizer_name(self.tokenizer)}; cross-tokenizer distillation "
                            f"is not supported yet: teacher and student must share one tokenizer")

    def _check_vocab(self, model: nn.Module, role: str) -> None:
        probe = torch.tensor([[self.pad_id, self.pad_id]], device=self._device_of(model))
        with torch.inference_mode():
            logits = self._raw_logits(model, probe, torch.ones_like(probe))
        if logits.ndim != 3 or logits.shape[:2] != probe.shape:
            raise UserError(f"{role}: a causal_lm model must return logits [batch, tokens, vocab] (or an object "
                            f"with .logits); got shape {tuple(logits.shape)} for input {tuple(probe.shape)}")
        if logits.shape[-1] < self.vocab_size:
            raise UserError(f"{role}: the model predicts {logits.shape[-1]} token ids but the tokenizer "
                            f"{_tokenizer_name(self.tokenizer)} has {self.vocab_size}; they do not belong together")

    @staticmethod
    def _device_of(model: nn.Module) -> torch.device:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ------------------------------------------------------------------ records → sequences
    def _examples(self, source: DataSource, field: str, *, is_main: bool) -> list[dict[str, list[int]]]:
        if self.recipe.step_by_step is not None:
            return self._step_by_step_examples(source, field, is_main=is_main)
        fmt = self.recipe.data.format
        if fmt == "auto":
            fmt = infer_format(self.load(DataSource(path=source.path, split=source.split, columns=source.columns,
                                                    limit=1))[0], field=field)
        records = self.load(source, required=FORMAT_FIELDS[fmt])
        if field == "data.train":
            self.train_format = fmt
        if self.recipe.data.domains is not None:  # one example per record (no packing): domains line up
            self._domain_sources = {**getattr(self, "_domain_sources", {}), field: records}
        if fmt == "messages" and not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{field}: chat `messages` need a tokenizer with a chat template, and "
                            f"{_tokenizer_name(self.tokenizer)} has none; use prompt/completion or text records, "
                            f"or give a tokenizer with a chat template (teacher.tokenizer)")
        sequences = [self._sequence(rec, fmt, f"{field}, record {i}") for i, rec in enumerate(records)]
        max_len = self.recipe.data.max_length
        if self.recipe.data.packing:
            examples = pack(sequences, max_len)
            truncated = 0
        else:
            truncated = sum(len(ids) > max_len for ids, _ in sequences)
            examples = [{"input_ids": ids[:max_len], "targets": shift_targets(ids[:max_len], counted[:max_len])}
                        for ids, counted in sequences]
        if not examples:
            raise UserError(f"{field}: the records hold fewer than two tokens in all")
        if is_main:
            from potstill.ui import console

            empty = sum(all(t == -100 for t in ex["targets"]) for ex in examples)
            targets = sum(t != -100 for ex in examples for t in ex["targets"])
            notes = [f"{truncated:,} cut to max_length {max_len}" if truncated else "",
                     f"{empty:,} with no counted token" if empty else ""]
            notes = [n for n in notes if n]
            console.print(f"{field}: {len(records):,} {fmt} records → {len(examples):,} "
                          f"{'packed blocks' if self.recipe.data.packing else 'sequences'}, {targets:,} target "
                          f"tokens" + (f" ({'; '.join(notes)})" if notes else ""))
        return examples

    def _encode(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _eos(self) -> list[int]:
        """What ends a text or completion: [EOS] with data.add_eos (and a tokenizer that has one), else []."""
        eos = self.tokenizer.eos_token_id
        return [eos] if self.recipe.data.add_eos and eos is not None else []

    def _sequence(self, rec: dict, fmt: str, where: str) -> tuple[list[int], list[bool]]:
        """Token ids of one record and, per token, whether it is a target."""
        eos = self._eos()
        if fmt == "text":
            ids = self._encode(_string(rec["text"], "text", where), special=True) + eos
            return ids, [True] * len(ids)
        if fmt == "prompt_completion":
            return self._prompt_completion(_string(rec["prompt"], "prompt", where),
                                           _string(rec["completion"], "completion", where))
        messages = _messages(rec["messages"], where)
        text = self._render(messages, where)
        spans = self._assistant_spans(messages, text, where)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        counted = [any(s < end and e > start for start, end in spans) for s, e in enc["offset_mapping"]]
        return list(enc["input_ids"]), counted

    def _prompt_completion(self, prompt_text: str, completion_text: str) -> tuple[list[int], list[bool]]:
        """The prompt's tokens (with special tokens) then the completion's (plus EOS); only the latter count."""
        prompt = self._encode(prompt_text, special=True)
        completion = self._encode(completion_text, special=False) + self._eos()
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)

    def _step_by_step_examples(self, source: DataSource, field: str, *, is_main: bool) -> list[dict[str, Any]]:
        """Distilling step-by-step: record i → its label view (label_prefix + input → label) as example i's
        `input_ids` / `targets`, and its rationale view (rationale_prefix + input → rationale) under
        `example["rationale"]` — in data.train unless alpha = 1, in data.eval when every record has one."""
        sbs, max_len = self.recipe.step_by_step, self.recipe.data.max_length
        train = field == "data.train"
        fields = (sbs.input_column, sbs.label_column)
        records = self.load(source, required=fields + ((sbs.rationale_column,) if train and sbs.alpha < 1 else ()))
        if train:
            self.train_format = "step_by_step"
        with_rationale = sbs.alpha < 1 if train else all(
            isinstance(rec.get(sbs.rationale_column), str) and rec[sbs.rationale_column].strip() for rec in records)
        examples, truncated = [], 0

        def view(prefix: str, text_field: str, rec: dict, where: str) -> dict[str, list[int]]:
            nonlocal truncated
            ids, counted = self._prompt_completion(prefix + _string(rec[sbs.input_column], sbs.input_column, where),
                                                   _string(rec[text_field], text_field, where))
            truncated += len(ids) > max_len
            return {"input_ids": ids[:max_len], "targets": shift_targets(ids[:max_len], counted[:max_len])}

        for i, rec in enumerate(records):
            where = f"{field}, record {i}"
            example: dict[str, Any] = view(sbs.label_prefix, sbs.label_column, rec, where)
            if with_rationale:
                example["rationale"] = view(sbs.rationale_prefix, sbs.rationale_column, rec, where)
            examples.append(example)
        if is_main:
            from potstill.ui import console

            labels = sum(t != -100 for ex in examples for t in ex["targets"])
            rationales = sum(t != -100 for ex in examples for t in ex.get("rationale", {}).get("targets", ()))
            note = f" ({truncated:,} views cut to max_length {max_len})" if truncated else ""
            console.print(f"{field}: {len(records):,} step-by-step records → {labels:,} label"
                          + (f" + {rationales:,} rationale" if with_rationale else "") + f" target tokens{note}")
        return examples

    def _render(self, messages: list[dict], where: str, **kwargs: Any) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as exc:  # jinja errors: the template rejects this conversation
            raise UserError(f"{where}: the chat template cannot render these messages ({exc})") from None

    def _assistant_spans(self, messages: list[dict], text: str, where: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in the rendered `text`."""
        if not self.tokenizer.is_fast:
            raise UserError(f"{where}: chat messages need a fast tokenizer (character offsets); "
                            f"{_tokenizer_name(self.tokenizer)} is not one")
        spans, cursor = [], 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            span = None
            try:
                before = self._render(messages[:k], where, add_generation_prompt=True) if k else None
                through = self._render(messages[:k + 1], where)
            except UserError:
                before = through = None
            if (before is not None and through is not None and cursor <= len(before) < len(through)
                    and text.startswith(through) and through.startswith(before)):
                span = (len(before), len(through))
            else:  # the template is not prefix-stable here: find the assistant's words after the last turn
                pos = text.find(message["content"], cursor)
                if message["content"] and pos >= 0:
                    span = (pos, pos + len(message["content"]))
            if span is None:
                raise UserError(f"{where}: cannot find assistant turn {k} in the chat template's rendering")
            spans.append(span)
            cursor = span[1]
        return spans

    # ------------------------------------------------------------------ batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        """Right-padded rows. Step-by-step records with a rationale view give 2B rows: the B label views, then
        the B rationale views in the same order, and `view` [2B] says which (0 label, 1 rationale)."""
        views = step_by_step_rows(records)
        rows = records if views is None else views[0]
        width = max(len(ex["input_ids"]) for ex in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, ex in enumerate(rows):
            n = len(ex["input_ids"])
            ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            targets[b, :n] = torch.tensor(ex["targets"], dtype=torch.long)
            mask[b, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "targets": targets, "index": torch.tensor(indices)}
        if views is not None:
            batch["view"] = views[1]
        return batch

    def count_rows(self, batch: dict[str, Any]) -> int:
        """Counted target tokens; with step-by-step views, those of the label view only (the loop's divisor:
        see `step_by_step_sum`)."""
        return count_label_tokens(batch["targets"], batch.get("view"))

    def record_lengths(self) -> list[int]:
        return [max(len(ex["input_ids"]), len(ex.get("rationale", ex)["input_ids"])) for ex in self.train_records]

    def _raw_logits(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        inner = _unwrap(model)  # DDP's forward takes (*inputs, **kwargs): ask the model it wraps
        if hasattr(inner, "config") and hasattr(inner, "save_pretrained"):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            try:
                takes_mask = "attention_mask" in inspect.signature(inner.forward).parameters
            except (TypeError, ValueError):
                takes_mask = False
            out = model(ids, attention_mask=mask) if takes_mask else model(ids)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, (tuple, list)) else out

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """`[B, T, V]` next-token logits over the tokenizer's ids (a padded vocabulary is cut off)."""
        logits = self._raw_logits(model, batch["input_ids"], batch["attention_mask"])
        return logits[..., :self.vocab_size] if logits.shape[-1] != self.vocab_size else logits

    # ------------------------------------------------------------------ cached teacher, seq-KD, on-policy
    def _check_objectives_for_cache(self, cache: Any) -> None:
        """A cache holds top-k log-probs at one temperature: only divergences with a sparse form, at that T."""
        from potstill.losses.sparse import sparse_version

        for i, objective in enumerate(self.recipe.objectives):
            if sparse_version(objective.name) is None:
                raise UserError(f"field objectives.{i}.name: {objective.name} needs the teacher's full logits; with "
                                f"teacher.cache use forward_kl, reverse_kl, soft_cross_entropy, generalized_jsd, "
                                f"skew_kl, skew_reverse_kl or tvd (they switch to their top-k forms)")
            t = float(objective.params.get("temperature", 1.0))
            if t != cache.temperature:
                raise UserError(f"field objectives.{i}.params.temperature: {t:g}, but {cache.path} holds the "
                                f"teacher's log-probs at temperature {cache.temperature:g}; use that temperature, or "
                                f"rebuild the cache with `potstill cache --temperature {t:g}`")

    @staticmethod
    def prompt_of(example: dict[str, list[int]]) -> list[int]:
        """The tokens before the first counted target: the prompt a completion is sampled after."""
        first = next((j for j, t in enumerate(example["targets"]) if t != -100), len(example["input_ids"]) - 1)
        return list(example["input_ids"][:first + 1])

    def with_completion(self, prompt: list[int], completion: list[int]) -> dict[str, list[int]]:
        """An example of `prompt` + `completion` (cut to data.max_length) whose targets are the completion."""
        max_len = self.recipe.data.max_length
        ids = (prompt + completion)[:max_len]
        counted = ([False] * len(prompt) + [True] * len(completion))[:max_len]
        return {"input_ids": ids, "targets": shift_targets(ids, counted)}

    def _sampling(self) -> Any:
        from potstill.tasks.generation import SamplingSettings

        gen = self.recipe.generation
        return SamplingSettings(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_k=gen.top_k,
                                top_p=gen.top_p)

    def _seq_kd_examples(self, cache: Any, *, is_main: bool, barrier, capture: bool) -> list[dict[str, list[int]]]:
        """Training examples whose completions are the teacher's (sequence-level KD), generated once: stored in
        the top-k cache (`potstill cache`) or in the run folder, and reused while prompts and settings match."""
        from dataclasses import asdict

        prompts = [self.prompt_of(ex) for ex in self.train_records]
        settings = self._sampling()
        endpoint = self.recipe.teacher.endpoint
        teacher_name = (f"{endpoint.model} at {endpoint.base_url}" if endpoint is not None
                        else self.recipe.teacher.path or self.recipe.teacher.factory)
        key = hashlib.sha256(json.dumps({"prompts": prompts, "settings": asdict(settings), "seed": self.recipe.seed,
                                         "teacher": teacher_name}, sort_keys=True).encode()).hexdigest()
        name = "seq_kd_completions.json"
        if cache is not None:
            raw = cache.read_file(name)
            stored = json.loads(raw) if raw is not None else None
            if stored is None or stored.get("key") != key:
                raise UserError(f"teacher.cache {cache.path}: " + (
                    "holds no seq-KD completions" if stored is None else
                    "its seq-KD completions were generated for other prompts, teacher or generation settings")
                    + "; rebuild it with `potstill cache` and this recipe (generation.seq_kd: true)")
        else:
            path = None if capture else self.run_dir / name
            stored = json.loads(path.read_text()) if path is not None and path.exists() else None
            if stored is None or stored.get("key") != key:
                if is_main:
                    completions = (self._endpoint_completions(prompts, settings) if endpoint is not None
                                   else self._teacher_completions(prompts, settings))
                    stored = {"key": key, "teacher": teacher_name, "settings": asdict(settings),
                              "completions": completions}
                    if path is not None:
                        self.run_dir.mkdir(parents=True, exist_ok=True)
                        atomic_write_json(path, stored)
                barrier()
                if not is_main:
                    stored = json.loads(path.read_text())
        self.seq_kd_file = stored
        return [self.with_completion(p, c) for p, c in zip(prompts, stored["completions"], strict=True)]

    def _teacher_completions(self, prompts: list[list[int]], settings: Any) -> list[list[int]]:
        """Seq-KD with the live teacher model: sampled 8 prompts at a time, each batch seeded by its position."""
        from potstill.tasks.generation import sample_completions
        from potstill.ui import task_progress

        completions, batch = [], 8
        with task_progress("teacher completions (seq-KD)", len(prompts)) as advance:
            for first in range(0, len(prompts), batch):
                completions += sample_completions(
                    self.teacher, prompts[first:first + batch], settings=settings, pad_token_id=self.pad_id,
                    eos_token_id=self.tokenizer.eos_token_id, seed=self.recipe.seed * 1_000_003 + first)
                advance(len(prompts[first:first + batch]))
        return completions

    def _endpoint_completions(self, prompts: list[list[int]], settings: Any) -> list[list[int]]:
        """Black-box seq-KD: each prompt (decoded, without the BOS the server's tokenizer adds again) goes to
        the endpoint's /completions route; the text that comes back is tokenized (+ EOS when the teacher
        stopped on its own). Every request carries the recipe's seed, so a re-run asks the same requests, which
        the response cache answers."""
        from potstill.teachers.endpoint import EndpointTeacher
        from potstill.ui import task_progress

        cfg = self.recipe.teacher.endpoint
        bos = self.tokenizer.bos_token_id
        texts = [self.tokenizer.decode(p[1:] if p and p[0] == bos else p) for p in prompts]
        cache = Path(cfg.cache) if cfg.cache else self.run_dir / "endpoint_cache.sqlite"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        teacher = EndpointTeacher(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, cache=cache,
                                  concurrency=cfg.concurrency, timeout=cfg.timeout, max_retries=cfg.max_retries,
                                  requests_per_second=cfg.requests_per_second)
        with teacher, task_progress("teacher completions (endpoint seq-KD)", len(texts)) as advance:
            results = teacher.complete_many(texts, max_tokens=settings.max_new_tokens,
                                            temperature=settings.temperature, top_p=settings.top_p,
                                            seed=self.recipe.seed, on_done=lambda _i, _r: advance(1))
        failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
        if failed:
            raise UserError(f"teacher.endpoint: {len(failed)} of {len(texts)} prompts failed after retries (first: "
                            f"record {failed[0] + 1}: {results[failed[0]]}); run again: answered prompts come from "
                            f"the response cache {cache}")
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return [self._encode(r.text, special=False) + (eos if r.finish_reason == "stop" else [])
                for r in results]

    def prepare_batch(self, batch: dict[str, Any], student: nn.Module, micro_batch: int) -> dict[str, Any]:
        """On-policy distillation (GKD): with probability generation.lmbda, replace the micro-batch's completions
        by the student's own samples, which the teacher then scores. The coin and the samples are seeded by
        (seed, micro-batch, process), so a resumed run redraws exactly the same batches."""
        lmbda = self.recipe.generation.lmbda
        if not lmbda:
            return batch
        from potstill.tasks.generation import sample_completions

        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = (self.recipe.seed * 1_000_003 + micro_batch) * 1_009 + rank
        if float(torch.rand(1, generator=torch.Generator().manual_seed(seed))) >= lmbda:
            return batch
        indices = batch["index"].tolist()
        prompts = [self.prompt_of(self.train_records[i]) for i in indices]
        completions = sample_completions(student, prompts, settings=self._sampling(), pad_token_id=self.pad_id,
                                         eos_token_id=self.tokenizer.eos_token_id, seed=seed)
        new = self.collate([self.with_completion(p, c) for p, c in zip(prompts, completions, strict=True)], indices)
        return {**self.to_device(new), "on_policy": True}

    def teacher_signal(self, batch: dict[str, Any]) -> Any:
        """The live teacher's logits `[B, T, V]`, or with `teacher.cache` its cached top-k (`TopKTeacher`)."""
        if self.topk_cache is not None:
            lengths = batch["attention_mask"].sum(1).tolist()
            cached = self.topk_cache.get(batch["index"].tolist(), length=batch["input_ids"].shape[1],
                                         expect_lengths=lengths)
            return cached.to(self.device)
        from potstill.teachers import teacher_outputs

        return teacher_outputs(self.with_internals, "teacher", self.logits, self.teacher, batch)

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        """The student's logits; with trainer.fused_lm_head its last hidden states and lm_head instead (as
        `Signals` with the internals, when objectives read them)."""
        fn = self.head_inputs if self.recipe.trainer.fused_lm_head else self.logits
        return self.with_internals("student", fn, model, batch)

    def head_inputs(self, model: nn.Module, batch: dict[str, Any]) -> LMHeadInputs:
        """The student run up to its lm_head: hidden states `[B, T, H]` and the head's weight and bias.

        The model's own forward runs (through a DDP wrapper, so gradients still synchronise) with the head
        answering its input unchanged for the duration of the call, so the `[B, T, V]` logits are never made.
        """
        head = _unwrap(model).get_output_embeddings()
        own_forward = head.__dict__.get("forward")  # e.g. a hook that replaced it
        head.forward = _identity
        try:
            hidden = self._raw_logits(model, batch["input_ids"], batch["attention_mask"])
        finally:
            if own_forward is None:
                del head.forward
            else:
                head.forward = own_forward
        return LMHeadInputs(hidden, head.weight, head.bias, self.vocab_size)

    def _check_fused_head(self) -> None:
        """trainer.fused_lm_head needs a student whose logits are exactly `hidden @ lm_head.weight.T (+ bias)`."""
        model = self.student
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            raise UserError(f"trainer.fused_lm_head needs a Hugging Face causal LM student with a linear output "
                            f"layer (get_output_embeddings()); this student ({type(model).__name__}) has "
                            f"{type(head).__name__ if head is not None else 'none'}. Turn fused_lm_head off")
        # distinct real ids (a padding id may embed to zeros, which hides any post-processing)
        probe = (torch.arange(8, device=self._device_of(model)) * 7919 % self.vocab_size)[None]
        batch = {"input_ids": probe, "attention_mask": torch.ones_like(probe)}
        mode = model.training
        model.eval()
        with torch.inference_mode():
            want = self._raw_logits(model, probe, batch["attention_mask"]).float()
            got = self.head_inputs(model, batch)
            logits = nn.functional.linear(got.hidden.float(), head.weight.float(),
                                          None if head.bias is None else head.bias.float())
        model.train(mode)
        if got.hidden.shape[-1] != head.in_features or not torch.allclose(logits, want, rtol=1e-4, atol=1e-4):
            raise UserError(f"trainer.fused_lm_head: the student's ({type(model).__name__}) logits are not its "
                            f"hidden states times its lm_head (the model post-processes them, e.g. soft-capping "
                            f"or scaling); turn fused_lm_head off for this model")

    def signal_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["targets"] != -100

    def hard_label_loss(self, student_signal: torch.Tensor | LMHeadInputs, batch: dict[str, Any]) -> torch.Tensor:
        """Summed token cross-entropy (float32) of the student on the targets; with step-by-step views,
        `step_by_step_sum` of the label view's and the rationale view's sums."""
        view = batch.get("view")
        if view is None:
            return self._ce_sum(student_signal, batch["targets"])
        label_targets, rationale_targets = split_views(batch["targets"], view)
        if isinstance(student_signal, LMHeadInputs):
            label_sum, rationale_sum = self._ce_sum(student_signal, label_targets), self._ce_sum(student_signal,
                                                                                                 rationale_targets)
        else:
            label_sum, rationale_sum = view_sums(student_signal, batch["targets"], view)
        return step_by_step_sum(label_sum, int((label_targets != -100).sum()), rationale_sum,
                                int((rationale_targets != -100).sum()), self.recipe.step_by_step.alpha)

    def _ce_sum(self, student_signal: torch.Tensor | LMHeadInputs, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(student_signal, LMHeadInputs):
            chunk = next((o.params["chunk_size"] for o in self.recipe.objectives if o.params.get("chunk_size")),
                         1024)
            return fused_linear_cross_entropy(student_signal.hidden, student_signal.weight, targets,
                                              lm_head_bias=student_signal.bias, vocab_size=student_signal.vocab_size,
                                              reduction="sum", chunk_size=chunk)
        return nn.functional.cross_entropy(student_signal.flatten(0, 1).float(), targets.flatten(),
                                           ignore_index=-100, reduction="sum")

    # ------------------------------------------------------------------ evaluation
    def _eval_batches(self, examples: list[dict]) -> list[list[int]]:
        """Example indices grouped by length, at most EVAL_TOKENS padded tokens (and eval.batch_size) each."""
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
        batches: list[list[int]] = []
        for i in order:
            width = len(examples[batches[-1][0]]["input_ids"]) if batches else 0
            if (batches and len(batches[-1]) < self.recipe.eval.batch_size
                    and (len(batches[-1]) + 1) * width <= EVAL_TOKENS):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def token_stats(self, model: nn.Module, examples: list[dict], *, teacher: nn.Module | None = None
                    ) -> dict[str, float]:
        """Summed per-token statistics of `model` on `examples` (counted targets only): nll, correct, tokens;
        with `teacher` also kl (teacher ‖ model) and agree (same argmax)."""
        sums = {"nll": 0.0, "correct": 0.0, "tokens": 0.0, **({"kl": 0.0, "agree": 0.0} if teacher else {})}
        models = [m for m in (model, teacher) if m is not None]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        with torch.inference_mode():
            for idx in self._eval_batches(examples):
                batch = self.to_device(self.collate([examples[i] for i in idx], idx))
                keep = batch["targets"] != -100
                if not keep.any():
                    continue
                rows = keep.nonzero(as_tuple=True)
                gold = batch["targets"][rows]
                s_all = self.logits(model, batch)
                t_all = self.logits(teacher, batch) if teacher is not None else None
                for start in range(0, gold.numel(), EVAL_ROW_CHUNK):
                    part = tuple(r[start:start + EVAL_ROW_CHUNK] for r in rows)
                    y = gold[start:start + EVAL_ROW_CHUNK]
                    log_s = torch.log_softmax(s_all[part].float(), -1)
                    sums["nll"] -= float(log_s.gather(-1, y[:, None]).sum())
                    sums["correct"] += float((log_s.argmax(-1) == y).sum())
                    sums["tokens"] += y.numel()
                    if t_all is not None:
                        log_t = torch.log_softmax(t_all[part].float(), -1)
                        sums["kl"] += float((log_t.exp() * (log_t - log_s)).sum())
                        sums["agree"] += float((log_t.argmax(-1) == log_s.argmax(-1)).sum())
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
        return sums

    def domain_records(self, split: str) -> list[dict]:
        return self._domain_sources["data.train" if split == "train" else "data.eval"]

    def eval_loss(self, model: nn.Module, indices: list[int]) -> float:
        """Mean per-token cross-entropy of `model` on the held-out sequences `indices` (DDK's perplexities)."""
        sums = self.token_stats(model, [self.eval_records[i] for i in indices])
        if not sums["tokens"]:
            raise UserError("data.domains: a domain's data.eval records hold no counted token")
        return sums["nll"] / sums["tokens"]

    def evaluate(self, model: nn.Module | None, *, role: str = "student") -> dict[str, float]:
        """Token metrics on data.eval (None → {}: a run without a teacher). With step_by_step they are on the
        label view, plus `label_accuracy` (greedy-decoded label after label_prefix + input equals the
        reference) and, when the eval records have rationales, `rationale_perplexity`."""
        if not self.eval_records or model is None:
            return {}
        teacher = None if role == "teacher" or model is self.teacher else self.teacher
        sbs = self.recipe.step_by_step is not None
        labels = [{"input_ids": ex["input_ids"], "targets": ex["targets"]} for ex in self.eval_records]
        s = self.token_stats(model, labels if sbs else self.eval_records, teacher=teacher)
        n = max(s["tokens"], 1.0)
        metrics = {"perplexity": _exp(s["nll"] / n), "token_accuracy": s["correct"] / n}
        if teacher is not None:
            metrics.update(token_agreement=s["agree"] / n, kl_to_teacher=s["kl"] / n)
        if sbs:
            metrics["label_accuracy"] = self.label_accuracy(model, labels)
            rationales = [ex["rationale"] for ex in self.eval_records if "rationale" in ex]
            if rationales:
                r = self.token_stats(model, rationales)
                metrics["rationale_perplexity"] = _exp(r["nll"] / max(r["tokens"], 1.0))
        return metrics

    def label_accuracy(self, model: nn.Module, examples: list[dict[str, list[int]]]) -> float:
        """Fraction of `examples` whose greedy continuation of the prompt (up to EOS, at most as many tokens
        as the longest reference) decodes to the same text as the reference completion (special tokens
        dropped, surrounding blanks ignored)."""
        from potstill.tasks.generation import SamplingSettings, sample_completions

        references = [[t for t in ex["targets"] if t != -100] for ex in examples]
        settings = SamplingSettings(max_new_tokens=max([1, *map(len, references)]), temperature=0.0)
        step, correct = self.recipe.eval.batch_size, 0
        for first in range(0, len(examples), step):
            prompts = [self.prompt_of(ex) for ex in examples[first:first + step]]
            outputs = sample_completions(model, prompts, settings=settings, pad_token_id=self.pad_id,
                                         eos_token_id=self.tokenizer.eos_token_id, seed=0)
            correct += sum(same_text(self.tokenizer, out, ref)
                           for out, ref in zip(outputs, references[first:first + step], strict=True))
        return correct / len(examples)

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        examples = (self.eval_records or self.train_records)[:8]
        mean_tokens = sum(len(ex["input_ids"]) for ex in examples) / len(examples)

        def runner(model: nn.Module):
            def run(chunk: list[dict]) -> torch.Tensor:
                return self.logits(model, self.to_device(self.collate(chunk, list(range(len(chunk))))))

            return run

        return self.compare_speed(student, examples, runner, unit="tokens_per_s", per_item=mean_tokens,
                                  batch_size=min(4, self.recipe.eval.batch_size), rounds=2)

    # ------------------------------------------------------------------ output
    def save_student(self, model: nn.Module, path: Path) -> None:
        """`save_pretrained` + tokenizer (loads with AutoModelForCausalLM, no potstill); else a state dict."""
        if hasattr(model, "save_pretrained"):
            from potstill.students import save_hf_student

            save_hf_student(model, self.tokenizer, path)
            return
        from potstill.students.save import save_factory_student

        save_factory_student(model, path, factory=self.recipe.student.factory, kwargs=self.recipe.student.kwargs,
                             tokenizer=self.tokenizer)


def step_by_step_rows(records: list[dict]) -> tuple[list[dict], torch.Tensor] | None:
    """The rows of a step-by-step micro-batch: the records' label views, then their rationale views (each
    record's `rationale`, same order), and the view of each row (0 label, 1 rationale); None when no record
    has a rationale view (plain records, or step-by-step with alpha = 1)."""
    with_view = sum("rationale" in ex for ex in records)
    if not with_view:
        return None
    if with_view != len(records):
        raise ValueError("a step-by-step micro-batch mixes records with and without a rationale view")
    view = torch.tensor([0] * len(records) + [1] * len(records), dtype=torch.long)
    return list(records) + [ex["rationale"] for ex in records], view


def split_views(targets: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`targets` [R, T] as (label-view targets, rationale-view targets), the other view's rows set to -100."""
    is_rationale = (view == 1)[:, None]
    return targets.masked_fill(is_rationale, -100), targets.masked_fill(~is_rationale, -100)


def count_label_tokens(targets: torch.Tensor, view: torch.Tensor | None) -> int:
    """Counted targets (≠ -100), of the label-view rows only when `view` is given."""
    keep = targets != -100
    if view is not None:
        keep &= (view == 0)[:, None]
    return int(keep.sum())


def view_sums(logits: torch.Tensor, targets: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed float32 token cross-entropy of the label-view rows and of the rationale-view rows, from one
    log-softmax over `logits` [R, T, V]."""
    per_token = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                            reduction="none").view_as(targets)
    is_rationale = (view == 1)[:, None]
    return per_token.masked_fill(is_rationale, 0.0).sum(), per_token.masked_fill(~is_rationale, 0.0).sum()


def step_by_step_sum(label_sum: torch.Tensor, label_tokens: int, rationale_sum: torch.Tensor,
                     rationale_tokens: int, alpha: float) -> torch.Tensor:
    """The micro-batch's summed step-by-step loss, to be divided by its label tokens (the loop's rows):

        α·S_label + (1 − α)·S_rationale · N_label / N_rationale,

    so that S / N_label = α·mean CE(label tokens) + (1 − α)·mean CE(rationale tokens), each a token mean over
    its own view: the official code's ``alpha * pred_outputs.loss + (1 - alpha) * expl_outputs.loss``
    (google-research/distilling-step-by-step, model_utils.py, TaskPrefixTrainer.compute_loss; default α 0.5).
    With gradient accumulation or several processes the label term is the token mean over the whole step
    (as plain fine-tuning) and each micro-batch's rationale mean is weighted by its share of label tokens.
    """
    if rationale_tokens == 0 or alpha == 1:
        return alpha * label_sum
    return alpha * label_sum + (1.0 - alpha) * rationale_sum * (label_tokens / rationale_tokens)


def same_text(tokenizer: Any, generated: list[int], reference: list[int]) -> bool:
    """Whether two token sequences decode to the same text (special tokens dropped, blanks at the ends
    ignored): exact match of a generated label."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    return text(generated) == text(reference)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP-style wrappers (their `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _string(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str) -> list[dict]:
    """A chat: a list of {role, content} (a JSON string of one is accepted, e.g. from CSV)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise UserError(f"{where}: field 'messages' must be a list of {{role, content}}, got a string that "
                            f"is not JSON") from None
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: messages[{k}] must be {{role: ..., content: ...}} with text values, "
                            f"got {m!r}")
    return value
