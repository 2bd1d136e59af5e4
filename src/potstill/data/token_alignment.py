"""Token alignment between two tokenizers, for cross-tokenizer distillation (ULD / GOLD, `potstill.losses.uld`).

Teacher and student cut the same text into different tokens. Three pieces make their predictions comparable:

- `byte_offsets(tokenizer, text)`: each token's `(start, end)` UTF-8 byte range in the text. For a byte-level BPE
  (GPT-2 / Llama-3 / SmolLM2 style) each piece decodes to exact bytes, so the ranges are the running sums of
  the pieces' byte lengths, and a character split over two tokens (an emoji) gets its bytes shared out
  correctly; other tokenizers use their character offsets, converted to bytes.
- `align_spans(a, b)`: the spans of text on whose borders both tokenizations agree. Walking both lists, a span
  closes at a byte position where a token of each side ends (and no token of either side straddles it);
  a span holds one or more tokens of each side. TRL's GOLD trainer aligns the same way (`_align_by_byte_offsets`).
- `merge_spans(logits, ...)`: one distribution per span and side. A span of k tokens on one side is predicted
  by the distribution at its first token times the probabilities the model gave the actual later tokens:
  p_span = p(· | first position) · Π_{j=2..k} p(token_j | its position), as a log factor added to the first
  position's log-probs (GOLD's "observed" merge; the vector is not renormalised). `potstill.losses.uld` takes the
  first position's logits and that factor.

`vocab_mapping(teacher_tokenizer, student_tokenizer)` pairs the ids whose tokens are the same text in both
vocabularies, for GOLD's hybrid loss. Tokens are compared as the bytes they stand for, so a byte-level `Ġ` (space)
and a SentencePiece `▁` match, and `<0x0A>` byte-fallback pieces match a newline; special and added tokens match
by their exact string. TRL compares raw token strings; the normalisation only adds matches between tokenizers
that write spaces differently. `first_token_map(teacher_tokenizer, student_tokenizer)` sends every teacher id to
the longest student token its bytes start with, for `potstill.losses.first_token_kl`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import torch

Offsets = Sequence[tuple[int, int]]
Span = tuple[int, int, int, int]  # a_start, a_stop, b_start, b_stop (token indices, stop exclusive)

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE writes for each byte → the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return {ch: byte for byte, ch in chars.items()}


def is_byte_level(tokenizer: Any) -> bool:
    """Whether a (fast) tokenizer writes its pieces in the byte-level alphabet (a ByteLevel pre-tokenizer or
    decoder)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return "ByteLevel" in repr(backend.pre_tokenizer) or "ByteLevel" in repr(backend.decoder)


def _piece_bytes(piece: str, byte_level: bool) -> bytes | None:
    """The bytes a vocabulary piece stands for (None: not representable, e.g. a special token)."""
    if byte_level:
        decoder = _byte_decoder()
        if not all(ch in decoder for ch in piece):
            return None
        return bytes(decoder[ch] for ch in piece)
    match = _BYTE_FALLBACK.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def byte_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens) and each token's `(start, end)` UTF-8 byte range in it."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    raw = tokenizer.convert_ids_to_tokens(ids)
    data = text.encode("utf-8")
    if is_byte_level(tokenizer):
        pieces = [_piece_bytes(p, True) for p in raw]
        if all(b is not None for b in pieces) and b"".join(b or b"" for b in pieces) == data:
            out, cursor = [], 0
            for b in pieces:
                out.append((cursor, cursor + len(b or b"")))
                cursor += len(b or b"")
            return ids, out
    char_to_byte = [0]
    for ch in text:
        char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
    return ids, [(char_to_byte[s], char_to_byte[e]) for s, e in enc["offset_mapping"]]


def _borders(offsets: Offsets) -> list[tuple[int, int]]:
    """(token count so far, byte position) after each token where no token crosses that position."""
    out = []
    reach = 0
    for i, (_, end) in enumerate(offsets):
        reach = max(reach, end)
        nxt = offsets[i + 1][0] if i + 1 < len(offsets) else None
        if nxt is None or nxt >= reach:
            out.append((i + 1, reach))
    return out


def align_spans(a_offsets: Offsets, b_offsets: Offsets) -> list[Span]:
    """The aligned spans of two tokenizations of one text, as token index ranges `(a_start, a_stop, b_start,
    b_stop)`, in order.

    A span closes at the first byte position where both sides have a border (the end of a token that no later
    token starts before); zero-width tokens at the same position on both sides (an EOS at the end) pair up as
    spans of their own. Tokens left over on one side after the other is exhausted form no span (they have no
    counterpart), so the spans may cover fewer tokens than given.
    """
    a_borders, b_borders = _borders(a_offsets), _borders(b_offsets)
    spans: list[Span] = []
    i = j = 0
    a_from = b_from = 0
    while i < len(a_borders) and j < len(b_borders):
        (a_count, a_pos), (b_count, b_pos) = a_borders[i], b_borders[j]
        if a_pos < b_pos:
            i += 1
        elif b_pos < a_pos:
            j += 1
        else:
            if a_count > a_from and b_count > b_from:
                spans.append((a_from, a_count, b_from, b_count))
                a_from, b_from = a_count, b_count
            i += 1
            j += 1
    return spans


