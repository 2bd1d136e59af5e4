"""Records for cross-tokenizer distillation: each record tokenized by the student's and the teacher's tokenizer,
with the aligned spans of its target text (`potstill.data.token_alignment`).

Each side's sequence is a context token (the tokenizer's BOS, else its EOS), then the prompt's tokens
(`prompt_completion` records), then the target text's tokens (the whole `text`, or the `completion`), then EOS
when `data.add_eos` and both tokenizers have one. Every target token is predicted by the position before it,
so the first token of a text is scored too, on both sides alike (which the shared-tokenizer `text` format does
not do). Only target tokens inside an aligned span count; a sequence is cut at the last span that fits
`max_length` tokens on both sides.

An example holds the student's `input_ids` and `targets` (``targets[j]`` = the token at j + 1 or -100, as in
`potstill.data.lm_records`), the teacher's `teacher_ids`, the `spans` `(s_start, s_stop, t_start, t_stop)` as
token indices into the two sequences, and `n_bytes`, the UTF-8 bytes of target text the spans cover (for
bits per byte).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from potstill.data.lm_records import text_field, tokenizer_name
from potstill.data.token_alignment import align_spans, byte_offsets
from potstill.errors import UserError

CROSS_FORMATS = ("text", "prompt_completion")


def record_texts(records: list[dict]) -> list[str]:
    """The text of each record (`text`, else prompt and completion), e.g. to train a student's tokenizer on."""
    return [rec["text"] if isinstance(rec.get("text"), str)
            else f"{rec.get('prompt') or ''}{rec.get('completion') or ''}" for rec in records]


def context_ids(tokenizer: Any) -> list[int]:
    """The token a sequence starts from: BOS, else EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [token_id]
    raise UserError(f"the tokenizer {tokenizer_name(tokenizer)} has neither a BOS nor an EOS token to start a "
                    f"sequence from; cross-tokenizer distillation needs one")


@dataclass
class PairedEncoder:
    """Encodes records for a student tokenizer and a teacher tokenizer at once."""

    student: Any
    teacher: Any
    max_length: int
    add_eos: bool = True

    def _eos(self) -> tuple[list[int], list[int]]:
        s_eos, t_eos = self.student.eos_token_id, self.teacher.eos_token_id
        if self.add_eos and s_eos is not None and t_eos is not None:
            return [s_eos], [t_eos]
        return [], []

    def example(self, target_text: str, prompt_text: str | None = None) -> dict[str, Any]:
        """The paired example of `target_text` (after `prompt_text`, when given)."""
        s_prefix, t_prefix = context_ids(self.student), context_ids(self.teacher)
        if prompt_text:
            s_prefix = s_prefix + byte_offsets(self.student, prompt_text)[0]
            t_prefix = t_prefix + byte_offsets(self.teacher, prompt_text)[0]
        s_ids, s_off = byte_offsets(self.student, target_text)
        t_ids, t_off = byte_offsets(self.teacher, target_text)
        s_eos, t_eos = self._eos()
        end = len(target_text.encode("utf-8"))
        s_ids, s_off = s_ids + s_eos, s_off + [(end, end)] * len(s_eos)
        t_ids, t_off = t_ids + t_eos, t_off + [(end, end)] * len(t_eos)
        ns, nt = len(s_prefix), len(t_prefix)
        spans = [(a + ns, b + ns, c + nt, d + nt) for a, b, c, d in align_spans(s_off, t_off)]
        spans = [sp for sp in spans if sp[1] <= self.max_length and sp[3] <= self.max_length]
        s_stop = spans[-1][1] if spans else min(ns, self.max_length)
        t_stop = spans[-1][3] if spans else min(nt, self.max_length)
        student_ids = (s_prefix + s_ids)[:s_stop]
        teacher_ids = (t_prefix + t_ids)[:t_stop]
        targets = [-100] * len(student_ids)
        for a, b, _, _ in spans:
            for k in range(a, b):
                targets[k - 1] = student_ids[k]
        n_bytes = s_off[spans[-1][1] - ns - 1][1] if spans else 0
        return {"input_ids": student_ids, "targets": targets, "teacher_ids": teacher_ids, "spans": spans,
                "n_bytes": n_bytes}

    def examples(self, records: list[dict], fmt: str, field: str) -> list[dict[str, Any]]:
        """One paired example per record (`fmt`: text or prompt_completion)."""
        if fmt not in CROSS_FORMATS:
            raise UserError(f"{field}: cross-tokenizer distillation reads `text` or `prompt` + `completion` records, "
                            f"not {fmt!r}")
        out = []
        for i, rec in enumerate(records):
            where = f"{field}, record {i}"
            if fmt == "text":
                out.append(self.example(text_field(rec["text"], "text", where)))
            else:
                out.append(self.example(text_field(rec["completion"], "completion", where),
                                        text_field(rec["prompt"], "prompt", where)))
        return out
