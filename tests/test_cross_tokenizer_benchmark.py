"""benchmarks/cross_tokenizer.py (the sft_teacher row's teacher text and budget, the pretrained student) and
benchmarks/cross_tokenizer_spans.py (what GOLD's matched term compares on one-to-many spans)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("cross_tokenizer")


def _args(tmp_path, *, records: int, budget: float, free: bool) -> argparse.Namespace:
    return argparse.Namespace(out=str(tmp_path), records=records, eval_records=2, budget_seconds=budget, threads=1,
                              max_steps=0, eval_every=0, matched_weight=None, quick=True, teacher_text_share=0.5,
                              teacher_text_free=free, pretrain_seconds=0.0, pretrained=None)


def test_free_teacher_text_continues_every_article_and_costs_no_budget(bench, tmp_path):
    from transformers import AutoTokenizer

    from potstill.data.loaders import load_source

    args = _args(tmp_path, records=5, budget=5.0, free=True)
    raw = bench._recipe(args, "sft_teacher", 0)
    records, tok_dir, seconds, count = bench._teacher_text(args, raw, 0)
    texts = [json.loads(line)["text"] for line in records.read_text(encoding="utf-8").splitlines()]
    articles = [r["text"] for r in load_source("builtin:bbc", split="train", limit=5)]
    teacher_tok = AutoTokenizer.from_pretrained(raw["teacher"]["path"])
    assert seconds == 0.0 and count == len(texts) == 5
    for text, article in zip(texts, articles, strict=True):
        prompt = teacher_tok.decode(teacher_tok(article, add_special_tokens=False)["input_ids"][:bench.PROMPT_TOKENS])
        assert text.startswith(prompt) and len(text) > len(prompt)  # the prompt, then the teacher's continuation
    assert len(AutoTokenizer.from_pretrained(tok_dir)) == 512  # bpe:512 of the quick recipe, on the articles


def test_counted_generation_stops_at_the_first_batch_past_its_share(bench, tmp_path):
    args = _args(tmp_path, records=bench.GENERATION_BATCH + 4, budget=1e-6, free=False)
    records, _, seconds, count = bench._teacher_text(args, bench._recipe(args, "sft_teacher", 0), 0)
    assert count == bench.GENERATION_BATCH and seconds > 0
    assert len(records.read_text(encoding="utf-8").splitlines()) == bench.GENERATION_BATCH


def test_rows_start_from_the_student_pretrained_on_other_text(bench, tmp_path):
    from transformers import AutoTokenizer

    args = _args(tmp_path, records=4, budget=2.0, free=False)
    args.pretrain_seconds = 2.0
    done = bench._pretrain(args)
    passages = (tmp_path / "pretrained" / "passages.jsonl").read_text(encoding="utf-8").splitlines()
    assert done["steps"] > 0 and done["passages"] == len(passages) > 1000
    assert all(len(json.loads(line)["text"]) >= 600 for line in passages)
    raw = bench._recipe(args, "gold", 0)
    assert raw["student"] == {"init": "pretrained", "path": str(tmp_path / "pretrained" / "student")}
    # the pretrained student keeps the BPE of the training articles, which every from-scratch row trains too
    assert len(AutoTokenizer.from_pretrained(raw["student"]["path"])) == 512


def test_span_stats_count_span_shapes_and_read_the_teachers_first_string_probability():
    from test_causal_lm import llama
    from test_cross_tokenizer import _byte_tokenizer

    spans = load_benchmark("cross_tokenizer_spans")
    student_tok, teacher_tok = _byte_tokenizer([]), _byte_tokenizer([("h", "e"), ("Ġ", "w")])
    student, teacher = llama(len(student_tok), init=0.5).eval(), llama(len(teacher_tok), seed=1, init=0.5).eval()
    stats = spans.span_stats(student, student_tok, teacher, teacher_tok, ["he w"], max_length=16)
    # "he w": teacher <bos> he Ġw <eos>, student <bos> h e Ġ w <eos>: two one-to-many spans and the EOS
    assert stats["spans"] == {"1:many": 2, "1:1": 1} and stats["one_to_many"] == 2
    assert stats["first_string_is_teacher_token"] == 1.0  # "h" and "Ġ" are teacher tokens too
    ids = teacher_tok.convert_tokens_to_ids(["<bos>", "he", "Ġw"])
    p_t = torch.softmax(teacher(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    want = (p_t[0, teacher_tok.convert_tokens_to_ids("h")] + p_t[1, teacher_tok.convert_tokens_to_ids("Ġ")]) / 2
    assert stats["teacher_p_first_string"] == pytest.approx(want.item(), rel=1e-5)
    assert stats["teacher_p_own_token"] == pytest.approx(((p_t[0, ids[1]] + p_t[1, ids[2]]) / 2).item(), rel=1e-5)
    assert 0 < stats["student_p_span"] < stats["student_p_first_token"] < 1


def test_the_ftkl_rows_train_first_token_kl_next_to_the_cross_entropy(bench, tmp_path):
    from potstill.config import validate_recipe

    args = _args(tmp_path, records=4, budget=2.0, free=False)
    for row in ("ftkl", "ftkl_cached"):
        raw = bench._recipe(args, row, 0)
        assert raw["objectives"] == [{"name": "first_token_kl"}] and raw["trainer"]["hard_label_weight"] == 1.0
        assert validate_recipe(raw).objectives[0].name == "first_token_kl"
    assert bench._recipe(args, "sft", 0)["objectives"] == []
