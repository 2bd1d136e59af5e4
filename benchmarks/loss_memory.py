"""Chunked vs unchunked logit divergences on CPU: peak extra memory, time, and agreement.

For each loss, forward + backward (student grad only, "mean" reduction) on `rows × vocab` float32 logits:

- peak extra memory: in a fresh subprocess per run, peak RSS (`ru_maxrss`) after the step minus the peak
  after allocating the inputs; it includes the student's full-size gradient (1× the input size). By
  default the subprocess pins glibc's mmap threshold at 128 KiB (`MALLOC_MMAP_THRESHOLD_`), so freed
  tensors go back to the OS and RSS follows live tensors; with `--malloc default` glibc may keep freed
  chunk temporaries in its heap, which inflates the chunked numbers;
- time: median over interleaved repeats (unchunked, chunked, unchunked, ...) in this process;
- agreement: max |Δ| of the loss value and of the student gradient between the two paths.

Usage: python benchmarks/loss_memory.py [--rows 512] [--vocab 32000] [--chunk-size 128] [--repeats 5]

`--mode head` compares three ways to get a distillation loss from the student's last hidden states
`h [rows, hidden]` and lm_head `W [V, hidden]`, forward + backward (gradients for h and W):

- naive: `logits = h @ W.T`, then the unchunked divergence on the full logits;
- chunked: the same matmul, then the divergence with `chunk_size` (only the divergence is chunked);
- fused: `fused_linear_divergence(h, W, teacher, chunk_size=...)`, no `[rows, V]` student tensor at all.

Every run (memory and time) is a fresh subprocess; rounds run naive, chunked, fused, naive, ... so ratios
come from one interleaved run. Peak extra memory = peak RSS after the first step minus the peak after the
inputs (h, W, teacher logits) exist: the teacher logits `[rows, V]` float32 are an input of all three
paths and are NOT counted; the gradients of h and W (`.grad`, `V × hidden` float32) ARE counted, in all
three. Time = median of the steps after the first in that process. When the naive path would need more than
`--naive-budget-gib`, it is measured at two smaller token counts (halving until the estimate fits): its
memory is extrapolated to `--rows` on the line through the two points (every term is linear in the token
count, plus a constant for W's gradient), its time proportionally from the larger one; the table marks it.
Δ value / grad between the paths is checked in one more subprocess at the naive path's largest measured token count.

Usage: python benchmarks/loss_memory.py --mode head [--rows 4096] [--vocab 32000 128256] [--hidden 576]
       [--chunk-size 512] [--fused-chunk-size 512] [--repeats 2] [--mem-repeats 2] [--thp off]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from _machine import peak_rss_bytes, span

from potstill.losses import OBJECTIVES, divergences
from potstill.losses.fused import fused_linear_divergence

MIB = 1024 * 1024
GIB = 1024 * MIB
# Peak extra bytes of the naive head path ≈ NAIVE_TENSORS[loss] × rows × V × 4 (measured at V=32000, 4096
# rows: forward_kl 6.3, generalized_jsd 11.5; see docs/benchmarks.md), with margin; the default is for any
# other loss. Used only to decide when the naive path must be measured at fewer tokens.
NAIVE_TENSORS = {"forward_kl": 7, "reverse_kl": 7, "soft_cross_entropy": 7, "generalized_jsd": 12}
NAIVE_TENSORS_DEFAULT = 12


def _inputs(rows: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    student = torch.randn(rows, vocab).mul_(2.0).requires_grad_(True)
    teacher = torch.randn(rows, vocab).mul_(2.0)
    return student, teacher


def _step(
    loss: str, student: torch.Tensor, teacher: torch.Tensor, chunk_size: int | None, temperature: float
):
    student.grad = None
    value = OBJECTIVES[loss].fn(student, teacher, temperature=temperature, chunk_size=chunk_size)
    value.backward()
    return value.detach(), student.grad


def _child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.malloc == "pinned":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.mode == "head":
        _head_worker(args)
        return
    chunk_size = args.chunk_size if args.variant == "chunked" else None
    warm_s, warm_t = _inputs(4, 64)
    _step(args.loss, warm_s, warm_t, chunk_size and 2, args.temperature)
    student, teacher = _inputs(args.rows, args.vocab[0])
    baseline = peak_rss_bytes()
    _step(args.loss, student, teacher, chunk_size, args.temperature)
    print(peak_rss_bytes() - baseline)


def _measure_memory(args: argparse.Namespace, loss: str, variant: str, vocab: int) -> float:
    cmd = [sys.executable, __file__, "--worker", "--loss", loss, "--variant", variant]
    cmd += ["--rows", str(args.rows), "--vocab", str(vocab), "--chunk-size", str(args.chunk_size)]
    cmd += ["--threads", str(args.threads), "--temperature", str(args.temperature)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_child_env(args)).stdout
    return int(out.split()[-1]) / MIB


def _memory_runs(args: argparse.Namespace, loss: str, vocab: int) -> dict[str, list[float]]:
    mem: dict[str, list[float]] = {"unchunked": [], "chunked": []}
    for _ in range(args.mem_repeats):
        for variant in mem:
            mem[variant].append(_measure_memory(args, loss, variant, vocab))
    return mem


def _logits_main(args: argparse.Namespace, vocab: int) -> None:
    input_mib = args.rows * vocab * 4 / MIB
    print(
        f"{args.rows} × {vocab} float32 logits ({input_mib:.0f} MiB each), "
        f"chunk_size={args.chunk_size}, T={args.temperature}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"time: median of {args.repeats} interleaved fwd+bwd steps; "
        f"memory: {args.mem_repeats} fresh process(es) per variant, {args.malloc} malloc"
    )
    header = f"{'loss':<16} {'variant':<10} {'peak extra MiB':>15} {'median s':>9}"
    print(header)
    print("-" * len(header))
    # Before this process holds anything big: a child's ru_maxrss starts at its parent's peak RSS.
    mems = {loss: _memory_runs(args, loss, vocab) for loss in args.losses}
    student, teacher = _inputs(args.rows, vocab)
    summaries = []
    for loss in args.losses:
        mem = mems[loss]

        value_u, grad_u = _step(loss, student, teacher, None, args.temperature)
        grad_u = grad_u.clone()
        value_c, grad_c = _step(loss, student, teacher, args.chunk_size, args.temperature)
        value_diff = (value_u - value_c).abs().item()
        grad_diff = (grad_u - grad_c).abs().max().item()
        del grad_u

        times: dict[str, list[float]] = {"unchunked": [], "chunked": []}
        for _ in range(args.repeats):
            for variant, chunk_size in (("unchunked", None), ("chunked", args.chunk_size)):
                start = time.perf_counter()
                _step(loss, student, teacher, chunk_size, args.temperature)
                times[variant].append(time.perf_counter() - start)

        for variant in ("unchunked", "chunked"):
            print(
                f"{loss:<16} {variant:<10} {statistics.median(mem[variant]):>15.0f} "
                f"{statistics.median(times[variant]):>9.3f}"
            )
        mem_ratio = [c / max(u, 1e-9) for c, u in zip(mem["chunked"], mem["unchunked"], strict=True)]
        time_ratio = [c / u for c, u in zip(times["chunked"], times["unchunked"], strict=True)]
        summaries.append(
            f"{loss}: memory {span(mem_ratio)}, time {span(time_ratio)}; "
            f"max |Δ value| {value_diff:.2e}, max |Δ grad| {grad_diff:.2e}"
        )
    print("\nchunked / unchunked, median (min–max):")
    for line in summaries:
        print("  " + line)


# --- head mode: naive / chunked / fused from hidden states ----------------------------------------------

HEAD_VARIANTS = ("naive", "chunked", "fused")


def _head_inputs(rows: int, vocab: int, hidden: int, seed: int = 0):
    """h [rows, hidden], W [V, hidden] (student logits of std ≈ 2), teacher logits [rows, V] of std 2."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=gen).mul_(2.0 / hidden**0.5).requires_grad_(True)
    teacher = torch.randn(rows, vocab, generator=gen).mul_(2.0)
    return h, w, teacher


