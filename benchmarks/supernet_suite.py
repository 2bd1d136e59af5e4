"""Does AutoDistil's supernet rank MiniLM students by their *trained suite quality*? (issue #19's proxy target:
Kendall τ ≥ 0.6 against trained quality over ≥ 12 candidates.)

`benchmarks/autodistil_supernet.py` checks the paper's claim on its own terms (the supernet's ranking against each
subnet's distillation loss when trained alone). Here the yardstick is the one `benchmarks/search_proxies.py` uses
for the other proxies: each candidate distilled with the demo recipe and scored on the general suite's quick subset.

Candidates: 12 subnets of all-MiniLM-L6-v2's elastic space (`CANDIDATES`: depth 1-6, width 192-384, FFN 384-1536;
depth L keeps L layers spread from the first to the last, width and FFN keep the leading dimensions, as
`potstill.students.supernet` slices them). For each:
- proxy `supernet`: its held-out relation loss as a slice of a supernet trained `--supernet-steps` sandwich steps
  (the autodistil_supernet settings: q/k/v relation MSE of the last layer, general texts at 32 tokens, batch 8,
  64 BBC validation articles held out); lower is better, so τ is taken on its negation;
- proxy `init`: the same loss as a slice of the untrained copy (the teacher's own weights);
- trained quality: the slice of the teacher's weights saved as a student folder (`student.init: pretrained`) and
  distilled with `recipes/demo.yaml` on `--texts` builtin:general texts at `--max-length` tokens (one epoch of
  batch 32; a narrower student reaches the teacher's vectors through the embedding task's learned projection),
  then the suite's quick subset (`pruned_vs_layerdrop.QUICK_TASKS`) average.
Rows are appended to `--out` (JSONL); finished candidates are skipped, so a killed run resumes.

Usage: python benchmarks/supernet_suite.py [--supernet-steps 60] [--texts 640] [--max-length 64] [--seed 0]
       python benchmarks/supernet_suite.py --supernet-steps 240 --rescore   # new proxies, the trained rows kept
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import autodistil_supernet as ad  # noqa: E402
from pruned_vs_layerdrop import QUICK_TASKS, _kendall  # noqa: E402
from study_runs import REPO, share_teacher_cache  # noqa: E402

from potstill.students.supernet import ElasticBert, Subnet  # noqa: E402

CANDIDATES = [Subnet(1, 384, 1536), Subnet(2, 384, 1536), Subnet(3, 384, 1536), Subnet(4, 384, 1536),
              Subnet(6, 384, 1536), Subnet(2, 192, 768), Subnet(2, 288, 384), Subnet(3, 288, 1536),
              Subnet(4, 192, 384), Subnet(4, 384, 768), Subnet(6, 192, 1536), Subnet(3, 384, 384)]


def _done(out: Path) -> dict[str, dict]:
    if not out.exists():
        return {}
    return {r["candidate"]: r for r in (json.loads(x) for x in out.read_text().splitlines() if x.strip())}


def proxies(teacher, tokenizer, untrained: ElasticBert, steps: int, seed: int) -> dict[str, dict[str, float]]:
    """The supernet and init proxies (held-out relation loss) of every candidate; `untrained` is the supernet
    over an untouched copy of the teacher."""
    from potstill.data.loaders import load_source

    general = [r["text"] for r in load_source("builtin:general", split="train", limit=4000)]
    bbc = [r["text"] for r in load_source("builtin:bbc", split="validation", limit=64)]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train_data = ad.batches(tokenizer, random.Random(seed).sample(general, steps * ad.BATCH))
    held_data = ad.batches(tokenizer, bbc)
    train_targets, held_targets = ad.teacher_qkv(teacher, train_data), ad.teacher_qkv(teacher, held_data)
    supernet = ElasticBert(copy.deepcopy(teacher).requires_grad_(True), ad.SPACE)
    ad.train(supernet, lambda _step: ad.SPACE.sample(rng, n_random=2), train_data, train_targets)
    return {c.label: {"supernet": ad.heldout(supernet, c, held_data, held_targets),
                      "init": ad.heldout(untrained, c, held_data, held_targets)} for c in CANDIDATES}


def table(rows: list[dict]) -> str:
    lines = ["| candidate | params | supernet loss | init loss | suite avg (trained) |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["suite_average"]):
        lines.append(f"| {r['candidate']} | {r['params'] / 1e6:.2f} M | {r['supernet']:.4f} | {r['init']:.4f} | "
                     f"{r['suite_average']:.3f} |")
    quality = [r["suite_average"] for r in rows]
    lines.append("")
    for proxy in ("supernet", "init"):
        tau = _kendall([-r[proxy] for r in rows], quality)
        lines.append(f"Kendall τ (−{proxy} loss vs trained suite average) over {len(rows)} candidates: {tau:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernet-steps", type=int, default=60)
    parser.add_argument("--texts", type=int, default=640)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=str(REPO / "runs" / "supernet_suite"))
    parser.add_argument("--out", default=str(REPO / "runs" / "supernet_suite" / "results.jsonl"))
    parser.add_argument("--rescore", action="store_true", help="recompute the proxies of the finished candidates "
                        "(e.g. with another --supernet-steps) and keep their trained quality")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    from potstill.config import load_recipe
    from potstill.eval.suite import cached_encoder, encoder_for, run_suite
    from potstill.students.loading import resolve_model_path
    from potstill.train import run_recipe

    logging.disable_progress_bar()
    out, runs = Path(args.out), Path(args.runs)
    done = _done(out)
    path = resolve_model_path("builtin:minilm", field="teacher.path")
    teacher, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    untrained = ElasticBert(copy.deepcopy(teacher).requires_grad_(False), ad.SPACE)
    scores = proxies(teacher, tokenizer, untrained, args.supernet_steps, args.seed) \
        if args.rescore or len(done) < len(CANDIDATES) else {}
    print(f"supernet ({args.supernet_steps} steps) trained and every candidate scored in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    if args.rescore:
        from potstill.io import atomic_write_text

        for label, row in done.items():
            row.update(scores[label], supernet_steps=args.supernet_steps)
        atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in done.values()))
    teacher_encode = cached_encoder(encoder_for("builtin:minilm"))
    train = {"path": "builtin:general", "split": "train", "limit": args.texts}
    for c in CANDIDATES:
        if c.label in done:
            continue
        tick = time.perf_counter()
        folder = runs / "students" / c.label
        student = untrained.extract(c)
        student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        run_name = f"supernet-{c.label}-s{args.seed}"
        share_teacher_cache(runs / run_name, runs, pattern="supernet-*")
        sets = [f"name={run_name}", f"output_dir={runs}", f"seed={args.seed}", "student=null",
                f"student={json.dumps({'init': 'pretrained', 'path': str(folder)})}",
                f"data.max_length={args.max_length}", f"data.train={json.dumps(train)}", "data.eval.limit=64",
                "eval.probe_train=null", "eval.probe_test=null", "eval.throughput=false",
                "eval.compare_before=false", "trainer.num_threads=2"]
        summary = run_recipe(load_recipe(REPO / "recipes" / "demo.yaml", sets), overwrite=True)
        suite = run_suite(encoder_for(summary["student_dir"]), teacher_encode=teacher_encode, progress=False,
                          tasks=QUICK_TASKS)
        row = {"candidate": c.label, "params": sum(p.numel() for p in student.parameters()), "seed": args.seed,
               "supernet_steps": args.supernet_steps, **scores[c.label], "suite_average": suite.average,
               "per_type": suite.per_type, "steps": summary["steps"], "seconds": round(time.perf_counter() - tick, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[c.label] = row
        print(f"{c.label}: suite {suite.average:.3f}  supernet {row['supernet']:.4f}  init {row['init']:.4f} "
              f"({row['seconds']} s)", flush=True)
    print(table(list(done.values())))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
