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
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from potstill.losses import OBJECTIVES

MIB = 1024 * 1024


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


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    chunk_size = args.chunk_size if args.variant == "chunked" else None
    warm_s, warm_t = _inputs(4, 64)
    _step(args.loss, warm_s, warm_t, chunk_size and 2, args.temperature)
    student, teacher = _inputs(args.rows, args.vocab)
    baseline = _peak_rss_bytes()
    _step(args.loss, student, teacher, chunk_size, args.temperature)
    print(_peak_rss_bytes() - baseline)


def _measure_memory(args: argparse.Namespace, loss: str, variant: str) -> float:
    cmd = [sys.executable, __file__, "--worker", "--loss", loss, "--variant", variant]
    cmd += ["--rows", str(args.rows), "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size)]
    cmd += ["--threads", str(args.threads), "--temperature", str(args.temperature)]
    env = dict(os.environ)
    if args.malloc == "pinned":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(out.split()[-1]) / MIB


def _memory_runs(args: argparse.Namespace, loss: str) -> dict[str, list[float]]:
    mem: dict[str, list[float]] = {"unchunked": [], "chunked": []}
    for _ in range(args.mem_repeats):
        for variant in mem:
            mem[variant].append(_measure_memory(args, loss, variant))
    return mem


def _span(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--mem-repeats", type=int, default=2, help="memory subprocesses per variant")
    parser.add_argument("--losses", nargs="+", default=["forward_kl", "generalized_jsd"])
    parser.add_argument("--malloc", choices=["pinned", "default"], default="pinned")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    torch.set_num_threads(args.threads)
    input_mib = args.rows * args.vocab * 4 / MIB
    print(
        f"{args.rows} × {args.vocab} float32 logits ({input_mib:.0f} MiB each), "
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
    mems = {loss: _memory_runs(args, loss) for loss in args.losses}
    student, teacher = _inputs(args.rows, args.vocab)
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
            f"{loss}: memory {_span(mem_ratio)}, time {_span(time_ratio)}; "
            f"max |Δ value| {value_diff:.2e}, max |Δ grad| {grad_diff:.2e}"
        )
    print("\nchunked / unchunked, median (min–max):")
    for line in summaries:
        print("  " + line)


if __name__ == "__main__":
    main()