def _head_step(args: argparse.Namespace, loss: str, variant: str, h, w, teacher):
    h.grad = w.grad = None
    if variant == "fused":
        value = fused_linear_divergence(
            h, w, teacher, divergence=loss, temperature=args.temperature, chunk_size=args.fused_chunk_size
        )
    else:
        chunk_size = args.chunk_size if variant == "chunked" else None
        logits = h @ w.t()
        value = getattr(divergences, loss)(logits, teacher, temperature=args.temperature, chunk_size=chunk_size)
        del logits
    value.backward()
    return value.detach(), h.grad, w.grad


def _head_worker(args: argparse.Namespace) -> None:
    vocab = args.vocab[0]
    if args.variant == "check":
        h, w, teacher = _head_inputs(args.rows, vocab, args.hidden)
        ref_value, ref_gh, ref_gw = (x.clone() for x in _head_step(args, args.loss, "naive", h, w, teacher))
        out = {}
        for variant in ("chunked", "fused"):
            value, gh, gw = _head_step(args, args.loss, variant, h, w, teacher)
            out[variant] = {
                "value": (value - ref_value).abs().item(),
                "grad_h": (gh - ref_gh).abs().max().item(),
                "grad_w": (gw - ref_gw).abs().max().item(),
            }
        out["scale"] = {"value": ref_value.abs().item(), "grad_h": ref_gh.abs().max().item(),
                        "grad_w": ref_gw.abs().max().item()}
        print(json.dumps(out))
        return
    warm = _head_inputs(8, 64, 16)
    args_warm = argparse.Namespace(**{**vars(args), "chunk_size": 3, "fused_chunk_size": 3})
    _head_step(args_warm, args.loss, args.variant, *warm)
    del warm
    h, w, teacher = _head_inputs(args.rows, vocab, args.hidden)
    baseline = peak_rss_bytes()
    times = []
    for _ in range(1 + args.repeats):
        start = time.perf_counter()
        _head_step(args, args.loss, args.variant, h, w, teacher)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            extra = peak_rss_bytes() - baseline
    print(json.dumps({"mem": extra, "times": times}))


