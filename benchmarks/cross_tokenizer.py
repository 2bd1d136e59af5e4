"""Cross-tokenizer distillation at equal wall time (issue #21 §1): ULD and GOLD against plain fine-tuning.

Teacher: SmolLM2-135M-Instruct (`builtin:smollm2`, 49,152-token byte-level BPE). Student: the recipe
`recipes/smollm2-cross-tokenizer.yaml`, a 4-layer × 256 Llama (SmolLM2's config, shrunk) with its own 4,096-token
byte-level BPE trained on the training articles (`student.tokenizer: bpe:4096`; the same tokenizer and the same
initial weights in every row of a seed). Data: the first `--records` BBC News training articles (`text` records,
both tokenizations cut at the last aligned span that fits 128 tokens on both sides).

Rows (every row: the recipe's optimizer, batch 8, lr 3e-3 constant after 5 warm-up steps, the same
`trainer.max_seconds` budget of training wall time):
- uld: ULD (sorted-probability L1 per aligned span) + the student's own next-token cross-entropy (weight 1 each);
- gold: GOLD's hybrid (JSD β 0.5 on the same-string tokens, weighted by their share of the teacher's vocabulary,
  sorted L1 on the rest) + cross-entropy;
- sft: cross-entropy only (plain fine-tuning on the same text; the teacher is loaded but never run in training);
- uld_only (not run by default): ULD without the cross-entropy, to see what the teacher's signal alone teaches;
- ftkl: `first_token_kl` (the teacher's next-token distribution summed onto the student token each teacher
  token's text starts with, KL to the student's first-token row of each span) + cross-entropy;
- uld_cached / gold_cached / ftkl_cached: uld / gold / ftkl read from a top-k cache of the teacher's span rows
  (`potstill cache`, k = `--cache-k`, built by the row itself) instead of running the teacher each step. The
  cache's build time counts against the row's budget: it trains for `--budget-seconds` minus the build.
- sft_teacher: fine-tuning on teacher text (the issue's baseline, sequence-level KD through text): the teacher
  continues the first 32 of its tokens of each training article by 96 sampled tokens (temperature 0.9, 32
  prompts a batch), and the student is fine-tuned on prompt + continuation. Generation counts against the
  budget: it stops at the first batch past `--teacher-text-share` of the budget, and the student trains for
  the rest. `--teacher-text-free` generates for every record and does not count it (a generous control). The
  student's BPE is trained on the real articles, as in every other row, so its tokenizer and initial weights
  are the other rows'.

Held-out score: bits per byte (summed next-token NLL / ln 2 / UTF-8 bytes) on `--eval-records` BBC validation
articles, cut where both tokenizations fit 128 tokens, so teacher and students score the same bytes; also each
model's perplexity on its own tokens (not comparable across tokenizers). The teacher's bits per byte is the floor.

Each (row, seed) runs in its own subprocess, `--jobs` at a time (default: all rows of a seed side by side, so that
they share the machine alike); `<out>/results.json` keeps every finished row and a rerun reuses them.
`--quick`: a tiny random teacher with SmolLM2's tokenizer, 16 records, a 5 s budget: a smoke test, numbers mean
nothing.

`--pretrain-seconds S`: every row starts from a student that already models text instead of a random one. Before
the rows, the recipe's student (the BPE trained on the training articles, as in every row) is fine-tuned for S
seconds on the `builtin:general` training texts of its non-BBC sources (Wikipedia, Lee background, chatterbot),
packed into passages of about 600 characters; it is stored in `--pretrained DIR` (default `<out>/pretrained`;
built once, reused by every row and seed and by other runs given the same DIR, its time in no row's budget),
and each row loads it (`student.init: pretrained`).

`--max-steps N` also stops every row after N optimizer steps: with `--rows sft` and the KD rows' step count it is
the equal-steps control (does the teacher's signal help per step?). Use another `--out` for it.

Usage: python benchmarks/cross_tokenizer.py [--budget-seconds 240] [--seeds 0 1 2] [--rows uld gold sft]
       [--records 256] [--eval-records 16] [--jobs 3] [--threads 1] [--max-steps 0] [--cache-k 64]
       [--matched-weight W] [--eval-every 0] [--teacher-text-share 0.5] [--teacher-text-free]
       [--pretrain-seconds 0] [--pretrained DIR]
       [--out runs/cross_tokenizer]
       [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROWS = ("uld", "gold", "sft", "uld_only", "uld_cached", "gold_cached", "sft_teacher", "ftkl", "ftkl_cached")
PROMPT_TOKENS, NEW_TOKENS, GENERATION_BATCH = 32, 96, 32
RECIPE = Path(__file__).resolve().parents[1] / "src" / "potstill" / "recipes" / "smollm2-cross-tokenizer.yaml"
MARK = "@@ROW "


def _recipe(args: argparse.Namespace, row: str, seed: int) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    raw["name"] = f"{row}-seed{seed}"
    raw["output_dir"] = str(Path(args.out).resolve() / "runs")
    raw["seed"] = seed
    kd = {"uld": [{"name": "uld"}], "gold": [{"name": "gold"}], "uld_only": [{"name": "uld"}],
          "ftkl": [{"name": "first_token_kl"}]}
    raw["objectives"] = kd.get(row.removesuffix("_cached"), [])  # sft, sft_teacher, pretrain: fine-tuning
    if args.matched_weight is not None:
        for objective in raw["objectives"]:
            if objective["name"] == "gold":
                objective["params"] = {"matched_weight": args.matched_weight}
    if row == "uld_only":
        raw["trainer"]["hard_label_weight"] = 0.0
    raw["data"]["train"]["limit"] = args.records
    raw["data"]["eval"]["limit"] = args.eval_records
    raw["trainer"].update(max_seconds=args.budget_seconds, num_threads=args.threads)
    if args.max_steps:
        raw["trainer"]["max_steps"] = args.max_steps
    if args.eval_every:  # held-out curves in the run's metrics.jsonl (their time counts against the budget)
        raw["eval"]["every"] = args.eval_every
    if args.pretrain_seconds and row != "pretrain":
        raw["student"] = {"init": "pretrained", "path": str(_pretrained_dir(args) / "student")}
    if args.quick:
        from _llm_common import tiny_llama_teacher

        raw["teacher"]["path"] = str(tiny_llama_teacher(Path(args.out).resolve() / "tiny-teacher", layers=2,
                                                        max_positions=256))
        if raw["student"]["init"] != "pretrained":
            raw["student"]["tokenizer"] = "bpe:512"
            raw["student"]["config"] = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                        "num_attention_heads": 2, "num_key_value_heads": 2}
        raw["data"]["max_length"] = 32
        raw["trainer"]["batch_size"] = 4
    return raw


def _articles(raw: dict[str, Any]) -> list[str]:
    from potstill.data.loaders import load_source

    train = raw["data"]["train"]
    return [r["text"] for r in load_source(train["path"], split=train["split"], limit=train["limit"])]


def _article_tokenizer(raw: dict[str, Any], articles: list[str], folder: Path) -> Path:
    """The student's byte-level BPE trained on the training articles (what `bpe:<size>` trains in every row)."""
    from potstill.students.tokenizer import bpe_vocab_size, train_byte_level_bpe

    train_byte_level_bpe(articles, bpe_vocab_size(raw["student"]["tokenizer"]), folder)
    return folder


