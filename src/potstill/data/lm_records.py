"""Causal-LM records as token sequences: formats, loss masks, packing and tokenizer checks.

A record becomes one token sequence and, per token, whether it is a target (counted in the loss):

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

An example is ``{"input_ids": [...], "targets": [...]}`` of equal length, where ``targets[j]`` is the token
the model should predict at position j (the sequence's token j + 1) or -100 when that token is not counted.

Teacher and student must share the tokenizer: `tokenizer_fingerprint` (sha256 of the vocabulary) compares
them, and is part of what a top-k teacher cache is checked against.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from potstill.errors import UserError

FORMATS = ("text", "prompt_completion", "messages")
FORMAT_FIELDS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",),
                 "preference": ("prompt", "chosen", "rejected")}  # preference pairs: potstill.data.preference


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


def tokenizer_name(tokenizer: Any) -> str:
    """`Class(name_or_path, N tokens)`, for messages."""
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or '?'}, {len(tokenizer)} tokens)"


def infer_format(record: dict, *, field: str) -> str:
    """`messages`, else `preference` (prompt, chosen and rejected), else `prompt_completion` (prompt and
    completion), else `text`, from a record's fields."""
    if "messages" in record:
        return "messages"
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise UserError(f"{field}: cannot tell the data format from the fields {sorted(record)}; a causal_lm record "
                    f"needs `text`, or `prompt` and `completion`, or `messages` (map other column names with "
                    f"columns: {{text: your_column}}), or set data.format")


def text_field(value: Any, name: str, where: str) -> str:
    """`value`, which must be text (field `name` of the record at `where`)."""
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return value


def chat_messages(value: Any, where: str) -> list[dict]:
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


def prompt_of(example: dict[str, list[int]]) -> list[int]:
    """The tokens before the first counted target: the prompt a completion is sampled after."""
    first = next((j for j, t in enumerate(example["targets"]) if t != -100), len(example["input_ids"]) - 1)
    return list(example["input_ids"][:first + 1])


def cut_example(ids: list[int], counted: list[bool], max_length: int) -> dict[str, list[int]]:
    """One sequence cut to `max_length`, as an example: input ids and the targets of its counted tokens."""
    return {"input_ids": ids[:max_length], "targets": shift_targets(ids[:max_length], counted[:max_length])}


def with_completion(prompt: list[int], completion: list[int], max_length: int) -> dict[str, list[int]]:
    """An example of `prompt` + `completion` (cut to `max_length`) whose targets are the completion."""
    return cut_example(prompt + completion, [False] * len(prompt) + [True] * len(completion), max_length)


@dataclass
class LMRecordEncoder:
    """Turns causal-LM records into token sequences with `tokenizer` (`data.max_length`, `data.add_eos`)."""

    tokenizer: Any
    max_length: int
    add_eos: bool

    def encode(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def eos(self) -> list[int]:
        """What ends a text or completion: [EOS] with data.add_eos (and a tokenizer that has one), else []."""
        eos = self.tokenizer.eos_token_id
        return [eos] if self.add_eos and eos is not None else []

    def example(self, ids: list[int], counted: list[bool]) -> dict[str, list[int]]:
        """One sequence cut to max_length, as an example."""
        return cut_example(ids, counted, self.max_length)

    def prompt_completion(self, prompt_text: str, completion_text: str) -> tuple[list[int], list[bool]]:
        """The prompt's tokens (with special tokens) then the completion's (plus EOS); only the latter count."""
        prompt = self.encode(prompt_text, special=True)
        completion = self.encode(completion_text, special=False) + self.eos()
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)

    def sequence(self, rec: dict, fmt: str, where: str) -> tuple[list[int], list[bool]]:
        """Token ids of one record and, per token, whether it is a target."""
        if fmt == "text":
            ids = self.encode(text_field(rec["text"], "text", where), special=True) + self.eos()
            return ids, [True] * len(ids)
        if fmt == "prompt_completion":
            return self.prompt_completion(text_field(rec["prompt"], "prompt", where),
                                          text_field(rec["completion"], "completion", where))
        messages = chat_messages(rec["messages"], where)
        text = self.render(messages, where)
        spans = self.assistant_spans(messages, text, where)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        counted = [any(s < end and e > start for start, end in spans) for s, e in enc["offset_mapping"]]
        return list(enc["input_ids"]), counted

    def render(self, messages: list[dict], where: str, **kwargs: Any) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as exc:  # jinja errors: the template rejects this conversation
            raise UserError(f"{where}: the chat template cannot render these messages ({exc})") from None

    def assistant_spans(self, messages: list[dict], text: str, where: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in the rendered `text`."""
        if not self.tokenizer.is_fast:
            raise UserError(f"{where}: chat messages need a fast tokenizer (character offsets); "
                            f"{tokenizer_name(self.tokenizer)} is not one")
        spans, cursor = [], 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            span = None
            try:
                before = self.render(messages[:k], where, add_generation_prompt=True) if k else None
                through = self.render(messages[:k + 1], where)
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

    def examples(self, records: list[dict], fmt: str, field: str, *, packing: bool,
                 is_main: bool = True) -> list[dict[str, list[int]]]:
        """The examples of `records` (format `fmt`, from `field`): one per record, or packed blocks."""
        if fmt == "messages" and not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{field}: chat `messages` need a tokenizer with a chat template, and "
                            f"{tokenizer_name(self.tokenizer)} has none; use prompt/completion or text records, "
                            f"or give a tokenizer with a chat template (teacher.tokenizer)")
        sequences = [self.sequence(rec, fmt, f"{field}, record {i}") for i, rec in enumerate(records)]
        max_len = self.max_length
        if packing:
            examples = pack(sequences, max_len)
            truncated = 0
        else:
            truncated = sum(len(ids) > max_len for ids, _ in sequences)
            examples = [self.example(ids, counted) for ids, counted in sequences]
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
                          f"{'packed blocks' if packing else 'sequences'}, {targets:,} target "
                          f"tokens" + (f" ({'; '.join(notes)})" if notes else ""))
        return examples
