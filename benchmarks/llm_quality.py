"""LLM distillation at equal wall-clock budget (issue #16 §2): potstill's objectives, TRL's GKDTrainer and plain SFT.

Teacher: SmolLM2-135M-Instruct (`builtin:smollm2`, 30 layers). Student: the 7-layer slice of
`recipes/smollm2-slice.yaml` (teacher layers 0-3 and 27-29, copied; the same init for every row and seed).
Data: the first `--records` BBC News training articles (`builtin:bbc`, train split) of at least 128 tokens, each
cut into a prompt (its first 32 tokens) and a completion (the next 95), decoded back to text and written as
`prompt_completion` JSONL (no EOS added: the completion is a cut); the loss counts completion tokens only. Every
row: batch 8, AdamW lr 1e-3 (β 0.9/0.999, weight decay 0.01 off biases and norms), 3 warm-up steps then a
constant rate (the step count is not known in advance), gradient clipping 1.0, float32, the budget
`--budget-seconds` of training wall time, `--threads` torch threads.

Rows (potstill rows run `potstill.train.Distiller` with `trainer.max_seconds`; KD losses at T = 1):
- forward_kl, reverse_kl, generalized_jsd (β 0.5), taid (its defaults), sinkhorn_fkl (forward_kl + sinkhorn at
  the official weight 1e-3, T 2, blocks of 32 token rows: one OT problem over 1,000 rows × 49k ids is too slow);
- on_policy: forward_kl with `generation.lmbda: 0.5` (half the micro-batches are the student's own completions of
  the prompt, 95 new tokens sampled at temperature 0.9, scored by the teacher);
- seq_kd: cross-entropy on the teacher's sampled completions of the prompts (`generation.seq_kd`, temperature
  0.9, 95 tokens; Kim & Rush's sequence-level KD, no logit term); their generation happens once, before
  training, and is reported as set-up time, outside the budget;
- topk_cache: forward_kl against the teacher's top-64 log-probs read from a `potstill cache` folder (sparse: the
  64 ids plus one tail bucket) instead of a live teacher; building the cache (one teacher pass over the data)
  is timed separately and reported, outside the budget;
- trl_gkd, trl_gkd_on_policy: TRL's `GKDTrainer` with `beta=0` (TRL's forward KL(teacher ‖ student), the same
  loss as potstill's forward_kl: TRL's default β 0.5 would be JSD), `lmbda` 0 and 0.5, `temperature` 0.9 and
  `max_new_tokens` 95 for its samples; the optimizer and schedule are built here exactly as potstill builds
  them (`optimizers=(AdamW, LambdaLR)`), the data are potstill's tokenised records in potstill's epoch order;
- sft: potstill with no objective and `trainer.hard_label_weight: 1` (cross-entropy on the completion tokens).

Held-out score (`_llm_common.heldout_scores`, same for every row): 16 blocks of 128 tokens from each of two
non-BBC sources (Wikipedia and Lee background sentences, general corpus test split): the student's perplexity,
KL(teacher ‖ student) per token and top-1 agreement with the teacher; the teacher's perplexity beside them.

Each row and seed runs in its own subprocess (`--jobs` at a time); `<out>/results.json` (atomic) keeps every
finished row, and a rerun with the same budget and mode reuses them. `--quick`: a tiny random teacher (3 layers ×
32, SmolLM2's tokenizer), 16 records, a 1 s budget, all rows in one process: a smoke test, numbers mean nothing.

Measured (seed 0, 240 s per row, 64 records, 1 thread, load 8-15 on 2 shared cores; docs/results.md): 3-17
steps per row. Side by side, forward_kl and trl_gkd made the same 8 steps and the same held-out perplexity
(1,899.6 vs 1,899.7; teacher 66.4); topk_cache reached 1,771.8 in 9 steps after a 356 s cache build.

Usage: python benchmarks/llm_quality.py [--budget-seconds 180] [--seeds 0 1 2] [--only forward_kl trl_gkd]
       [--jobs 2] [--threads 1] [--out runs/llm_quality] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = ("forward_kl", "reverse_kl", "generalized_jsd", "taid", "sinkhorn_fkl", "on_policy", "seq_kd", "topk_cache",
        "trl_gkd", "trl_gkd_on_policy", "sft")
TRL_ROWS = {"trl_gkd": 0.0, "trl_gkd_on_policy": 0.5}
LAYERS = [0, 1, 2, 3, 27, 28, 29]
SLOW_START = ("seq_kd", "topk_cache")  # teacher generation / cache before training: launched first
TOP_K = 64


def _shape(args: argparse.Namespace) -> dict[str, int]:
    if args.quick:
        return {"prompt": 8, "max_length": 32, "batch": 4, "blocks": 1, "block_len": 32, "records": 16}
    return {"prompt": 32, "max_length": 128, "batch": 8, "blocks": 16, "block_len": 128, "records": args.records}


# ---------------------------------------------------------------------------------------------- data and recipe




def _objectives(row: str, quick: bool) -> list[dict[str, Any]]:
    fkl = {"name": "forward_kl", "params": {"temperature": 1.0, "chunk_size": 256}}
    if row in ("forward_kl", "on_policy", "topk_cache", "trl_gkd", "trl_gkd_on_policy"):
        return [fkl]
    if row == "reverse_kl":
        return [{"name": "reverse_kl", "params": {"temperature": 1.0, "chunk_size": 256}}]
    if row == "generalized_jsd":
        return [{"name": "generalized_jsd", "params": {"beta": 0.5, "temperature": 1.0, "chunk_size": 256}}]
    if row == "taid":
        return [{"name": "taid"}]
    if row == "sinkhorn_fkl":
        return [fkl, {"name": "sinkhorn", "weight": 1e-3, "params": {"block_size": 8 if quick else 32}}]
    return []  # seq_kd, sft: cross-entropy only


def _recipe(args: argparse.Namespace, row: str, seed: int, work: Path) -> dict[str, Any]:
    from _llm_common import tiny_llama_teacher

    shape = _shape(args)
    new_tokens = shape["max_length"] - shape["prompt"] - 1
    raw: dict[str, Any] = {
        "name": f"{row}-seed{seed}", "output_dir": str(work / "runs"), "task": "causal_lm", "seed": seed,
        "teacher": {"path": str(tiny_llama_teacher(work / "tiny-teacher", layers=3, max_positions=64))
                    if args.quick else "builtin:smollm2"},
        "student": {"init": "layers_from_teacher", "layers": [0, 2] if args.quick else LAYERS},
        "data": {"train": {"path": str(work / "train.jsonl")}, "format": "prompt_completion", "add_eos": False,
                 "max_length": shape["max_length"], "packing": False},
        "objectives": _objectives(row, args.quick),
        "trainer": {"max_steps": 1_000_000, "max_seconds": args.budget_seconds, "batch_size": shape["batch"],
                    "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 3, "schedule": "constant",
                    "max_grad_norm": 1.0, "num_threads": args.threads, "log_every": 1, "save_every": 0},
        "eval": {"every": 0, "compare_before": False, "throughput": False},
        "generation": {"max_new_tokens": new_tokens, "temperature": 0.9},
    }
    if row in ("seq_kd", "sft"):
        raw["trainer"]["hard_label_weight"] = 1.0
    if row == "seq_kd":
        raw["generation"]["seq_kd"] = True
    if row == "on_policy":
        raw["generation"]["lmbda"] = 0.5
    if row == "topk_cache":
        raw["teacher"]["cache"] = str(work / f"topk{TOP_K}-cache")
    return raw


# ---------------------------------------------------------------------------------------------- worker side
def _build_cache(args: argparse.Namespace, raw: dict[str, Any], work: Path) -> float:
    """`potstill cache` over the training data (k = 64), once; its wall time (0 when it was already there)."""
    cache = Path(raw["teacher"]["cache"])
    if (cache / "meta.json").exists() or (cache.exists() and any(cache.iterdir())):
        return 0.0
    recipe = work / "topk_cache.yaml"
    recipe.write_text(json.dumps(raw))  # JSON is YAML
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "potstill", "cache", str(recipe), "--k", str(TOP_K), "--out", str(cache),
                    "--batch-size", str(_shape(args)["batch"])], check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def _run_potstill(args: argparse.Namespace, row: str, seed: int, work: Path) -> dict[str, Any]:
    from potstill.config import validate_recipe
    from potstill.tasks import build_task
    from potstill.train import Distiller, build_objectives
    from potstill.train.callbacks import Callback

    raw = _recipe(args, row, seed, work)
    out: dict[str, Any] = {}
    if row == "topk_cache":
        out["cache_seconds"] = _build_cache(args, raw, work)
    recipe = validate_recipe(raw)
    task = build_task(recipe, run_dir=recipe.run_dir)

    class Tally(Callback):
        def __init__(self) -> None:
            self.started, self.tokens = time.perf_counter(), 0.0

        def on_fit_start(self, state) -> None:
            out["setup_seconds"] = time.perf_counter() - self.started

        def on_step_end(self, state, result) -> None:
            self.tokens += result.rows

    tally = Tally()
    distiller = Distiller(task, build_objectives(recipe, task), recipe.trainer, run_dir=recipe.run_dir, seed=seed,
                          eval_config=recipe.eval, callbacks=[tally])
    summary = distiller.fit(overwrite=True)
    student = distiller.accelerator.unwrap_model(distiller.state.student)
    out.update(steps=summary["steps"], train_seconds=summary["train_seconds"], tokens=tally.tokens)
    return {**out, "scores": _score(args, student, task.teacher, task.tokenizer)}


def _run_trl(args: argparse.Namespace, row: str, seed: int, work: Path) -> dict[str, Any]:
    """TRL GKDTrainer on the records, student init, optimizer and schedule of the potstill rows."""
    import torch
    from _llm_common import gkd_config_kwargs, trl_gkd_inputs, trl_optimizer, trl_wall_clock
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from potstill.config import validate_recipe
    from potstill.tasks import build_task

    started = time.perf_counter()
    raw = _recipe(args, row, seed, work)
    recipe = validate_recipe(raw)
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    torch.set_num_threads(args.threads)
    shape = _shape(args)
    batch = shape["batch"]
    dataset, collate = trl_gkd_inputs(task, seed=seed, batch_size=batch)  # more epochs than any budget here uses
    student, cfg = task.student, recipe.trainer
    optimizer, scheduler = trl_optimizer(student, cfg, horizon=1)  # constant after warm-up
    clock = trl_wall_clock(args.budget_seconds)
    out_dir = tempfile.mkdtemp(prefix="llm_quality_trl_", dir=work)
    config = GKDConfig(**gkd_config_kwargs(out_dir=out_dir, seed=seed, max_length=shape["max_length"]),
                       lmbda=TRL_ROWS[row], beta=0.0, seq_kd=False, temperature=0.9,
                       max_new_tokens=shape["max_length"] - shape["prompt"] - 1, max_steps=len(dataset) // batch,
                       per_device_train_batch_size=batch, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
                       max_grad_norm=cfg.max_grad_norm)
    trainer = GKDTrainer(model=student, teacher_model=task.teacher, args=config, train_dataset=dataset,
                         data_collator=collate, processing_class=task.tokenizer, callbacks=[clock],
                         optimizers=(optimizer, scheduler))
    tokens = {"n": 0}
    step_fn = trainer.training_step

    def training_step(model, inputs, *a, **k):  # counts the tokens the loss saw (after any on-policy sampling)
        loss = step_fn(model, inputs, *a, **k)
        tokens["n"] += int((inputs["labels"][:, 1:] != -100).sum())
        return loss

    trainer.training_step = training_step
    setup = time.perf_counter() - started
    trainer.train()
    student = trainer.accelerator.unwrap_model(trainer.model)
    return {"setup_seconds": setup, "steps": clock.steps, "train_seconds": clock.seconds, "tokens": tokens["n"],
            "scores": _score(args, student, task.teacher, task.tokenizer)}


def _score(args: argparse.Namespace, student: Any, teacher: Any, tokenizer: Any) -> dict[str, float]:
    from _llm_common import heldout_blocks, heldout_scores

    shape = _shape(args)
    blocks = heldout_blocks(tokenizer, blocks_per_source=shape["blocks"], block_len=shape["block_len"])
    return heldout_scores(student, teacher.eval(), blocks)


def _worker(args: argparse.Namespace) -> None:
    import torch
    from _llm_common import serve_items, write_bbc_prompt_records

    torch.set_num_threads(args.threads)
    work = Path(args.out) / "work"
    write_bbc_prompt_records(work / "train.jsonl", _shape(args))

    def run(row: str, seed: int) -> dict[str, Any]:
        result = (_run_trl if row in TRL_ROWS else _run_potstill)(args, row, seed, work)
        return {**result, "threads": torch.get_num_threads()}

    serve_items(args.worker, run)


# ---------------------------------------------------------------------------------------------- parent side
def table(results: dict[str, Any], rows: list[str]) -> str:
    """The Markdown table of `results` (mean ± sample std over seeds where there are several)."""
    from _llm_common import fmt_mean_std

    runs: dict[str, list[dict[str, Any]]] = {}
    for run in results["runs"].values():
        runs.setdefault(run["row"], []).append(run)
    head = ("| row | seeds | steps | tokens | train s | set-up s | ppl (all) | KL (all) | top-1 (all) | ppl wiki | "
            "ppl lee |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    teacher = None
    for row in rows:
        got = runs.get(row)
        if not got:
            continue
        teacher = got[0]["scores"]
        extra = f" (+ cache {got[0]['cache_seconds']:.0f} s)" if got[0].get("cache_seconds") else ""

        def col(key: str, digits: int, got=got) -> str:
            return fmt_mean_std([r["scores"][key] for r in got], digits)

        lines.append(f"| {row} | {len(got)} | {fmt_mean_std([r['steps'] for r in got], 0)} | "
                     f"{fmt_mean_std([r['tokens'] for r in got], 0)} | "
                     f"{fmt_mean_std([r['train_seconds'] for r in got], 0)} | "
                     f"{fmt_mean_std([r['setup_seconds'] for r in got], 0)}{extra} | {col('all/ppl', 1)} | "
                     f"{col('all/kl', 3)} | {col('all/top1', 3)} | {col('wikipedia/ppl', 1)} | "
                     f"{col('lee-background/ppl', 1)} |")
    if teacher is not None:
        lines.append(f"| teacher | | | | | | {teacher['all/teacher_ppl']:.1f} | 0 | 1 | "
                     f"{teacher['wikipedia/teacher_ppl']:.1f} | {teacher['lee-background/teacher_ppl']:.1f} |")
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    from _llm_common import earlier_results, run_worker_pool

    from potstill.io import atomic_write_json

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    settings = {"budget_seconds": args.budget_seconds, "quick": args.quick, "records": args.records,
                "threads": args.threads}
    results = earlier_results(path, settings)
    rows = [r for r in ROWS if r in (args.only or ROWS)]
    todo = [f"{row}:{seed}" for seed in args.seeds for row in rows if f"{row}:{seed}" not in results["runs"]]
    todo.sort(key=lambda item: item.split(":")[0] not in SLOW_START)  # long set-ups first, stable otherwise
    print(f"llm_quality: budget {args.budget_seconds} s per row, {args.threads} thread(s), {args.jobs} job(s); "
          f"{len(todo)} run(s) to do, {sum(1 for s in args.seeds for r in rows if f'{r}:{s}' in results['runs'])} "
          f"reused; load {os.getloadavg()[0]:.1f}", flush=True)
    batches = ([todo] if todo else []) if args.quick else [[item] for item in todo]

    def command(items: list[str]) -> list[str]:
        return [sys.executable, __file__, "--worker", ",".join(items), "--out", args.out, "--threads",
                str(args.threads), "--budget-seconds", str(args.budget_seconds), "--records", str(args.records)] + \
               (["--quick"] if args.quick else [])

    def on_result(result: dict[str, Any]) -> None:
        key = f"{result['row']}:{result['seed']}"
        results["runs"][key] = result
        s = result["scores"]
        print(f"{key}: {result['steps']} steps in {result['train_seconds']:.0f} s, ppl {s['all/ppl']:.1f}, "
              f"KL {s['all/kl']:.3f}, top-1 {s['all/top1']:.3f} (teacher ppl {s['all/teacher_ppl']:.1f}); "
              f"load {result['load'][0]:.1f}", flush=True)

    failed = run_worker_pool(batches, command, jobs=args.jobs, threads=args.threads, log_dir=out / "logs",
                             log_suffix="-quick" if args.quick else "", on_result=on_result,
                             after_worker=lambda: atomic_write_json(path, results))
    print()
    print(table(results, rows))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from _llm_common import parse_study_args, study_parser

    parser = study_parser(__doc__.split("\n\n")[0], ROWS, budget_seconds=180.0, threads=2, records=160,
                          out="runs/llm_quality", quick_seconds=1.0, only_help="run these rows only")
    args = parse_study_args(parser, argv)
    if args.worker:
        _worker(args)
        return 0
    return _main(args)


if __name__ == "__main__":
    sys.exit(main())