def _run_head_worker(args: argparse.Namespace, loss: str, variant: str, rows: int, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", "head", "--loss", loss, "--variant", variant]
    cmd += ["--rows", str(rows), "--vocab", str(vocab), "--hidden", str(args.hidden)]
    cmd += ["--chunk-size", str(args.chunk_size), "--fused-chunk-size", str(args.fused_chunk_size)]
    cmd += ["--threads", str(args.threads), "--temperature", str(args.temperature), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_child_env(args)).stdout
    return json.loads(out.strip().splitlines()[-1])


def _naive_rows(args: argparse.Namespace, loss: str, vocab: int) -> list[int]:
    """Token counts at which to measure the naive path: `--rows`, or two smaller ones within the budget."""
    tensors = NAIVE_TENSORS.get(loss, NAIVE_TENSORS_DEFAULT)
    rows = args.rows
    if tensors * rows * vocab * 4 <= args.naive_budget_gib * GIB:
        return [rows]
    while rows > 2 and tensors * rows * vocab * 4 > args.naive_budget_gib * GIB:
        rows //= 2
    return [rows // 2, rows]


def _extrapolate(points: list[tuple[int, float]], rows: int) -> float:
    """Value at `rows` on the line through two (rows, value) points, or the one value measured at `rows`."""
    if len(points) == 1:
        return points[0][1]
    (n1, v1), (n2, v2) = points
    return v2 + (rows - n2) * (v2 - v1) / (n2 - n1)


def _head_main(args: argparse.Namespace, vocab: int) -> None:
    teacher_mib = args.rows * vocab * 4 / MIB
    print(
        f"\nV={vocab}, {args.rows} tokens, hidden {args.hidden}, float32; teacher logits input "
        f"{teacher_mib:.0f} MiB (held by every path, not counted); W grad {vocab * args.hidden * 4 / MIB:.0f} MiB "
        f"(counted in every path)"
    )
    for loss in args.losses:
        naive_rows = _naive_rows(args, loss, vocab)
        scaled = naive_rows != [args.rows]
        mem: dict[str, list[float]] = {v: [] for v in HEAD_VARIANTS}
        times: dict[str, list[float]] = {v: [] for v in HEAD_VARIANTS}
        raw_naive: list[list[tuple[int, float, float]]] = []
        for _ in range(args.mem_repeats):
            for variant in HEAD_VARIANTS:
                if variant == "naive":
                    runs = [(n, _run_head_worker(args, loss, variant, n, vocab)) for n in naive_rows]
                    pts_m = [(n, r["mem"] / MIB) for n, r in runs]
                    pts_t = [(n, statistics.median(r["times"][1:])) for n, r in runs]
                    raw_naive.append([(n, m, t) for (n, m), (_, t) in zip(pts_m, pts_t, strict=True)])
                    mem[variant].append(_extrapolate(pts_m, args.rows))
                    # Time has no sizeable constant term: scale the largest measurement (less noisy than a line).
                    times[variant].append(pts_t[-1][1] * args.rows / pts_t[-1][0])
                else:
                    r = _run_head_worker(args, loss, variant, args.rows, vocab)
                    mem[variant].append(r["mem"] / MIB)
                    times[variant].append(statistics.median(r["times"][1:]))
        check_rows = naive_rows[-1]
        check = _run_head_worker(args, loss, "check", check_rows, vocab)

        header = (
            f"{'loss':<16} {'path':<8} {'chunk':>6} {'peak extra MiB':>15} {'median s':>9} "
            f"{'mem / naive':>20} {'time / naive':>20}"
        )
        print(header)
        print("-" * len(header))
        for variant in HEAD_VARIANTS:
            chunk = {"naive": "-", "chunked": args.chunk_size, "fused": args.fused_chunk_size}[variant]
            m_ratio = [m / n for m, n in zip(mem[variant], mem["naive"], strict=True)]
            t_ratio = [t / n for t, n in zip(times[variant], times["naive"], strict=True)]
            star = "*" if variant == "naive" and scaled else " "
            print(
                f"{loss:<16} {variant:<8} {chunk!s:>6} {statistics.median(mem[variant]):>14.0f}{star} "
                f"{statistics.median(times[variant]):>8.2f}{star} {span(m_ratio):>20} {span(t_ratio):>20}"
            )
        if scaled:
            shown = "; ".join(
                ", ".join(f"{n} tokens {m:.0f} MiB {t:.2f} s" for n, m, t in rnd) for rnd in raw_naive
            )
            print(
                f"  * naive at {args.rows} tokens: memory on the line through, time proportional to the "
                f"larger of (per round) {shown}"
            )
        scale = check.pop("scale")
        for variant, diffs in check.items():
            print(
                f"  {variant} vs naive at {check_rows} tokens: |Δ value| {diffs['value']:.1e} "
                f"(value {scale['value']:.3g}), max |Δ grad_h| {diffs['grad_h']:.1e} "
                f"(max {scale['grad_h']:.1e}), max |Δ grad_W| {diffs['grad_w']:.1e} (max {scale['grad_w']:.1e})"
            )


def _pin_thp(args: argparse.Namespace) -> None:
    """Re-run this script with THP_MEM_ALLOC_ENABLE pinned (read at start-up), so every side shares it."""
    if args.thp == "inherit":
        return
    want = "1" if args.thp == "on" else "0"
    if os.environ.get("THP_MEM_ALLOC_ENABLE") != want:
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": want}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["logits", "head"], default="logits")
    parser.add_argument("--rows", type=int, help="tokens (default: 512 logits mode, 4096 head mode)")
    parser.add_argument("--vocab", type=int, nargs="+", help="default: 32000 (logits), 32000 128256 (head)")
    parser.add_argument("--chunk-size", type=int, help="default: 128 (logits), 512 (head)")
    parser.add_argument("--hidden", type=int, default=576, help="head mode: width of h and W")
    parser.add_argument("--fused-chunk-size", type=int, help="head mode: fused chunk (default --chunk-size)")
    parser.add_argument("--naive-budget-gib", type=float, default=10.0,
                        help="head mode: measure naive at fewer tokens and extrapolate above this estimate")
    parser.add_argument("--repeats", type=int, help="timed steps per variant (default 5 logits, 2 head)")
    parser.add_argument("--mem-repeats", type=int, default=2, help="memory subprocesses (head: rounds) per variant")
    parser.add_argument("--losses", nargs="+", help="default: forward_kl generalized_jsd (logits), forward_kl (head)")
    parser.add_argument("--malloc", choices=["pinned", "default"], default="pinned")
    parser.add_argument("--thp", choices=["inherit", "off", "on"], default="inherit",
                        help="pin THP_MEM_ALLOC_ENABLE for the whole run (all sides) or inherit it")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    head = args.mode == "head"
    defaults = {
        "rows": 4096 if head else 512,
        "vocab": [32000, 128256] if head else [32000],
        "chunk_size": 512 if head else 128,
        "repeats": 2 if head else 5,
        "losses": ["forward_kl"] if head else ["forward_kl", "generalized_jsd"],
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.fused_chunk_size is None:
        args.fused_chunk_size = args.chunk_size
    if args.worker:
        _worker(args)
        return
    _pin_thp(args)

    torch.set_num_threads(args.threads)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    if head:
        print(
            f"head mode: forward + backward from hidden states, T={args.temperature}, {args.threads} threads, "
            f"torch {torch.__version__}, THP_MEM_ALLOC_ENABLE={thp}, {args.malloc} malloc; "
            f"{args.mem_repeats} interleaved rounds (naive, chunked, fused), each run a fresh process; "
            f"time = median of {args.repeats} steps after the first"
        )
        print("ratios: median (min–max) over rounds of path / naive from the same round")
        for vocab in args.vocab:
            _head_main(args, vocab)
        return
    for vocab in args.vocab:
        _logits_main(args, vocab)


if __name__ == "__main__":
    main()