def _pretrained_dir(args: argparse.Namespace) -> Path:
    return Path(args.pretrained or Path(args.out) / "pretrained").resolve()


def _pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """The --pretrain-seconds student: the recipe's, fine-tuned on non-BBC general text (see the module's doc)."""
    import random
    import shutil

    from _llm_common import write_jsonl

    from potstill.config import validate_recipe
    from potstill.data.loaders import load_source
    from potstill.io import atomic_write_json
    from potstill.train import run_recipe

    folder = _pretrained_dir(args)
    raw = _recipe(args, "pretrain", 0)
    texts = [r["text"] for r in load_source("builtin:general", split="train") if r["source"] != "bbc"]
    random.Random(0).shuffle(texts)
    passages, current = [], ""
    for text in texts:
        current = f"{current} {text}" if current else text
        if len(current) >= 600:
            passages.append(current)
            current = ""
    records = folder / "passages.jsonl"
    write_jsonl(records, [{"text": t} for t in passages])
    raw.update(name="run", output_dir=str(folder))
    raw["student"]["tokenizer"] = str(_article_tokenizer(raw, _articles(raw), folder / "tokenizer"))
    raw["data"]["train"] = {"path": str(records)}
    raw["trainer"].update(max_seconds=args.pretrain_seconds, max_steps=1_000_000)
    summary = run_recipe(validate_recipe(raw), overwrite=True)
    shutil.rmtree(folder / "student", ignore_errors=True)  # a student of an interrupted build
    (folder / "run" / "student").replace(folder / "student")
    done = {"pretrain_seconds": args.pretrain_seconds, "passages": len(passages), "steps": summary["steps"],
            "after": summary["table"][-1]}
    atomic_write_json(folder / "done.json", done)
    return done


