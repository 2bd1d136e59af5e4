"""SPLADE student training step on CPU: the fused max-pool (`SpladeEncoder(fused=True)`) vs the full-logits path.

The student is the ranking recipe's sparse one: MiniLM-L6's layers 0 and 3 with a new MLM head tied to its
word embeddings (`splade_from_encoder`), V = 30,522. One step = forward of `--rows` chatterbot answers
(max_length `--max-length`) to SPLADE-max weights `[rows, V]`, a weighted sum as the loss, backward.

- time: median step time (after one warm-up step) per path, in fresh subprocesses run interleaved
  (plain, fused, plain, fused, ...), so the ratio comes from one run on the same noisy machine;
- peak extra memory: peak RSS (`ru_maxrss`) of the subprocess after its steps minus the peak once the model
  and inputs exist, so it includes the parameters' gradients (the same in both paths; glibc's mmap threshold
  pinned at 128 KiB so that freed tensors return to the OS);
- the encoder is in eval mode (no dropout), so both paths compute the same function;
- agreement: max |Δ| of the weights, and of the gradients relative to the largest gradient entry, between
  the two paths (one process).

Usage: python benchmarks/splade_step.py [--rows 80] [--max-length 64] [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _setup(rows: int, max_length: int):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from potstill.assets import chatterbot_pairs, minilm_path
    from potstill.students import layers_from_teacher
    from potstill.students.splade import splade_from_encoder

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    base = layers_from_teacher(AutoModel.from_pretrained(minilm_path()), [0, 3])
    encoder = splade_from_encoder(base).eval()  # no dropout: both paths see the same network
    answers = list(dict.fromkeys(a for _, a, _ in chatterbot_pairs()))[:rows]
    batch = dict(tok(answers, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    weights = torch.rand(rows, encoder.vocab_size)
    return encoder, batch, weights


def _step(encoder, batch, weights, fused: bool) -> float:
    encoder.fused = fused
    encoder.zero_grad(set_to_none=True)
    start = time.perf_counter()
    (encoder(**batch) * weights).sum().backward()
    return time.perf_counter() - start


def _child(args: argparse.Namespace) -> None:
    encoder, batch, weights = _setup(args.rows, args.max_length)
    fused = args.child == "fused"
    base = _peak_rss()
    times = [_step(encoder, batch, weights, fused) for _ in range(1 + args.steps)][1:]  # after a warm-up step
    print(json.dumps({"seconds": statistics.median(times), "peak_extra": _peak_rss() - base,
                      "tokens": int(batch["attention_mask"].sum()), "length": int(batch["input_ids"].shape[1])}))


def _agreement(args: argparse.Namespace) -> tuple[float, float]:
    encoder, batch, weights = _setup(args.rows, args.max_length)
    out = {}
    for fused in (True, False):
        encoder.fused = fused
        encoder.zero_grad(set_to_none=True)
        w = encoder(**batch)
        (w * weights).sum().backward()
        out[fused] = (w.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
    dw = float((out[True][0] - out[False][0]).abs().max())
    # relative to the largest gradient entry of the model: some true gradients are 0 (an attention key bias
    # shifts every score of a query alike), their float noise has no scale of its own
    scale = max(float(g.abs().max()) for g in out[False][1].values())
    dg = max(float((out[True][1][n] - g).abs().max()) for n, g in out[False][1].items()) / scale
    return dw, dg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=80, help="passages per step (the ranking recipe: 16 × 5)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=("plain", "fused"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    runs: dict[str, list[dict]] = {"plain": [], "fused": []}
    for _ in range(args.rounds):
        for path in ("plain", "fused"):
            cmd = [sys.executable, __file__, "--child", path, "--rows", str(args.rows), "--max-length",
                   str(args.max_length), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=True)
            runs[path].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    dw, dg = _agreement(args)
    info = runs["plain"][0]
    print(f"SPLADE step, {args.rows} passages × {info['length']} positions ({info['tokens']} real tokens), V = 30,522")
    print("| path | step s (median) | peak extra memory |")
    print("|---|---|---|")
    for path, rs in runs.items():
        t = statistics.median(r["seconds"] for r in rs)
        m = statistics.median(r["peak_extra"] for r in rs)
        print(f"| {path} | {t:.2f} | {m / 2**20:,.0f} MiB |")
    t_ratio = (statistics.median(r["seconds"] for r in runs["fused"]) /
               statistics.median(r["seconds"] for r in runs["plain"]))
    m_ratio = (statistics.median(r["peak_extra"] for r in runs["fused"]) /
               statistics.median(r["peak_extra"] for r in runs["plain"]))
    print(f"fused / plain: time {t_ratio:.2f}×, peak extra memory {m_ratio:.2f}×")
    print(f"agreement: max |Δ weight| {dw:.2e}, max |Δ grad| / max |grad| {dg:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
