"""benchmarks/cross_tokenizer.py's sft_teacher row: the teacher text it trains on and the budget it spends."""

from __future__ import annotations

import argparse
import json

import pytest
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
