"""Teacher top-k cache: bytes per token, and optimizer-step time with a cached teacher vs a live teacher vs plain
student fine-tuning (issue #3 §4; targets: ≤ 300 B/token at k = 64, cached step ≤ 1.1× plain fine-tuning).

Set-up (no download): a random teacher `LlamaConfig(vocab 49,152, hidden 256, 4 layers, 4 heads, MLP 688,
512 positions)` drawn under seed 0 and saved with the real SmolLM2 tokenizer (`potstill.assets.smollm2_path()`,
49,152 ids) into a temporary folder. Student: `init: from_config` with `{num_hidden_layers: 2, hidden_size: 128,
num_attention_heads: 2, intermediate_size: 344}` (from_config shrinks the hidden size and keeps head_dim and
num_key_value_heads consistent). Data: the first `--articles` BBC News training articles (`builtin:bbc`, column
`text`), `max_length: 256`, `packing: true`, so nearly every example has 256 counted tokens. Trainer: batch 4,
fp32, lr 1e-4, `num_threads: 2`, `log_every: 1`, no evaluation, checkpoint only at the end.

The cache is written once by `capture_teacher_topk(task, dir, k=--k, temperature=1)` on a task set up exactly as
`potstill cache` does (`build_task(recipe)`, `task.setup(capture=True)`); its manifest gives `bytes_per_token`
(payload: 4·k + 4 for this vocabulary) and `file_bytes_per_token` (shard bytes, headers included, / tokens).

Variants, each a real `run_recipe(recipe, overwrite=True)` in a fresh subprocess, `--steps` optimizer steps:
- `plain`: no objectives, `trainer.hard_label_weight: 1`: plain student fine-tuning on the same tokens, the
  baseline of the 1.1× target (the loop runs no teacher when no objective reads it).
- `cached`: objective `forward_kl` (T = 1) with `teacher.cache`; the Objective switches to `sparse_forward_kl`
  because the task hands it a `TopKTeacher` (`TopKCache.get` on the CPU, then `.to(device)`).
- `cached_hl`: `cached` + `trainer.hard_label_weight: 1`.
- `live`: objective `forward_kl` with the live teacher (dense logits, no cache).

Step time: a global optimizer post-step hook (`register_optimizer_step_post_hook`) stamps the end of every
`AdamW.step()`; a step's time is the interval between two consecutive stamps (everything the loop does per
step: batch, teacher signal, student forward, loss, backward, clipping, optimizer, logging). The first
`--warmup` steps are dropped, so each run gives `--steps - --warmup` samples. As a cross-check, metrics.jsonl's
`rows_per_s` is turned back into seconds with the step's counted rows (recorded by wrapping `count_rows`).
Rounds: each round runs every variant once, the starting variant rotating by one per round; ratios are formed
inside each round from the per-run medians and reported as median (min–max) over rounds. All subprocesses get
the same environment (THP_MEM_ALLOC_ENABLE as given to this script: `--thp` sets it, default leaves it alone).
`os.getloadavg()` is printed before, between rounds and after: another job on the machine skews everything.

Every run has per-phase timers (teacher signal = cache.get + `.to`, student forward, loss forward, backward,
optimizer + rest). Profile (`--profile auto`: only when cached/plain > 1.1; `always`): a `torch.profiler` table
of one cached step, and a loss-only micro-benchmark on `[4, 256, 49152]` student logits and a real cached
batch: cross-entropy vs `sparse_forward_kl` (unchunked and chunked).

Usage: python benchmarks/cache_step.py [--rounds 3] [--steps 8] [--k 64] [--quick] [--profile auto|always|never]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("plain", "cached", "cached_hl", "live")
DESCRIPTIONS = {
    "plain": "hard-label CE only: student fine-tuning",
    "cached": "forward_kl from the top-k cache (sparse form)",
    "cached_hl": "cached + hard-label CE",
    "live": "forward_kl with the live teacher (dense)",
}
STUDENT = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 344}


def loadavg() -> str:
    return "loadavg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------------- worker side


def recipe_dict(work: Path, variant: str, *, steps: int, articles: int, max_length: int, name: str) -> dict:
    r = {
        "name": name, "output_dir": str(work / "runs"), "task": "causal_lm", "seed": 0,
        "teacher": {"path": str(work / "teacher")},
        "student": {"init": "from_config", "config": dict(STUDENT)},
        "data": {"train": {"path": "builtin:bbc", "split": "train", "limit": articles}, "max_length": max_length,
                 "packing": True},
        "trainer": {"max_steps": steps, "batch_size": 4, "lr": 1e-4, "log_every": 1, "num_threads": 2,
                    "save_every": 0},
        "eval": {"every": 0, "compare_before": False, "throughput": False},
    }
    if variant == "plain":
        r["trainer"]["hard_label_weight"] = 1.0
    else:
        r["objectives"] = [{"name": "forward_kl"}]
    if variant in ("cached", "cached_hl", "prepare"):
        r["teacher"]["cache"] = str(work / "cache")
    if variant == "cached_hl":
        r["trainer"]["hard_label_weight"] = 1.0
    return r


def _quiet() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def worker_prepare(args) -> dict:
    """Save the random teacher with the SmolLM2 tokenizer, then write the top-k cache as `potstill cache` does."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from potstill.assets import smollm2_path
    from potstill.config import validate_recipe
    from potstill.tasks import build_task
    from potstill.teachers.capture import capture_teacher_topk

    _quiet()
    torch.set_num_threads(2)
    work = Path(args.work)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = LlamaConfig(vocab_size=49152, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=688, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    recipe = validate_recipe(recipe_dict(work, "prepare", steps=1, articles=args.articles,
                                         max_length=args.max_length, name="capture"))
    task = build_task(recipe, run_dir=recipe.run_dir)
    t0 = time.perf_counter()
    task.setup(capture=True)
    setup_s = time.perf_counter() - t0
    from potstill.teachers.capture import expected_cache_meta

    t0 = time.perf_counter()
    expected_cache_meta(task)  # the fingerprints capture_teacher_topk computes first (inside its "seconds")
    fingerprint_s = time.perf_counter() - t0
    manifest = capture_teacher_topk(task, work / "cache", k=args.k, temperature=1.0, batch_size=8, overwrite=True)
    cache_bytes = sum(f.stat().st_size for f in (work / "cache").iterdir())
    return {"k": manifest["k"], "vocab_size": manifest["vocab_size"], "num_tokens": manifest["num_tokens"],
            "num_records": manifest["num_records"], "bytes_per_token": manifest["bytes_per_token"],
            "file_bytes_per_token": manifest["file_bytes_per_token"], "capture_s": manifest["seconds"],
            "setup_s": setup_s, "fingerprint_s": fingerprint_s, "folder_bytes": cache_bytes,
            "tokenizer_len": len(tokenizer)}


PHASES = ("teacher signal (cache.get + .to / live forward)", "  of which TopKCache.get + TopKTeacher.to",
          "student forward", "distillation loss forward", "hard-label loss forward", "backward",
          "optimizer + clip + batch + logging (rest)", "total")


def _install_phase_timers(stamps: list[float], phases: dict[str, list[float]]) -> None:
    """Wrap the loop's per-step calls in wall-clock timers (worker process only); the optimizer post-step hook
    closes each step: its interval minus the timed phases is the rest (optimizer, clipping, batch, logging)."""
    from accelerate import Accelerator
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from potstill.losses.sparse import TopKTeacher
    from potstill.tasks.causal_lm import CausalLMTask
    from potstill.teachers.cache import TopKCache
    from potstill.train.distiller import Objective

    current: dict[str, float] = {}

    def timed(owner, attr, label):
        fn = getattr(owner, attr)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            current[label] = current.get(label, 0.0) + time.perf_counter() - t0
            return out

        setattr(owner, attr, wrapper)

    timed(CausalLMTask, "teacher_signal", PHASES[0])
    timed(TopKCache, "get", PHASES[1])
    timed(TopKTeacher, "to", PHASES[1])
    timed(CausalLMTask, "student_signal", PHASES[2])
    timed(Objective, "__call__", PHASES[3])
    timed(CausalLMTask, "hard_label_loss", PHASES[4])
    timed(Accelerator, "backward", PHASES[5])

    def on_step(*a):
        stamps.append(time.perf_counter())
        if len(stamps) > 1:
            total = stamps[-1] - stamps[-2]
            current[PHASES[6]] = total - sum(v for k, v in current.items() if not k.startswith("  "))
            current[PHASES[7]] = total
            for k in PHASES:
                phases.setdefault(k, []).append(current.get(k, 0.0))
        current.clear()

    register_optimizer_step_post_hook(on_step)


def worker_run(args) -> dict:
    import torch

    from potstill.config import validate_recipe
    from potstill.tasks.causal_lm import CausalLMTask
    from potstill.train.run import run_recipe

    _quiet()
    work = Path(args.work)
    rows: list[int] = []
    count_rows = CausalLMTask.count_rows

    def counting(self, batch):
        n = count_rows(self, batch)
        rows.append(n)
        return n

    CausalLMTask.count_rows = counting
    stamps: list[float] = []
    phases: dict[str, list[float]] = {}
    _install_phase_timers(stamps, phases)
    name = f"{args.variant}-r{args.round}"
    recipe = validate_recipe(recipe_dict(work, args.variant, steps=args.steps, articles=args.articles,
                                         max_length=args.max_length, name=name))
    summary = run_recipe(recipe, overwrite=True)
    skip = max(args.warmup - 1, 0)  # interval i is step i + 2 (1-based); keep steps > warmup
    step_s = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][skip:]
    metrics = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = [m for m in metrics if "rows_per_s" in m]
    metric_s = [rows[m["step"] - 1] / m["rows_per_s"] for m in per_step if m["step"] > args.warmup]
    shutil.rmtree(recipe.run_dir, ignore_errors=True)
    return {"step_s": step_s, "metric_s": metric_s, "rows": rows, "loss": summary.get("final_loss"),
            "threads": torch.get_num_threads(), "phases": {k: v[skip:] for k, v in phases.items()}}