def _teacher_text(args: argparse.Namespace, raw: dict[str, Any], seed: int) -> tuple[Path, Path | None, float, int]:
    """The sft_teacher row's training text and student tokenizer: (records file, tokenizer folder (None for a
    pretrained student), seconds spent generating, records generated)."""
    import time

    from _llm_common import write_jsonl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.data.sampling import SamplingSettings, sample_completions
    from potstill.students.loading import resolve_model_path

    folder = Path(args.out).resolve() / "teacher_text" / f"seed{seed}"
    articles = _articles(raw)
    tok_dir = None  # a pretrained student brings its own tokenizer
    if raw["student"]["init"] != "pretrained":
        tok_dir = _article_tokenizer(raw, articles, folder / "student_tokenizer")
    path = resolve_model_path(raw["teacher"]["path"], field="teacher.path")
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path).eval()
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    limit = float("inf") if args.teacher_text_free else args.teacher_text_share * args.budget_seconds
    texts: list[str] = []
    start = time.perf_counter()
    for first in range(0, len(articles), GENERATION_BATCH):
        prompts = [tokenizer(a, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
                   for a in articles[first:first + GENERATION_BATCH]]
        completions = sample_completions(teacher, prompts, settings=settings, pad_token_id=pad_id,
                                         eos_token_id=tokenizer.eos_token_id, seed=seed * 1_000_003 + first)
        texts += [tokenizer.decode(p + c, skip_special_tokens=True) for p, c in zip(prompts, completions, strict=True)]
        if time.perf_counter() - start >= limit:
            break
    seconds = time.perf_counter() - start
    records = folder / "teacher_text.jsonl"
    write_jsonl(records, [{"text": t} for t in texts])
    return records, tok_dir, (0.0 if args.teacher_text_free else seconds), len(texts)


def _worker(args: argparse.Namespace) -> None:
    """One (row, seed): run it and print its numbers after MARK."""
    import torch

    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    torch.set_num_threads(args.threads)
    raw = _recipe(args, args.row, args.seed)
    cache_s, teacher_texts = 0.0, 0
    if args.row.endswith("_cached"):  # build the span cache first; its time comes out of the training budget
        from potstill.train.cache_processes import capture_cache

        target = Path(args.out).resolve() / "caches" / f"{args.row}-seed{args.seed}"
        manifest = capture_cache(validate_recipe(raw), target, k=args.cache_k, temperature=1.0, batch_size=8,
                                 overwrite=True)
        cache_s = manifest["seconds"]
        raw["teacher"]["cache"] = str(target)
    if args.row == "sft_teacher":  # the teacher's text first; its generation comes out of the budget
        records, tok_dir, cache_s, teacher_texts = _teacher_text(args, raw, args.seed)
        raw["data"]["train"] = {"path": str(records)}
        if tok_dir is not None:
            raw["student"]["tokenizer"] = str(tok_dir)
    if cache_s:
        raw["trainer"]["max_seconds"] = max(1.0, args.budget_seconds - cache_s)
    summary = run_recipe(validate_recipe(raw), overwrite=True)
    teacher, before, after = summary["table"]
    print(MARK + json.dumps({"row": args.row, "seed": args.seed, "steps": summary["steps"],
                             "train_s": summary["train_seconds"], "cache_s": cache_s, "teacher_texts": teacher_texts,
                             "before": before, "after": after, "teacher": teacher}), flush=True)


def _launch(args: argparse.Namespace, row: str, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--row", row, "--seed", str(seed), "--out", args.out,
           "--budget-seconds", str(args.budget_seconds), "--records", str(args.records), "--eval-records",
           str(args.eval_records), "--threads", str(args.threads), "--max-steps", str(args.max_steps),
           "--cache-k", str(args.cache_k), "--eval-every", str(args.eval_every),
           "--teacher-text-share", str(args.teacher_text_share), "--pretrain-seconds", str(args.pretrain_seconds)] + (
               ["--pretrained", args.pretrained] if args.pretrained else []) + (
               ["--teacher-text-free"] if args.teacher_text_free else []) + (
               ["--matched-weight", str(args.matched_weight)] if args.matched_weight is not None else []) + (
               ["--quick"] if args.quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{row} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def _mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one line per row (mean ± std over seeds), the untrained student and the teacher."""
    lines = ["| row | seeds | steps | cache / text s | train s | bits/byte held-out | ppl (own tokens) |",
             "|---|---|---|---|---|---|---|"]
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    for row in [r for r in ROWS if r in by_row]:
        rs = by_row[row]
        lines.append(f"| {row} | {len(rs)} | {'/'.join(str(r['steps']) for r in rs)} | "
                     f"{statistics.mean(r.get('cache_s', 0.0) for r in rs):.0f} | "
                     f"{statistics.mean(r['train_s'] for r in rs):.0f} | "
                     f"{_mean([r['after']['bits_per_byte'] for r in rs])} | "
                     f"{statistics.mean(r['after']['perplexity'] for r in rs):.1f} |")
    first = results[0]
    before = {r["seed"]: r["before"] for r in results}  # the same initial student in every row of a seed
    lines.append(f"| student before training | {len(before)} | 0 | | | "
                 f"{_mean([b['bits_per_byte'] for b in before.values()])} | "
                 f"{statistics.mean(b['perplexity'] for b in before.values()):.1f} |")
    lines.append(f"| teacher (SmolLM2-135M) | | | | | {first['teacher']['bits_per_byte']:.4f} | "
                 f"{first['teacher']['perplexity']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-seconds", type=float, default=240.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS[:3]))
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--eval-records", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=0, help="subprocesses at a time (0: all rows of a seed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="also stop after this many steps (0: the "
                        "recipe's 2,000): the equal-steps control")
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (curves in each "
                        "run's metrics.jsonl; the time counts against the budget)")
    parser.add_argument("--cache-k", type=int, default=64, help="top-k of the *_cached rows' span cache")
    parser.add_argument("--matched-weight", type=float, help="gold rows: the weight w of the matched-token JSD "
                        "(default: GOLD's M / V_t)")
    parser.add_argument("--teacher-text-share", type=float, default=0.5, help="sft_teacher: the share of the "
                        "budget spent generating teacher text (generation stops at the first batch past it)")
    parser.add_argument("--teacher-text-free", action="store_true", help="sft_teacher: generate for every record, "
                        "outside the budget (a generous control)")
    parser.add_argument("--pretrain-seconds", type=float, default=0.0, help="start every row from a student "
                        "fine-tuned this long on non-BBC general text (built once in <out>/pretrained)")
    parser.add_argument("--pretrained", help="where the pretrained student is kept (default <out>/pretrained)")
    parser.add_argument("--out", default="runs/cross_tokenizer")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.budget_seconds, args.records, args.eval_records = min(args.budget_seconds, 5.0), 16, 4
    if args.worker:
        _worker(args)
        return
    from potstill.io import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    key = {"budget_seconds": args.budget_seconds, "records": args.records, "eval_records": args.eval_records,
           "quick": args.quick, "max_steps": args.max_steps, "cache_k": args.cache_k, "eval_every": args.eval_every,
           "matched_weight": args.matched_weight, "teacher_text_share": args.teacher_text_share,
           "teacher_text_free": args.teacher_text_free, "pretrain_seconds": args.pretrain_seconds,
           "pretrained": str(_pretrained_dir(args)) if args.pretrain_seconds else None}
    saved = json.loads(store.read_text()) if store.exists() else {}
    results = saved.get("results", []) if saved.get("key") == key else []
    if args.pretrain_seconds and not (_pretrained_dir(args) / "done.json").exists():
        pretrained = _pretrain(args)
        print(f"pretrained student: {pretrained['steps']} steps on {pretrained['passages']} passages, bits/byte "
              f"{pretrained['after']['bits_per_byte']:.4f}", flush=True)
    done = {(r["row"], r["seed"]) for r in results}
    todo = [(row, seed) for seed in args.seeds for row in args.rows if (row, seed) not in done]
    with ThreadPoolExecutor(max_workers=args.jobs or len(args.rows)) as pool:
        for result in pool.map(lambda rs: _launch(args, *rs), todo):
            results.append(result)
            atomic_write_text(store, json.dumps({"key": key, "results": results}, indent=1))
            texts = f" on {result['teacher_texts']} teacher texts" if result.get("teacher_texts") else ""
            print(f"{result['row']} seed {result['seed']}: {result['steps']} steps{texts}, bits/byte "
                  f"{result['after']['bits_per_byte']:.4f}", flush=True)
    wanted = [r for r in results if r["row"] in args.rows and r["seed"] in args.seeds]
    print(table(wanted))


if __name__ == "__main__":
    main()
