"""Extractive decoding: a generation constraint under which an answer is a JSON list of spans of its passage.

An extraction student (UniversalNER's, `potstill.data.universal_ner`) answers a question about a passage with a
JSON list of strings, `["Sept. 6", "$6billion"]`, in the layout `json.dumps` writes (`", "` between items). Left
free, a small student sometimes rewrites a span ("September 6" for "Sept. 6"), which strict entity F1 counts as a
miss and a false positive. `ExtractiveListDecoding` is a `prefix_allowed_tokens_fn` for transformers' `generate`:
at each step it allows only the tokens that keep the answer a prefix of such a list whose every string occurs
verbatim in the passage (and is not empty), and the end-of-sequence token once the list is closed. The model still
chooses which spans and how many; the constraint only removes the rewritten ones. `mentions_in_passage` applies the
same rule after generation, by dropping; here a rewritten span is steered back onto the passage's text while it is
written.

Not in the UniversalNER paper, which scores free answers; constrained decoding of this kind is common for
extraction with generative models. Tokens that decode to part of a multi-byte character cannot be checked one at
a time and are never allowed, so a span with a non-ASCII character cannot be written under the constraint.
String escapes other than \\" and \\\\ are not allowed either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# states of the list automaton: before "[", after "[", inside a string, right after a backslash in a string,
# after a closing quote, after ",", after ", ", after "]"
START, OPENED, STRING, ESCAPE, CLOSED, COMMA, SEPARATED, DONE = range(8)
State = tuple[int, str]
ESCAPES = {'"': '"', "\\": "\\"}
STRUCTURE = {(START, "["): OPENED, (OPENED, '"'): STRING, (OPENED, "]"): DONE, (CLOSED, ","): COMMA,
             (CLOSED, "]"): DONE, (COMMA, " "): SEPARATED, (SEPARATED, '"'): STRING}


def advance(state: State, text: str, passage: str) -> State | None:
    """The automaton's state after reading `text` from `state` (a kind and, inside a string, its unescaped content
    so far); None when `text` cannot continue a list of `passage`'s spans."""
    kind, content = state
    for char in text:
        if kind == STRING:
            if char == '"':
                if not content:
                    return None
                kind, content = CLOSED, ""
            elif char == "\\":
                kind = ESCAPE
            elif content + char in passage:
                content += char
            else:
                return None
        elif kind == ESCAPE:
            if char not in ESCAPES or content + ESCAPES[char] not in passage:
                return None
            kind, content = STRING, content + ESCAPES[char]
        elif (kind, char) in STRUCTURE:
            kind = STRUCTURE[kind, char]
        else:
            return None
    return kind, content


@dataclass(frozen=True)
class TokenTexts:
    """Each token id's text (None for special tokens and partial characters), and the structural ids: those with
    a character of the list's structure or a backslash in their text, or only spaces, which are checked in every
    state. Built once per tokenizer."""

    texts: tuple[str | None, ...]
    ids_by_text: dict[str, list[int]]
    structural: frozenset[int]
    eos_token_id: int
    longest: int

    @classmethod
    def of(cls, tokenizer: Any) -> TokenTexts:
        special = set(tokenizer.all_special_ids)
        texts: list[str | None] = []
        for token_id in range(len(tokenizer)):
            text = None if token_id in special else tokenizer.decode([token_id])
            texts.append(text if text and "\ufffd" not in text else None)
        ids_by_text: dict[str, list[int]] = {}
        for token_id, text in enumerate(texts):
            if text is not None:
                ids_by_text.setdefault(text, []).append(token_id)
        structural = frozenset(k for k, t in enumerate(texts)
                               if t is not None and (set(t) & set('[]",\\') or not t.strip(" ")))
        return cls(tuple(texts), ids_by_text, structural, tokenizer.eos_token_id,
                   max((len(t) for t in texts if t is not None), default=1))


class ExtractiveListDecoding:
    """`prefix_allowed_tokens_fn` for `model.generate`: every row of the batch answers about `passage`, and its
    generated tokens start at `prompt_length` (the padded prompt's length; pad on the left)."""

    def __init__(self, tokens: TokenTexts, passage: str, prompt_length: int) -> None:
        self.tokens, self.passage, self.prompt_length = tokens, passage, prompt_length

    def state_of(self, generated: Sequence[int]) -> State | None:
        state: State | None = (START, "")
        for token_id in generated:
            if token_id == self.tokens.eos_token_id or state is None:
                break
            text = self.tokens.texts[token_id]
            state = None if text is None else advance(state, text, self.passage)
        return state

    def allowed(self, state: State | None) -> list[int]:
        """The token ids that may follow `state`: inside a string the tokens that continue the span as the
        passage does (found by looking up each prefix of what follows the span's occurrences: a plain token found
        so continues a span of the passage by construction, so only structural ones need the automaton, and those
        are checked in any state); only end-of-sequence after the list closes."""
        if state is None or state[0] == DONE:
            return [self.tokens.eos_token_id]
        kind, content = state
        allowed = {k for k in self.tokens.structural if advance(state, self.tokens.texts[k] or "", self.passage)}
        if kind == STRING:
            start = self.passage.find(content)
            while start != -1:
                rest = self.passage[start + len(content):start + len(content) + self.tokens.longest]
                for end in range(1, len(rest) + 1):
                    allowed.update(k for k in self.tokens.ids_by_text.get(rest[:end], ())
                                   if k not in self.tokens.structural)
                start = self.passage.find(content, start + 1)
        return sorted(allowed) or [self.tokens.eos_token_id]

    def __call__(self, batch_id: int, input_ids: Any) -> list[int]:
        return self.allowed(self.state_of(input_ids[self.prompt_length:].tolist()))
