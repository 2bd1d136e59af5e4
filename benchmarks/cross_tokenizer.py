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
- uld_cached / gold_cached: uld / gold read from a top-k cache of the teacher's span rows (`potstill cache`, k =
  `--cache-k`, built by the row itself) instead of running the teacher each step. The cache's build time counts
  against the row's budget: it trains for `--budget-seconds` minus the build.

Held-out score: bits per byte (summed next-token NLL / ln 2 / UTF-8 bytes) on `--eval-records` BBC validation
articles, cut where both tokenizations fit 128 tokens, so teacher and students score the same bytes; also each
model's perplexity on its own tokens (not comparable across tokenizers). The teacher's bits per byte is the floor.

Each (row, seed) runs in its own subprocess, `--jobs` at a time (default: all rows of a seed side by side, so that
they share the machine alike); `<out>/results.json` keeps every finished row and a rerun reuses them.
`--quick`: a tiny random teacher with SmolLM2's tokenizer, 16 records, a 5 s budget: a smoke test, numbers mean
nothing.

`--max-steps N` also stops every row after N optimizer steps: with `--rows sft` and the KD rows' step count it is
the equal-steps control (does the teacher's signal help per step?). Use another `--out` for it.

Usage: python benchmarks/cross_tokenizer.py [--budget-seconds 240] [--seeds 0 1 2] [--rows uld gold sft]
       [--records 256] [--eval-records 16] [--jobs 3] [--threads 1] [--max-steps 0] [--cache-k 64]
       [--matched-weight W] [--eval-every 0]
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

ROWS = ("uld", "gold", "sft", "uld_only", "uld_cached", "gold_cached")
RECIPE = Path(__file__).resolve().parents[1] / "src" / "potstill" / "recipes" / "smollm2-cross-tokenizer.yaml"
MARK = "@@ROW "


def _recipe(args: argparse.Namespace, row: str, seed: int) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    raw["name"] = f"{row}-seed{seed}"
    raw["output_dir"] = str(Path(args.out).resolve() / "runs")
    raw["seed"] = seed
    raw["objectives"] = {"uld": [{"name": "uld"}], "gold": [{"name": "gold"}], "sft": [],
                         "uld_only": [{"name": "uld"}]}[row.removesuffix("_cached")]
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
    if args.quick:
        from _llm_common import tiny_llama_teacher

        raw["teacher"]["path"] = str(tiny_llama_teacher(Path(args.out).resolve() / "tiny-teacher", layers=2,
                                                        max_positions=256))
        raw["student"]["tokenizer"] = "bpe:512"
        raw["student"]["config"] = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                    "num_attention_heads": 2, "num_key_value_heads": 2}
        raw["data"]["max_length"] = 32
        raw["trainer"]["batch_size"] = 4
    return raw


def _worker(args: argparse.Namespace) -> None:
    """One (row, seed): run it and print its numbers after MARK."""
    import torch

    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    torch.set_num_threads(args.threads)
    raw = _recipe(args, args.row, args.seed)
    cache_s = 0.0
    if args.row.endswith("_cached"):  # build the span cache first; its time comes out of the training budget
        from potstill.train.cache_processes import capture_cache

        target = Path(args.out).resolve() / "caches" / f"{args.row}-seed{args.seed}"
        manifest = capture_cache(validate_recipe(raw), target, k=args.cache_k, temperature=1.0, batch_size=8,
                                 overwrite=True)
        cache_s = manifest["seconds"]
        raw["teacher"]["cache"] = str(target)
        raw["trainer"]["max_seconds"] = max(1.0, args.budget_seconds - cache_s)
    summary = run_recipe(validate_recipe(raw), overwrite=True)
    teacher, before, after = summary["table"]
    print(MARK + json.dumps({"row": args.row, "seed": args.seed, "steps": summary["steps"],
                             "train_s": summary["train_seconds"], "cache_s": cache_s, "before": before,
                             "after": after, "teacher": teacher}), flush=True)


def _launch(args: argparse.Namespace, row: str, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--row", row, "--seed", str(seed), "--out", args.out,
           "--budget-seconds", str(args.budget_seconds), "--records", str(args.records), "--eval-records",
           str(args.eval_records), "--threads", str(args.threads), "--max-steps", str(args.max_steps),
           "--cache-k", str(args.cache_k), "--eval-every", str(args.eval_every)] + (
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
    lines = ["| row | seeds | steps | cache s | train s | bits/byte held-out | ppl (own tokens) |",
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
           "matched_weight": args.matched_weight}
    saved = json.loads(store.read_text()) if store.exists() else {}
    results = saved.get("results", []) if saved.get("key") == key else []
    done = {(r["row"], r["seed"]) for r in results}
    todo = [(row, seed) for seed in args.seeds for row in args.rows if (row, seed) not in done]
    with ThreadPoolExecutor(max_workers=args.jobs or len(args.rows)) as pool:
        for result in pool.map(lambda rs: _launch(args, *rs), todo):
            results.append(result)
            atomic_write_text(store, json.dumps({"key": key, "results": results}, indent=1))
            print(f"{result['row']} seed {result['seed']}: {result['steps']} steps, bits/byte "
                  f"{result['after']['bits_per_byte']:.4f}", flush=True)
    wanted = [r for r in results if r["row"] in args.rows and r["seed"] in args.seeds]
    print(table(wanted))


if __name__ == "__main__":
    main()
