"""MGSR vs plain on-policy distillation at equal wall-clock time (issue #21 item 3).

Claim under test (Liu et al. 2024, "Multi-Granularity Semantic Revision for Large Language Model
Distillation"): adding sequence correction and re-generation (SCRG), the DAC-KL loss and span correlation
to on-policy distillation gives a better student than plain on-policy GKD.

Teacher: SmolLM2-135M-Instruct (`builtin:smollm2`). Student: the 7-layer slice of `recipes/smollm2-slice.yaml`
(teacher layers 0-3 and 27-29, copied; the same init for every row and seed). Data: the first `--records` BBC
News training articles of at least `max_length` tokens, each cut into a prompt (its first 32 tokens) and a
completion (the next 47), as `prompt_completion` JSONL. Both rows are fully on-policy (`generation.lmbda: 1`:
every micro-batch is the student's own completion of the prompt, 47 new tokens at temperature 0.9, scored by the
teacher). Batch 8, AdamW lr 1e-3, 3 warm-up steps then constant, clipping 1.0, float32, `--budget-seconds` of
training wall time per run (`trainer.max_seconds`): the rows get the same time, not the same steps, so SCRG's
extra teacher pass and re-sampling are paid for in steps.

Rows:
- on_policy: forward_kl (GKD with β = 0) on the student's samples;
- mgsr: dac_kl (its defaults) + 1.0 · span_correlation (spans of 8 tokens) on samples revised by SCRG
  (`mgsr: {scrg: true}`); the paper also adds an SFT term, left out here as in the on_policy row (on-policy
  targets are the student's own tokens);
- mgsr_no_scrg, dac_kl_only: ablations (the losses without SCRG; DAC-KL alone).

Held-out score: `potstill.eval.lm_suite.run_lm_suite` on text that no row trains on (Lee news, 20 Newsgroups,
fortunes): 4 blocks of 128 tokens per source (perplexity, KL(teacher ‖ student) per token, top-1 agreement)
and 8 prompts per source (24 prompt tokens, 32 greedy new tokens: ROUGE-L F1 against the teacher's greedy
continuation and against the real text).

Each row and seed runs in its own subprocess (`--jobs` at a time); `<out>/results.json` keeps the finished
runs, and a rerun with the same settings reuses them. `--quick`: a tiny random teacher, 16 records, a 2 s
budget: a smoke test, the numbers mean nothing.

`--steps N` trains every run N steps instead (an equal-steps check of the losses' cost).

Usage: python benchmarks/mgsr.py [--budget-seconds 240] [--seeds 0 1 2] [--only on_policy mgsr] [--jobs 2]
       [--threads 1] [--steps 0] [--out runs/mgsr] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = ("on_policy", "mgsr", "mgsr_no_scrg", "dac_kl_only")
LAYERS = [0, 1, 2, 3, 27, 28, 29]


def _shape(args: argparse.Namespace) -> dict[str, int]:
    if args.quick:
        return {"prompt": 8, "max_length": 24, "batch": 4, "records": 16, "blocks": 1, "prompts": 2}
    return {"prompt": 32, "max_length": 80, "batch": 8, "records": args.records, "blocks": 4, "prompts": 8}




def _objectives(row: str) -> list[dict[str, Any]]:
    if row == "on_policy":
        return [{"name": "forward_kl", "params": {"temperature": 1.0, "chunk_size": 256}}]
    dac = {"name": "dac_kl", "params": {"chunk_size": 256}}
    if row == "dac_kl_only":
        return [dac]
    return [dac, {"name": "span_correlation", "weight": 1.0, "params": {"span_length": 8}}]


def _recipe(args: argparse.Namespace, row: str, seed: int, work: Path) -> dict[str, Any]:
    from _llm_common import tiny_llama_teacher

    shape = _shape(args)
    raw: dict[str, Any] = {
        "name": f"{row}-seed{seed}", "output_dir": str(work / "runs"), "task": "causal_lm", "seed": seed,
        "teacher": {"path": str(tiny_llama_teacher(work / "tiny-teacher", layers=3, max_positions=64))
                    if args.quick else "builtin:smollm2"},
        "student": {"init": "layers_from_teacher", "layers": [0, 2] if args.quick else LAYERS},
        "data": {"train": {"path": str(work / "train.jsonl")}, "format": "prompt_completion", "add_eos": False,
                 "max_length": shape["max_length"], "packing": False},
        "objectives": _objectives(row),
        "trainer": {"max_steps": args.steps or 1_000_000, "max_seconds": None if args.steps else args.budget_seconds,
                    "batch_size": shape["batch"],
                    "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 3, "schedule": "constant",
                    "max_grad_norm": 1.0, "num_threads": args.threads, "log_every": 1, "save_every": 0},
        "eval": {"every": 0, "compare_before": False, "throughput": False},
        "generation": {"lmbda": 1.0, "max_new_tokens": shape["max_length"] - shape["prompt"] - 1,
                       "temperature": 0.9},
    }
    if row == "mgsr":
        raw["mgsr"] = {"scrg": True}
    return raw


def _run(args: argparse.Namespace, row: str, seed: int, work: Path) -> dict[str, Any]:
    from potstill.config import validate_recipe
    from potstill.eval.lm_suite import run_lm_suite
    from potstill.tasks import build_task
    from potstill.train import Distiller, build_objectives

    recipe = validate_recipe(_recipe(args, row, seed, work))
    task = build_task(recipe, run_dir=recipe.run_dir)
    distiller = Distiller(task, build_objectives(recipe, task), recipe.trainer, run_dir=recipe.run_dir, seed=seed,
                          eval_config=recipe.eval)
    summary = distiller.fit(overwrite=True)
    student = distiller.accelerator.unwrap_model(distiller.state.student)
    shape = _shape(args)
    started = time.perf_counter()
    suite = run_lm_suite(student, task.teacher, task.tokenizer, blocks_per_source=shape["blocks"],
                         prompts_per_source=shape["prompts"], choice_items=4, progress=False)
    scores = {}
    for source, values in suite["student"]["sources"].items():
        scores.update({f"{source}/{k}": v for k, v in values.items()})
        scores[f"{source}/teacher_ppl"] = suite["teacher"]["sources"][source]["perplexity"]
    for key in ("perplexity", "kl_to_teacher", "top1_agreement"):
        scores[f"mean/{key}"] = statistics.mean(suite["student"]["sources"][s][key] for s in suite["sources"])
    scores["rougeL_vs_teacher"] = suite["student"]["generation"]["rougeL_vs_teacher"]
    scores["rougeL_vs_reference"] = suite["student"]["generation"]["rougeL_vs_reference"]
    scores["teacher_rougeL_vs_reference"] = suite["teacher"]["generation"]["rougeL_vs_reference"]
    return {"steps": summary["steps"], "train_seconds": summary["train_seconds"],
            "score_seconds": time.perf_counter() - started, "scores": scores}


def _worker(args: argparse.Namespace) -> None:
    import torch
    from _llm_common import serve_items, write_bbc_prompt_records

    torch.set_num_threads(args.threads)
    work = Path(args.out) / "work"
    write_bbc_prompt_records(work / "train.jsonl", _shape(args))
    serve_items(args.worker, lambda row, seed: _run(args, row, seed, work))



def table(results: dict[str, Any], rows: list[str]) -> str:
    """The Markdown table of `results` (mean ± sample std over seeds where there are several)."""
    from _llm_common import fmt_mean_std

    runs: dict[str, list[dict[str, Any]]] = {}
    for run in results["runs"].values():
        runs.setdefault(run["row"], []).append(run)
    lines = ["| row | seeds | steps | train s | ppl (mean of 3) | KL to teacher | top-1 agree | ROUGE-L vs teacher | "
             "ROUGE-L vs text |", "|---|---|---|---|---|---|---|---|---|"]
    teacher = None
    for row in rows:
        got = runs.get(row)
        if not got:
            continue
        teacher = got[0]["scores"]

        def col(key: str, digits: int, got=got) -> str:
            return fmt_mean_std([r["scores"][key] for r in got], digits)

        lines.append(f"| {row} | {len(got)} | {fmt_mean_std([r['steps'] for r in got], 1)} | "
                     f"{fmt_mean_std([r['train_seconds'] for r in got], 0)} | {col('mean/perplexity', 1)} | "
                     f"{col('mean/kl_to_teacher', 3)} | {col('mean/top1_agreement', 3)} | "
                     f"{col('rougeL_vs_teacher', 3)} | {col('rougeL_vs_reference', 3)} |")
    if teacher is not None:
        ppl = statistics.mean(v for k, v in teacher.items() if k.endswith("/teacher_ppl"))
        lines.append(f"| teacher | | | | {ppl:.1f} | 0 | 1 | 1 | {teacher['teacher_rougeL_vs_reference']:.3f} |")
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    from _llm_common import earlier_results, run_worker_pool

    from potstill.io import atomic_write_json

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    settings = {"budget_seconds": args.budget_seconds, "quick": args.quick, "records": args.records,
                "threads": args.threads, "steps": args.steps}
    results = earlier_results(path, settings)
    rows = [r for r in ROWS if r in (args.only or ROWS[:2])]
    todo = [f"{row}:{seed}" for seed in args.seeds for row in rows if f"{row}:{seed}" not in results["runs"]]
    print(f"mgsr: budget {args.budget_seconds} s per run, {args.threads} thread(s), {args.jobs} job(s); "
          f"{len(todo)} run(s) to do; load {os.getloadavg()[0]:.1f}", flush=True)

    def command(items: list[str]) -> list[str]:
        return [sys.executable, __file__, "--worker", ",".join(items), "--out", args.out, "--threads",
                str(args.threads), "--budget-seconds", str(args.budget_seconds), "--records", str(args.records),
                "--steps", str(args.steps)] + (["--quick"] if args.quick else [])

    def on_result(result: dict[str, Any]) -> None:
        item = f"{result['row']}:{result['seed']}"
        results["runs"][item] = result
        s = result["scores"]
        print(f"{item}: {result['steps']} steps in {result['train_seconds']:.0f} s, ppl "
              f"{s['mean/perplexity']:.1f}, KL {s['mean/kl_to_teacher']:.3f}, ROUGE-L vs teacher "
              f"{s['rougeL_vs_teacher']:.3f}; load {result['load'][0]:.1f}", flush=True)

    failed = run_worker_pool([[item] for item in todo], command, jobs=args.jobs, threads=args.threads,
                             log_dir=out / "logs", log_suffix="-quick" if args.quick else "", on_result=on_result,
                             after_worker=lambda: atomic_write_json(path, results))
    print()
    print(table(results, rows))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from _llm_common import parse_study_args, study_parser

    parser = study_parser(__doc__.split("\n\n")[0], ROWS, budget_seconds=240.0, threads=1, records=128,
                          out="runs/mgsr", quick_seconds=2.0, only_help="rows to run (default: on_policy and mgsr)")
    parser.add_argument("--steps", type=int, default=0, help="train this many steps instead (equal steps, not "
                        "equal time; 0 = use the time budget)")
    args = parse_study_args(parser, argv)
    if args.worker:
        _worker(args)
        return 0
    return _main(args)


if __name__ == "__main__":
    sys.exit(main())