def merge_spans(
    logits: torch.Tensor,
    first_rows: torch.Tensor,
    later_rows: torch.Tensor,
    later_tokens: torch.Tensor,
    later_span: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of logits and one log factor per span: `(logits[first_rows], log_scale)`.

    `logits` is `[R, V]` (a batch's rows flattened); span n is predicted first at row `first_rows[n]`; its
    later tokens are `later_tokens[k]`, predicted at row `later_rows[k]`, for the span `later_span[k]`.
    `log_scale[n] = Σ_{k: later_span[k] = n} log softmax(logits[later_rows[k]] / T)[later_tokens[k]]` in float32,
    0 for a one-token span, so `softmax(logits[first_rows] / T) · exp(log_scale)` is the span's merged
    distribution. Gradients flow through both.
    """
    first = logits.index_select(0, first_rows)
    scale = torch.zeros(len(first_rows), dtype=torch.float32, device=logits.device)
    if len(later_rows):
        rows = logits.index_select(0, later_rows).float() / temperature
        picked = rows.gather(1, later_tokens[:, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)
        scale = scale.index_add(0, later_span, picked)
    return first, scale


def _id_keys(tokenizer: Any) -> list[tuple[int, Any]]:
    """(id, key) for every token in id order; the key is the bytes it stands for, or `("token", piece)` for a
    special / added token or a piece with no byte form."""
    byte_level = is_byte_level(tokenizer)
    added = set(getattr(tokenizer, "get_added_vocab", dict)())
    added |= set(getattr(tokenizer, "all_special_tokens", []))
    out = []
    for piece, token_id in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        data = None if piece in added else _piece_bytes(piece, byte_level)
        out.append((token_id, ("token", piece) if data is None else data))
    return out


def _vocab_keys(tokenizer: Any) -> dict[Any, int]:
    """Each token's key (`_id_keys`) → its lowest id."""
    keys: dict[Any, int] = {}
    for token_id, key in _id_keys(tokenizer):
        keys.setdefault(key, token_id)
    return keys


def vocab_mapping(teacher_tokenizer: Any, student_tokenizer: Any) -> dict[int, int]:
    """Teacher id → student id for every token both vocabularies hold as the same text (one to one; where two
    ids of one side stand for the same text, the lower id is used)."""
    student = _vocab_keys(student_tokenizer)
    return {t_id: student[key] for key, t_id in _vocab_keys(teacher_tokenizer).items() if key in student}


def matched_ids(mapping: dict[int, int]) -> torch.Tensor:
    """`vocab_mapping` as the `(M, 2)` (teacher id, student id) tensor `potstill.losses.uld.gold` takes."""
    if not mapping:
        return torch.zeros((0, 2), dtype=torch.long)
    return torch.tensor(sorted(mapping.items()), dtype=torch.long)


def first_token_map(teacher_tokenizer: Any, student_tokenizer: Any, teacher_vocab: int | None = None
                    ) -> torch.Tensor:
    """`[V_t]` long: each teacher id → the student token its text starts with, for `first_token_kl`.

    The student token is the longest one whose bytes are a prefix of the teacher token's bytes (a byte-level
    student has every single byte, so every teacher token with a byte form gets one). A special or added
    teacher token maps to the student token of the same string; one the student lacks, an empty piece, or an id
    outside the teacher's vocabulary listing maps to -1 (its probability is left out). `teacher_vocab`
    (default: the teacher's largest id + 1) sets the length."""
    student = _vocab_keys(student_tokenizer)
    by_length: dict[int, dict[bytes, int]] = {}
    for key, s_id in student.items():
        if isinstance(key, bytes) and key:
            by_length.setdefault(len(key), {})[key] = s_id
    lengths = sorted(by_length, reverse=True)
    pairs = _id_keys(teacher_tokenizer)
    size = teacher_vocab if teacher_vocab is not None else max(i for i, _ in pairs) + 1
    out = torch.full((size,), -1, dtype=torch.long)
    for t_id, key in pairs:
        if t_id >= size:
            continue
        if not isinstance(key, bytes):
            out[t_id] = student.get(key, -1)
            continue
        out[t_id] = next((by_length[n][key[:n]] for n in lengths if n <= len(key) and key[:n] in by_length[n]),
                         -1)
    return out
