"""What bounded memory costs in one LLM distillation step on CPU: chunked and fused losses against unchunked.

Issue #16 §5: potstill's chunked loss (`chunk_size`) and its fused lm_head (`trainer.fused_lm_head`) should cost
(nearly) nothing in time against the unchunked loss, at a lower peak memory. The setup is that of
`benchmarks/llm_step.py` (its models, data, batches and step timer are reused from it): tiny Llama teacher
4×256 → student 2×128, vocab 32,000, seq 256, batch 4, generalized JSD β=0.5 over the 4 × 255 next-token
positions, AdamW, float32, 2 threads.

Rows:
- `unchunked`: potstill's Distiller with the `causal_lm` adapter (llm_step's `potstill` row), no `chunk_size`;
- `chunked`: the same with the objective's `chunk_size` (default 512 tokens);
- `fused`: the same with `trainer.fused_lm_head: true` and that `chunk_size`: the student's `[4, 256, V]`
  logits never exist (the live teacher's still do);
- `loop` / `loop_chunked` (reference): a plain PyTorch loop with a JSD written by hand in a few lines, once on
  the whole logits and once chunked by hand (each chunk's loss backpropagated into a detached copy of the
  logits, whose gradient then goes through the model once), to show what a plain chunked loop costs.

Every burst is a fresh subprocess; each round runs every row once, the starting row rotating by one per round.
Ratios are taken inside each round and given as median (min–max) over rounds. Time per step = interval between
two optimizer steps (llm_step's hook); memory = peak RSS of the burst and "peak extra" = that peak minus the RSS
after models and data were built.

`--in-process N` (time only, robust to a busy machine): one process, one model pair, the step's loss part
called directly (teacher forward, student forward, `generalized_jsd` / `fused_linear_divergence` with the
Distiller's mask and "sum", backward, `zero_grad`; no optimizer step, so every step sees the same weights);
the rows alternate step by step (A B C, C B A, ...) N times and each ratio is taken between neighbouring
steps, median (min–max) over the N repeats.

Usage: python benchmarks/bounded_memory_step.py [--rounds 5] [--steps 4] [--chunk 512] [--quick]
       python benchmarks/bounded_memory_step.py --in-process 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_step  # noqa: E402  (the sibling benchmark whose setup this one reuses)
from _machine import load_average, peak_rss_bytes, rss_bytes, span  # noqa: E402

VARIANTS = ("unchunked", "chunked", "fused", "loop", "loop_chunked")
PAIRS = (("chunked", "unchunked", "≤ 1.05, memory < 1"), ("fused", "unchunked", "≤ 1.00"),
         ("loop_chunked", "loop", ""), ("unchunked", "loop", ""))


def _labels(chunk: int) -> dict[str, str]:
    return {"unchunked": "potstill, unchunked", "chunked": f"potstill, chunk_size {chunk}",
            "fused": f"potstill, fused head {chunk}", "loop": "plain loop, hand-written JSD",
            "loop_chunked": f"plain loop, hand-chunked {chunk}"}


# ---------------------------------------------------------------------------------------------- worker side
def _jsd_rows(s, t, beta: float = 0.5):
    """The generalized JSD per row, written the plain way (log-softmax, log of the mixture, two KLs)."""
    import torch

    log_s, log_t = s.float().log_softmax(-1), t.float().log_softmax(-1)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def _run_loop(args, teacher, student, data, n_steps: int, chunk: int | None) -> float:
    import torch

    order = llm_step._order(len(data), args.batch)
    batches = [data[order[i:i + args.batch]] for i in range(0, len(order), args.batch)]
    attention = torch.ones(args.batch, args.seq, dtype=torch.long)
    rows = llm_step._shift_mask(args.batch, args.seq).reshape(-1).nonzero().squeeze(1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    first = None
    for step in range(n_steps):
        ids = batches[step % len(batches)]
        with torch.inference_mode():
            t = teacher(input_ids=ids, attention_mask=attention).logits.reshape(-1, args.vocab)
        logits = student(input_ids=ids, attention_mask=attention).logits.reshape(-1, args.vocab)
        if chunk is None:
            loss = _jsd_rows(logits[rows], t[rows]).sum() / rows.numel()
            loss.backward()
        else:  # each chunk's loss into a detached copy of the logits, then one backward through the model
            detached, loss = logits.detach().requires_grad_(True), 0.0
            for start in range(0, rows.numel(), chunk):
                part = rows[start:start + chunk]
                piece = _jsd_rows(detached[part], t[part]).sum() / rows.numel()
                piece.backward()
                loss += float(piece)
            logits.backward(detached.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first = float(loss) if first is None else first
    return float(first)


def _worker(args: argparse.Namespace) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import potstill.train.distiller  # noqa: F401  (imported before the baseline on every side)

    torch.set_num_threads(args.threads)
    stamps: list[tuple[float, float]] = []

    def stamp(optimizer, _args, _kwargs) -> None:
        if type(optimizer) is torch.optim.AdamW:
            stamps.append((time.perf_counter(), time.process_time()))

    register_optimizer_step_post_hook(stamp)
    n_steps = args.warmup + args.steps + 1
    variant = args.worker
    teacher, student, data = llm_step._build(args)
    baseline = rss_bytes()
    if variant.startswith("loop"):
        first = _run_loop(args, teacher, student, data, n_steps, args.chunk if variant == "loop_chunked" else None)
    else:
        first = llm_step._run_potstill(args, teacher, student, data, n_steps, fused=variant == "fused",
                                       chunk_size=None if variant == "unchunked" else args.chunk)[0][0]
    if len(stamps) != n_steps:
        raise RuntimeError(f"{variant}: expected {n_steps} optimizer steps, saw {len(stamps)}")
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup:]
    print(llm_step.MARK + json.dumps({"variant": variant, "wall": statistics.median(wall),
                                      "cpu": statistics.median(cpu), "first_loss": first,
                                      "peak": peak_rss_bytes(), "baseline": baseline}), flush=True)


def _in_process(args: argparse.Namespace) -> int:
    import torch

    from potstill.losses import generalized_jsd
    from potstill.losses.fused import fused_linear_divergence
    from potstill.tasks.lm_models import lm_head_inputs

    torch.set_num_threads(args.threads)
    args.sequences = args.batch
    teacher, student, data = llm_step._build(args)
    attention, mask = torch.ones_like(data), llm_step._shift_mask(args.batch, args.seq)

    def step(kind: str) -> None:
        with torch.inference_mode():
            t = teacher(input_ids=data, attention_mask=attention).logits
        if kind == "fused":
            head = lm_head_inputs(student, lambda: student(input_ids=data, attention_mask=attention).logits,
                                  args.vocab)
            loss = fused_linear_divergence(head.hidden, head.weight, t, divergence="generalized_jsd", beta=0.5,
                                           mask=mask, reduction="sum", chunk_size=args.chunk)
        else:
            s = student(input_ids=data, attention_mask=attention).logits
            loss = generalized_jsd(s, t, beta=0.5, mask=mask, reduction="sum",
                                   chunk_size=args.chunk if kind == "chunked" else None)
        (loss / int(mask.sum())).backward()
        student.zero_grad(set_to_none=True)

    kinds = ["unchunked", "chunked", "fused"]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for k in kinds:  # warm-up
        step(k)
    for r in range(args.in_process):
        for k in kinds if r % 2 == 0 else kinds[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            step(k)
            times[k].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(f"in-process, {args.in_process} repeats, {args.threads} threads, chunk {args.chunk}, load average "
          f"{load_average()}")
    for k in kinds:
        wall_s, cpu_s = span([x[0] for x in times[k]]), span([x[1] for x in times[k]])
        print(f"{k:<10} wall {wall_s} s  CPU {cpu_s} s")
    for k in kinds[1:]:
        ratios = [[a[i] / b[i] for a, b in zip(times[k], times["unchunked"], strict=True)] for i in (0, 1)]
        print(f"{k} / unchunked: wall {span(ratios[0])}  CPU {span(ratios[1])}")
    return 0


# ---------------------------------------------------------------------------------------------- parent side
def _burst(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch",
           str(args.batch), "--sequences", str(args.sequences), "--lr", str(args.lr), "--chunk", str(args.chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=llm_step._child_env(args))
    found = [json.loads(line[len(llm_step.MARK):]) for line in proc.stdout.splitlines()
             if line.startswith(llm_step.MARK)]
    if proc.returncode or len(found) != 1:
        raise RuntimeError(f"{variant} burst failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return found[0]


def _main(args: argparse.Namespace) -> int:
    variants = [v for v in VARIANTS if v in args.variants]
    labels = _labels(args.chunk)
    print(f"LLM distillation step, CPU: teacher Llama 4×256 → student 2×128, vocab {args.vocab}, seq {args.seq}, "
          f"batch {args.batch}; generalized JSD β=0.5, AdamW, fp32, {args.threads} threads; chunk {args.chunk}; "
          f"{args.rounds} interleaved rounds, each burst a fresh process: {args.warmup} warm-up + {args.steps} timed "
          f"steps; load average at start {load_average()}")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            results[v].append(_burst(args, v))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{v} {results[v][-1]['wall']:.3f}s {(results[v][-1]['peak'] - results[v][-1]['baseline']) / 2**20:.0f}MiB"
            for v in variants) + f"  (load {load_average()})", flush=True)

    def extra(b: dict) -> float:
        return (b["peak"] - b["baseline"]) / llm_step.MIB

    def peak(b: dict) -> float:
        return b["peak"] / llm_step.MIB

    def wall(b: dict) -> float:
        return b["wall"]

    def cpu(b: dict) -> float:
        return b["cpu"]

    print(f"\n{'row':<32} {'wall s/step':>20} {'CPU s/step':>20} {'peak extra MiB':>17} {'peak RSS MiB':>17} "
          f"{'first loss':>12}")
    for v in variants:
        runs = results[v]
        print(f"{labels[v]:<32} {span([wall(b) for b in runs]):>20} {span([cpu(b) for b in runs]):>20} "
              f"{span([extra(b) for b in runs], '{:.0f}'):>17} {span([peak(b) for b in runs], '{:.0f}'):>17} "
              f"{runs[0]['first_loss']:>12.7g}")
    print("(median (min–max) over rounds)\n")
    print(f"{'ratio, per round':<26} {'wall time':>20} {'CPU time':>20} {'peak extra':>20} {'peak RSS':>20}  target")
    for a, b, target in PAIRS:
        if {a, b} <= set(variants):
            cells = [span([key(x) / key(y) for x, y in zip(results[a], results[b], strict=True)])
                     for key in (wall, cpu, extra, peak)]
            print(f"{a + ' / ' + b:<26} " + " ".join(f"{c:>20}" for c in cells) + f"  {target}")
    losses = [results[v][0]["first_loss"] for v in variants]
    worst = max(abs(x - losses[0]) / abs(losses[0]) for x in losses)
    print(f"\nfirst-batch loss: max relative difference between rows {worst:.1e}")
    return 0 if worst < 1e-4 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per burst")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=512, help="chunk_size of the chunked, fused and hand rows")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--quick", action="store_true", help="smoke run: vocab 4,000, seq 64, 1 round, 2 steps")
    parser.add_argument("--thp", type=int, choices=(0, 1), default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--in-process", type=int, default=0, metavar="N",
                        help="time only: N step-by-step interleaved repeats in this process (see the docstring)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        return _in_process(args)
    if args.worker:
        _worker(args)
        return 0
    if args.quick:
        args.rounds, args.steps, args.vocab, args.seq, args.sequences, args.chunk = 1, 2, 4_000, 64, 16, 64
    return _main(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
