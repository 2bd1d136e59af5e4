"""What GOLD's matched term asks of a student on the spans where one teacher token meets several student tokens
(issue #21 §1, the hypothesis in docs/results.md's cross-tokenizer section).

Each text is encoded by both tokenizers (`potstill.data.cross_tokenizer.PairedEncoder`) and its aligned spans are
counted by shape (teacher tokens : student tokens, 1 or many). On the one-to-many spans (" government" against
" govern" + "ment") GOLD's matched JSD compares the student's merged entry for its first token's id (the
probability of the whole span: first token × later tokens) with the teacher's probability of that first token's
*string*, a token the teacher did not predict there. The script reports, over those spans: how often the first
token's string is a teacher token at all; the teacher's mean probability of its own token and of that string; the
student's mean probability of its first token and of the whole span; and the shares of spans where the matched
target lies below the student's span probability (the matched term pushes the right continuation down) and where
the teacher's own token lies above it.

Usage: python benchmarks/cross_tokenizer_spans.py STUDENT_FOLDER [--teacher builtin:smollm2] [--records 64]
       [--max-length 128]
(STUDENT_FOLDER: a trained cross-tokenizer student, saved with its own tokenizer; the texts are the first
`--records` BBC News training articles.)
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from typing import Any

import torch


def span_stats(student: Any, student_tok: Any, teacher: Any, teacher_tok: Any, texts: list[str],
               max_length: int) -> dict[str, Any]:
    """The counts and means described in the module's doc, for `texts`."""
    from potstill.data.cross_tokenizer import PairedEncoder
    from potstill.data.token_alignment import vocab_mapping

    encoder = PairedEncoder(student_tok, teacher_tok, max_length=max_length)
    teacher_of = {s_id: t_id for t_id, s_id in vocab_mapping(teacher_tok, student_tok).items()}  # GOLD's matches
    shapes: Counter[str] = Counter()
    rows: list[tuple[float, float, float, float, bool]] = []
    with torch.no_grad():
        for text in texts:
            ex = encoder.example(text)
            p_t = torch.softmax(teacher(input_ids=torch.tensor([ex["teacher_ids"]])).logits[0].float(), -1)
            p_s = torch.softmax(student(input_ids=torch.tensor([ex["input_ids"]])).logits[0].float(), -1)
            for s0, s1, t0, t1 in ex["spans"]:
                shapes[f"{'1' if t1 - t0 == 1 else 'many'}:{'1' if s1 - s0 == 1 else 'many'}"] += 1
                if t1 - t0 != 1 or s1 - s0 == 1:
                    continue
                first = ex["input_ids"][s0]
                same_string = teacher_of.get(first)
                whole = 1.0
                for k in range(s0, s1):
                    whole *= p_s[k - 1, ex["input_ids"][k]].item()
                rows.append((p_t[t0 - 1, ex["teacher_ids"][t0]].item(),
                             0.0 if same_string is None else p_t[t0 - 1, same_string].item(),
                             p_s[s0 - 1, first].item(), whole, same_string is not None))
    out: dict[str, Any] = {"spans": dict(shapes), "one_to_many": len(rows)}
    if rows:
        own, string, first, whole, known = zip(*rows, strict=True)
        out.update(first_string_is_teacher_token=statistics.mean(map(float, known)),
                   teacher_p_own_token=statistics.mean(own), teacher_p_first_string=statistics.mean(string),
                   student_p_first_token=statistics.mean(first), student_p_span=statistics.mean(whole),
                   matched_target_below_student=statistics.mean(float(a < b) for a, b in zip(string, whole,
                                                                                               strict=True)),
                   teacher_token_above_student=statistics.mean(float(a > b) for a, b in zip(own, whole,
                                                                                             strict=True)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("student")
    parser.add_argument("--teacher", default="builtin:smollm2")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.data.loaders import load_source
    from potstill.students.loading import resolve_model_path

    torch.set_num_threads(args.threads)
    teacher_path = resolve_model_path(args.teacher, field="--teacher")
    texts = [r["text"] for r in load_source("builtin:bbc", split="train", limit=args.records)]
    stats = span_stats(AutoModelForCausalLM.from_pretrained(args.student).eval(),
                       AutoTokenizer.from_pretrained(args.student),
                       AutoModelForCausalLM.from_pretrained(teacher_path).eval(),
                       AutoTokenizer.from_pretrained(teacher_path), texts, args.max_length)
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