# --- profiling ---------------------------------------------------------------------------------------------


def worker_profile(args) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from potstill.config import validate_recipe
    from potstill.losses.sparse import sparse_forward_kl
    from potstill.teachers.cache import TopKCache
    from potstill.train.run import run_recipe

    _quiet()
    torch.set_num_threads(2)
    work = Path(args.work)
    out: dict = {}

    # One cached step under torch.profiler (stepped by the optimizer hook): wait 2 steps, warm 1, record 1.
    recipe = validate_recipe(recipe_dict(work, "cached", steps=4, articles=args.articles,
                                         max_length=args.max_length, name="profile-torch"))
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=2, warmup=1, active=1),
                 record_shapes=False) as prof:
        handle = register_optimizer_step_post_hook(lambda *a: prof.step())
        run_recipe(recipe, overwrite=True)
        handle.remove()
    out["profiler"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40)

    # Loss-only micro-benchmark on a real cached batch.
    cache = TopKCache(work / "cache")
    b, t, v = 4, args.max_length, 49152
    teacher = cache.get(list(range(b)), length=t)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(b, t, v, generator=gen)
    targets = teacher.ids[..., 0].clone()
    mask = torch.ones(b, t, dtype=torch.bool)
    cases = {
        "cross_entropy (hard label)": lambda z: torch.nn.functional.cross_entropy(
            z.flatten(0, 1), targets.flatten(), reduction="sum"),
        "sparse_forward_kl": lambda z: sparse_forward_kl(z, teacher, mask=mask, reduction="sum"),
        "sparse_forward_kl chunk 256": lambda z: sparse_forward_kl(z, teacher, mask=mask, reduction="sum",
                                                                   chunk_size=256),
        "TopKCache.get + .to": None,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(5):
        for name, fn in cases.items():
            if fn is None:
                t0 = time.perf_counter()
                cache.get(list(range(b)), length=t).to("cpu")
                times[name].append(time.perf_counter() - t0)
                continue
            z = base.clone().requires_grad_(True)
            t0 = time.perf_counter()
            fn(z).backward()
            times[name].append(time.perf_counter() - t0)
            del z
    out["loss_bench"] = {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}
    return out


# ----------------------------------------------------------------------------------------------- parent side


def run_worker(args, mode: str, env: dict, **extra) -> dict:
    result = Path(args.work) / f"result-{mode}-{extra.get('variant', '')}-{extra.get('round', '')}.json"
    cmd = [sys.executable, __file__, "--worker", mode, "--work", str(args.work), "--result", str(result),
           "--k", str(args.k), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--articles", str(args.articles), "--max-length", str(args.max_length)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"worker {mode} {extra} failed with code {proc.returncode}")
    return json.loads(result.read_text())


def fmt_ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="first optimizer steps dropped")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--articles", type=int, default=24, help="BBC training articles (packed into 256-token blocks)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--variants", default="plain,cached,live",
                   help=f"comma-separated, from {','.join(VARIANTS)} (cached_hl costs a ~7th of the run each)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (< 1 min): 1 round, 3 steps, 32-token blocks, plain/cached/live, no profile")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--thp", choices=("0", "1"), default=None, help="set THP_MEM_ALLOC_ENABLE for every worker")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        fn = {"prepare": worker_prepare, "run": worker_run, "profile": worker_profile}[args.worker]
        Path(args.result).write_text(json.dumps(fn(args)))
        return

    if args.quick:
        args.rounds, args.steps, args.warmup, args.articles, args.max_length = 1, 3, 2, 2, 32
        args.variants = "plain,cached,live"
        args.profile = "never" if args.profile == "auto" else args.profile
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TERM="dumb")
    if args.thp is not None:
        env["THP_MEM_ALLOC_ENABLE"] = args.thp
    variants = tuple(v for v in VARIANTS if v in args.variants.split(","))
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown or "plain" not in variants:
        raise SystemExit(f"--variants: unknown {sorted(unknown)} or no plain (the baseline)")
    start = time.perf_counter()
    print(f"cache_step: rounds={args.rounds} steps={args.steps} (first {args.warmup} dropped) k={args.k} "
          f"articles={args.articles} max_length={args.max_length} batch=4 fp32 threads=2 "
          f"THP_MEM_ALLOC_ENABLE={env.get('THP_MEM_ALLOC_ENABLE', '<unset>')}")
    print(f"start: {loadavg()}")
    work = Path(tempfile.mkdtemp(prefix="potstill-cache-step-"))
    args.work = str(work)
    try:
        prep = run_worker(args, "prepare", env)
        print(f"\ncache: k={prep['k']} T=1 vocab={prep['vocab_size']:,} (tokenizer {prep['tokenizer_len']:,} ids), "
              f"{prep['num_records']} sequences, {prep['num_tokens']:,} tokens")
        print(f"  bytes_per_token (payload) = {prep['bytes_per_token']}   file_bytes_per_token (shards) = "
              f"{prep['file_bytes_per_token']:.2f}   whole folder incl. index+manifest = "
              f"{prep['folder_bytes'] / prep['num_tokens']:.2f} B/token")
        print(f"  build: {prep['capture_s']:.2f} s for {prep['num_tokens']:,} tokens "
              f"({prep['num_tokens'] / prep['capture_s']:,.0f} tokens/s; teacher forward + top-k + write), "
              f"of which ~{prep['fingerprint_s']:.2f} s hashing teacher weights + data; task setup "
              f"{prep['setup_s']:.1f} s\n  target ≤ 300 B/token: "
              f"{'met' if prep['bytes_per_token'] <= 300 and prep['file_bytes_per_token'] <= 300 else 'MISSED'}")

        results: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for variant in order:
                res = run_worker(args, "run", env, variant=variant, round=r)
                results[variant].append(res)
                print(f"  round {r + 1} {variant:12s} median {statistics.median(res['step_s']):.3f} s/step "
                      f"(metrics.jsonl {statistics.median(res['metric_s']):.3f}) "
                      f"rows/step {statistics.median(res['rows']):.0f} loss {res['loss']:.4g}", flush=True)
            print(f"  after round {r + 1}: {loadavg()}", flush=True)

        print("\nmedian seconds per optimizer step (per run medians over kept steps; median (min–max) over rounds)")
        med = {v: [statistics.median(x["step_s"]) for x in results[v]] for v in variants}
        for v in variants:
            print(f"  {v:12s} {fmt_ratio(med[v])} s   metrics.jsonl: "
                  f"{fmt_ratio([statistics.median(x['metric_s']) for x in results[v]])} s   {DESCRIPTIONS[v]}")
        pairs = [("cached", "plain"), ("cached_hl", "plain"), ("live", "plain"), ("live", "cached")]
        pairs = [(a, b) for a, b in pairs if a in variants and b in variants]
        print("\nratios inside each round, median (min–max) over rounds")
        ratios = {}
        for a, b in pairs:
            ratios[(a, b)] = [x / y for x, y in zip(med[a], med[b], strict=True)]
            print(f"  {a + '/' + b:26s} {fmt_ratio(ratios[(a, b)])}")
        cached_ratio = statistics.median(ratios[("cached", "plain")])
        print(f"  target cached ≤ 1.1× plain student fine-tuning: "
              f"{'met' if cached_ratio <= 1.1 else 'MISSED'} ({cached_ratio:.3f})")

        print("\nper-phase wall time, ms per step: median over every kept step of every round (timers wrap the "
              "loop's calls)")
        print(f"  {'phase':48s} " + " ".join(f"{v:>12s}" for v in variants))
        for n in PHASES:
            vals = [statistics.median([x for res in results[v] for x in res["phases"].get(n, [])] or [0.0])
                    for v in variants]
            print(f"  {n:48s} " + " ".join(f"{1000 * x:12.0f}" for x in vals))

        if args.profile == "always" or (args.profile == "auto" and cached_ratio > 1.1):
            print(f"\nprofile ({loadavg()})", flush=True)
            prof = run_worker(args, "profile", env)
            print("  loss forward+backward alone on [4, 256, 49152] fp32 logits, ms median (min–max) of 5:")
            for n, (m, lo, hi) in prof["loss_bench"].items():
                print(f"    {n:32s} {1000 * m:7.1f} ({1000 * lo:.1f}–{1000 * hi:.1f})")
            print("  torch.profiler, one cached optimizer step, top ops by self CPU time:")
            print("\n".join("    " + line for line in prof["profiler"].splitlines()))
        print(f"\nend: {loadavg()}   wall {time.perf_counter() - start:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
