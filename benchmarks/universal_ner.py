"""UniversalNER's targeted distillation at small scale (issue #21 §8): a chat student learns a teacher's entity labels.

The teacher is SCRIPTED, not a language model (no NER model is available offline): `scripted_teacher` labels 8 types
with regular expressions and gazetteers written here — date, money, percentage, year, weekday, country, city,
organization — and answers in the format the paper prompts an LLM for (a JSON list of [mention, type] pairs), which
`potstill.data.universal_ner.parse_teacher_entities` reads. Its labels are the reference: it scores F1 = 1 against
itself by construction, and no independent gold exists here, so the student's F1 against the teacher's labels is
the measure (the paper's "targeted distillation" question: how much of the teacher's skill the student keeps).

Data: training passages from BBC News articles (`builtin:bbc` train split, two sentences per passage, ≤ 400
characters), or with `--train-sources bbc wikipedia [lee-background]` alternately from those, the Wikipedia dump
in gensim's test data (more surface forms: "August 27", "per cent") and the Lee background news (other articles of
the held-out Lee newswire); held-out passages from other sources: the 50 rated Lee news documents and 20 Newsgroups
posts (the LM suite's texts, `potstill.data.lm_suite_sources`). Conversations:
`universal_ner_conversations` (one turn per type present, `--negatives` absent types drawn by frequency, answer
[]). Student: SmolLM2-135M-Instruct fine-tuned with the loss on assistant turns only
(`recipes/smollm2-universal-ner.yaml`: causal_lm, data.format messages, no teacher model).

Evaluation: for every held-out passage and every one of the 8 types, the student answers "What describes <type> in
the text?" greedily (≤ 16 new tokens); answers are parsed (`parse_answer`) and scored with strict (type, mention)
micro F1 (`potstill.eval.ner`) against the teacher's labels, for the untrained student (zero-shot) and the trained one;
the "extractive" rows score the same answers after `mentions_in_passage` drops every mention not written in its
passage (post-processing, not in the paper, which scores the raw answers: the raw rows are the headline).

Usage: python benchmarks/universal_ner.py [--train 600] [--heldout 40] [--steps 60] [--negatives 2] [--lr 3e-4]
       [--train-sources bbc [wikipedia] [lee-background]] [--pool N [--empty-share 0.2] [--forms] [--mentions]]
       [--threads 2]
       [--seed 0] [--max-length N] [--out runs/universal_ner] [--student FOLDER | --soup FOLDER FOLDER … | --members N]
       [--set KEY=VALUE …]
       python benchmarks/universal_ner.py --write-recipe-data    # rewrites src/potstill/recipes/universal-ner/
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from _llm_common import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "src" / "potstill" / "recipes" / "smollm2-universal-ner.yaml"
RECIPE_DATA = ROOT / "src" / "potstill" / "recipes" / "universal-ner"
TYPES = ("date", "money", "percentage", "year", "weekday", "country", "city", "organization")

MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December|"
          "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
COUNTRIES = (
    "Afghanistan", "Argentina", "Australia", "Austria", "Belgium", "Brazil", "Britain", "Canada", "Chile", "China",
    "Colombia", "Denmark", "Egypt", "England", "Finland", "France", "Germany", "Greece", "India", "Indonesia", "Iran",
    "Iraq", "Ireland", "Israel", "Italy", "Japan", "Kenya", "Lebanon", "Malaysia", "Mexico", "Netherlands",
    "New Zealand", "Nigeria", "North Korea", "Norway", "Pakistan", "Palestine", "Poland", "Portugal", "Russia",
    "Saudi Arabia", "Scotland", "South Africa", "South Korea", "Spain", "Sweden", "Switzerland", "Syria", "Taiwan",
    "Thailand", "Turkey", "Ukraine", "United States", "US", "USA", "UK", "Vietnam", "Wales", "Zimbabwe")
CITIES = (
    "Adelaide", "Amsterdam", "Athens", "Baghdad", "Bangkok", "Beijing", "Belfast", "Berlin", "Birmingham", "Brisbane",
    "Brussels", "Cairo", "Canberra", "Cardiff", "Chicago", "Dublin", "Edinburgh", "Geneva", "Glasgow", "Hobart",
    "Hong Kong", "Jerusalem", "Kabul", "Leeds", "Liverpool", "London", "Los Angeles", "Madrid", "Manchester",
    "Melbourne", "Milan", "Moscow", "Mumbai", "Munich", "New Delhi", "New York", "Paris", "Perth", "Rome",
    "San Francisco", "Seoul", "Shanghai", "Singapore", "Sydney", "Tokyo", "Toronto", "Vienna", "Washington",
    "Wellington")
ORGANIZATIONS = (
    "Apple", "BBC", "Microsoft", "Google", "IBM", "Intel", "Sony", "Nintendo", "Yahoo", "eBay", "Nokia", "Vodafone",
    "European Union", "EU", "United Nations", "UN", "Nato", "NATO", "Labour", "Conservatives", "Tories",
    "Liberal Democrats", "Chelsea", "Arsenal", "Manchester United", "Liverpool FC", "Federal Reserve", "NASA",
    "World Bank", "IMF", "FBI", "Reuters", "Hamas", "Taliban", "Qantas", "Telstra", "WTO", "Fifa", "Uefa", "Oscars")


def _alternation(words: tuple[str, ...]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


# (type, pattern) in priority order: an earlier type's match wins over an overlapping later one
PATTERNS = [
    ("date", rf"\b(?:\d{{1,2}} (?:{MONTHS})\.?(?: \d{{4}})?"
             rf"|(?:{MONTHS})\.? \d{{1,2}}(?:st|nd|rd|th)?(?:, \d{{4}})?)\b"),
    ("money", r"(?:[$£€]|US\$|A\$)\d[\d,]*(?:\.\d+)?(?:\s?(?:m|bn|billion|million|trillion|k))?\b"),
    ("percentage", r"\b\d+(?:\.\d+)?(?:%| ?per ?cent\b)"),
    ("year", r"\b(?:19|20)\d{2}\b"),
    ("weekday", rf"\b(?:{_alternation(WEEKDAYS)})\b"),
    ("country", rf"\b(?:{_alternation(COUNTRIES)})\b"),
    ("city", rf"\b(?:{_alternation(CITIES)})\b"),
    ("organization", rf"\b(?:{_alternation(ORGANIZATIONS)})\b"),
]
COMPILED = [(t, re.compile(p)) for t, p in PATTERNS]


def scripted_teacher(passage: str) -> str:
    """The scripted teacher's answer for one passage: a JSON list of [mention, type] pairs in text order (matches of
    the types in `PATTERNS` order, an overlap going to the earlier type)."""
    taken: list[tuple[int, int, str, str]] = []
    for entity_type, pattern in COMPILED:
        for m in pattern.finditer(passage):
            if all(m.end() <= s or m.start() >= e for s, e, _, _ in taken):
                taken.append((m.start(), m.end(), m.group(0), entity_type))
    return json.dumps([[mention, t] for _, _, mention, t in sorted(taken)])


def passages_of(texts: list[str], *, limit: int, max_chars: int = 400) -> list[str]:
    """Consecutive pairs of sentences of `texts` (one line each, ≤ `max_chars`), the first `limit`."""
    out: list[str] = []
    for text in texts:
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]
        for k in range(0, len(sentences) - 1, 2):
            passage = f"{sentences[k]} {sentences[k + 1]}"
            if 40 <= len(passage) <= max_chars:
                out.append(passage)
                if len(out) == limit:
                    return out
    return out


TRAIN_SOURCES = ("bbc", "wikipedia", "lee-background")


def training_texts(source: str) -> list[str]:
    """The documents training passages are cut from: BBC News train-split articles (every 7th article first, so
    that all five topics come in early), the paragraphs of the Wikipedia dump in gensim's test data, or the 300
    Lee background news documents (the same Australian newswire as the held-out Lee passages, other articles)."""
    if source == "wikipedia":
        from potstill.data.general import wiki_paragraphs

        return wiki_paragraphs()
    if source == "lee-background":
        from potstill.data.general import lee_background

        return lee_background()
    from potstill.data.loaders import builtin_records

    bbc = [r["text"] for r in builtin_records("bbc", "train")]
    return bbc[::7] + [t for k, t in enumerate(bbc) if k % 7]


def held_out(heldout: int) -> list[tuple[str, str]]:
    """(source, passage) of the held-out passages: half from the 50 rated Lee documents, then newsgroup posts."""
    from potstill.data.lm_suite_sources import source_texts

    half = heldout // 2
    return [(source, p) for source, limit in (("lee", half), ("newsgroups", heldout - half))
            for p in passages_of(source_texts(source), limit=limit)]


def training_passages(train: int, sources: tuple[str, ...] = ("bbc",)) -> list[str]:
    """`train` passages; with several `sources` they alternate between them, an equal share each (the first
    sources take the remainder)."""
    shares = [passages_of(training_texts(s), limit=train // len(sources) + (k < train % len(sources)))
              for k, s in enumerate(sources)]
    return [share[i] for i in range(max(map(len, shares), default=0)) for share in shares if i < len(share)]


def annotate(passages: list[str], source: str) -> list[dict[str, list[str]]]:
    from potstill.data.universal_ner import parse_teacher_entities

    return [parse_teacher_entities(scripted_teacher(p), where=f"{source} passage {k}") for k, p in enumerate(passages)]


def write_data(folder: Path, *, train: int, heldout: int, negatives: int, seed: int = 0,
               sources: tuple[str, ...] = ("bbc",), pool: int | None = None,
               empty_share: float = 0.2, forms: bool = False, mentions: bool = False) -> dict[str, Any]:
    """train.jsonl (conversations), eval.jsonl (conversations of the held-out passages, for the run's perplexity)
    and heldout.jsonl (passage + teacher labels) in `folder`. With `pool`, the teacher labels that many training
    passages and `train` of them are chosen type-balanced (`select_passages_by_type`, with `forms` each type's
    surface forms balanced too, with `mentions` each distinct mention string); else the first `train`."""
    from potstill.data.universal_ner import select_passages_by_type, universal_ner_conversations

    train_passages, sourced = training_passages(pool or train, sources), held_out(heldout)
    held = [p for _, p in sourced]
    train_labels, held_labels = annotate(train_passages, "training"), annotate(held, "heldout")
    if pool:
        chosen = select_passages_by_type(train_labels, train, empty_share=empty_share, seed=seed,
                                         forms=forms, mentions=mentions)
        train_passages, train_labels = [train_passages[k] for k in chosen], [train_labels[k] for k in chosen]
    write_jsonl(folder / "train.jsonl", universal_ner_conversations(train_passages, train_labels,
                                                                    negatives=negatives, seed=seed))
    write_jsonl(folder / "eval.jsonl", universal_ner_conversations(held, held_labels, negatives=negatives,
                                                                   seed=seed + 1))
    write_jsonl(folder / "heldout.jsonl", [{"passage": p, "source": src, "entities": e}
                                           for (src, p), e in zip(sourced, held_labels, strict=True)])
    count = lambda labels: sum(len(m) for e in labels for m in e.values())  # noqa: E731
    return {"train_passages": len(train_passages), "train_mentions": count(train_labels),
            "heldout_passages": len(held), "heldout_mentions": count(held_labels)}


def predict(model: Any, tokenizer: Any, passages: list[str], *, max_new_tokens: int = 16,
            extractive: bool = False) -> list[dict]:
    """The model's {type: [mentions]} per passage: every type asked, greedy answers, parsed leniently; with
    `extractive`, decoded under `ExtractiveListDecoding` (every mention a span of its passage)."""
    import torch

    from potstill.data.extractive_decoding import ExtractiveListDecoding, TokenTexts
    from potstill.data.universal_ner import parse_answer, query_messages

    tokenizer.padding_side = "left"
    tokens = TokenTexts.of(tokenizer) if extractive else None
    out = []
    model.eval()
    for passage in passages:
        prompts = [tokenizer.apply_chat_template(query_messages(passage, t), tokenize=False,
                                                 add_generation_prompt=True) for t in TYPES]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        constraint = (ExtractiveListDecoding(tokens, passage, enc["input_ids"].shape[1])
                      if tokens is not None else None)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 prefix_allowed_tokens_fn=constraint)
        answers = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append({t: parse_answer(a) for t, a in zip(TYPES, answers, strict=True)})
    return out


def scores(predicted: list[dict], held: list[dict]) -> dict[str, Any]:
    """Strict micro F1 of `predicted` against the teacher's labels of `held`, per type and per held-out source."""
    from potstill.eval.ner import entity_f1, per_type

    reference = [h["entities"] for h in held]
    sources = [h["source"] for h in held]
    per_source = {src: round(entity_f1([p for p, s in zip(predicted, sources, strict=True) if s == src],
                                       [r for r, s in zip(reference, sources, strict=True) if s == src])["f1"], 3)
                  for src in dict.fromkeys(sources)}
    return {**entity_f1(predicted, reference), "per_type": {t: round(s["f1"], 3) for t, s in
                                                            per_type(predicted, reference).items()},
            "per_source": per_source}


def score(model: Any, tokenizer: Any, held: list[dict], *, extractive_decoding: bool = False) -> dict[str, Any]:
    """The raw answers' scores, under "extractive" the scores of the mentions that occur in their passage, and
    with `extractive_decoding` under "extractive_decoding" the scores of answers decoded under that constraint."""
    from potstill.data.universal_ner import mentions_in_passage

    predicted = predict(model, tokenizer, [h["passage"] for h in held])
    extractive = [{t: mentions_in_passage(m, h["passage"]) for t, m in answers.items()}
                  for answers, h in zip(predicted, held, strict=True)]
    result = {**scores(predicted, held), "extractive": scores(extractive, held), "predicted": predicted}
    if extractive_decoding:
        constrained = predict(model, tokenizer, [h["passage"] for h in held], extractive=True)
        result["extractive_decoding"] = {**scores(constrained, held), "predicted": constrained}
    return result


def train_member(overrides: list[str], name: str, k: int, seed: int) -> Path:
    """Train soup member `k`: the recipe with `overrides`, named <name>-member<k>, with run seed `seed` + 100·k (the
    batch order differs; the data is the same) and no evaluation during training; its student folder."""
    from potstill.config import load_recipe
    from potstill.train import run_recipe

    member = load_recipe(RECIPE, [*overrides, f"name={name}-member{k}", f"seed={seed + 100 * k}", "data.eval=null"])
    run_recipe(member)
    return member.run_dir / "student"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--heldout", type=int, default=40)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--negatives", type=int, default=2)
    parser.add_argument("--train-sources", nargs="+", choices=TRAIN_SOURCES, default=["bbc"],
                        help="where training passages come from (alternating); held-out is always Lee + newsgroups")
    parser.add_argument("--pool", type=int, default=None,
                        help="label this many training passages and keep --train of them, the types balanced")
    parser.add_argument("--empty-share", type=float, default=0.2,
                        help="with --pool: the share of kept passages without any mention")
    parser.add_argument("--forms", action="store_true",
                        help="with --pool: within a type, its mentions' surface forms take turns too")
    parser.add_argument("--mentions", action="store_true",
                        help="with --pool: within a type (or form), its distinct mention strings take turns too")
    parser.add_argument("--lr", type=float, default=None, help="the recipe's trainer.lr unless given")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=None, help="the recipe's data.max_length unless given")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed and the conversations' (turn order, "
                        "negative types)")
    parser.add_argument("--skip-zero-shot", action="store_true")
    parser.add_argument("--student", default=None,
                        help="score this trained student folder (same --out data) instead of training one")
    parser.add_argument("--extractive-decoding", action="store_true",
                        help="also score the trained student's answers decoded so that every mention is a span of "
                             "its passage (potstill.data.extractive_decoding)")
    parser.add_argument("--soup", nargs="+", default=None, metavar="FOLDER",
                        help="score the uniform soup of these trained student folders (potstill.students.soup; "
                             "same --out data) instead of training one")
    parser.add_argument("--members", type=int, default=1,
                        help="train this many runs of --steps each on the same data (run seeds S, S+100, …) and score "
                             "their uniform soup (potstill.students.soup): a soup within one run's budget when "
                             "--steps is the budget's share")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="more recipe overrides, e.g. trainer.weight_average={method: swa, start: 0.5}")
    parser.add_argument("--write-recipe-data", action="store_true")
    parser.add_argument("--out", default="runs/universal_ner")
    args = parser.parse_args()
    if args.members > 1 and (args.student or args.soup):
        parser.error("--members trains the soup's members: it cannot go with --student or --soup")
    if args.write_recipe_data:
        print(write_data(RECIPE_DATA, train=args.train, heldout=args.heldout, negatives=args.negatives,
                         seed=args.seed, sources=tuple(args.train_sources), pool=args.pool,
                         empty_share=args.empty_share, forms=args.forms,
                         mentions=args.mentions))
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.assets import smollm2_path
    from potstill.config import load_recipe
    from potstill.train import run_recipe

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out).resolve()
    data = write_data(out / "data", train=args.train, heldout=args.heldout, negatives=args.negatives,
                      seed=args.seed, sources=tuple(args.train_sources), pool=args.pool,
                      empty_share=args.empty_share, forms=args.forms, mentions=args.mentions)
    print(data, flush=True)
    held = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    result: dict[str, Any] = {"data": data, "teacher": {"f1": 1.0, "note": "scripted; its own labels"}}
    if not args.skip_zero_shot:
        result["zero_shot"] = score(AutoModelForCausalLM.from_pretrained(smollm2_path()), tokenizer, held)
        print("zero-shot", result["zero_shot"], flush=True)
    overrides = [f"output_dir={out / 'runs'}", f"trainer.max_steps={args.steps}", f"seed={args.seed}",
                 f"trainer.num_threads={args.threads}", f"data.train.path={out / 'data' / 'train.jsonl'}",
                 f"data.eval.path={out / 'data' / 'eval.jsonl'}",
                 *([f"trainer.lr={args.lr}"] if args.lr is not None else []),
                 *([f"data.max_length={args.max_length}"] if args.max_length is not None else []), *args.overrides]
    recipe = load_recipe(RECIPE, overrides)
    trains = args.student is None and not args.soup
    result["train_seconds"] = 0.0
    if trains:
        train_started = time.perf_counter()
        if args.members > 1:
            args.soup = [str(train_member(overrides, recipe.name, k, args.seed)) for k in range(args.members)]
        else:
            result["run_table"] = run_recipe(recipe).get("table")
        result["train_seconds"] = time.perf_counter() - train_started
    if args.soup:
        from potstill.students.soup import uniform_soup

        args.student = str(uniform_soup(args.soup, out / "soup"))
        result["soup_of"] = args.soup
    student = AutoModelForCausalLM.from_pretrained(args.student or out / "runs" / recipe.name / "student")
    result["student"] = score(student, tokenizer, held, extractive_decoding=args.extractive_decoding)
    result["steps"] = args.steps if trains else None
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"{'model':<28}{'precision':>10}{'recall':>8}{'F1':>7}{'tp':>5}{'fp':>5}{'fn':>5}")
    print(f"{'teacher (scripted)':<28}{1:>10.3f}{1:>8.3f}{1:>7.3f}")
    trained = ("student (given)" if not trains else f"soup of {args.members} × {args.steps} steps"
               if args.members > 1 else f"student ({args.steps} steps)")
    for name, key in (("SmolLM2 zero-shot", "zero_shot"), (trained, "student")):
        if key in result:
            rows = [(name, result[key]), ("  extractive", result[key]["extractive"])]
            if "extractive_decoding" in result[key]:
                rows.append(("  extractive decoding", result[key]["extractive_decoding"]))
            for label, r in rows:
                print(f"{label:<28}{r['precision']:>10.3f}{r['recall']:>8.3f}{r['f1']:>7.3f}{r['tp']:>5}"
                      f"{r['fp']:>5}{r['fn']:>5}")
    print("student per type:", result["student"]["per_type"])
    print("student per held-out source:", result["student"]["per_source"])
    print(f"total {result['seconds']:.0f} s (training {result['train_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
