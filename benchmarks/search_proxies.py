"""Which cheap proxy predicts a MiniLM student's trained quality? Kendall τ of three proxies over 12 candidates
(issue #19 §2: "report each proxy's Kendall τ against fully trained quality on the same candidates").

Candidates: students of all-MiniLM-L6-v2 of 1-4 layers built four ways (`CANDIDATES`: layer-drop with various
layers, mask-gradient pruned, random init from the teacher's config). Each is distilled with the demo recipe
(`recipes/demo.yaml`: embedding_mse on normalised vectors, lr 5e-4) on `--texts` texts of builtin:general at
`--max-length` tokens, one epoch of batch 32 (default 640 texts, 64 tokens: 20 steps), and scored on the general
suite's quick subset (`pruned_vs_layerdrop.QUICK_TASKS`, 8 tasks of the six types): the "trained quality".

Proxies, all taken before or early in that same run:
- `diswot`: the DisWOT score at initialisation (`potstill.eval.diswot`, C × C form, 64 labelled BBC articles);
- `heldout@0`: cosine to the teacher's vectors on `--eval-texts` held-out BBC validation articles at init
  (= −½·held-out distillation loss + 1 for embedding_mse on unit vectors);
- `heldout@k`: the same after `--k` optimizer steps (the run's own evaluation at step k, `eval.every`).

Runs are in-process, one after the other, each its own run folder under `--runs`; rows are appended to `--out`
(JSONL) and finished candidates are skipped, so a killed study resumes.
Usage: python benchmarks/search_proxies.py [--k 5] [--texts 640] [--max-length 64]
       python benchmarks/search_proxies.py --score-trials runs/search-minilm 0 1 13   # a search's trial students
                                                                                      # on the same suite subset
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pruned_vs_layerdrop import MEASURED_DEMO, QUICK_TASKS, _diswot_batch, _kendall, _student  # noqa: E402
from study_runs import REPO, share_teacher_cache  # noqa: E402

PRUNE = {"calibration_batches": 8, "calibration_batch_size": 16}
CANDIDATES: dict[str, dict] = {
    "drop-0,3": {"init": "layers_from_teacher", "layers": [0, 3]},
    "drop-0,5": {"init": "layers_from_teacher", "layers": [0, 5]},
    "drop-0,1": {"init": "layers_from_teacher", "layers": [0, 1]},
    "drop-4,5": {"init": "layers_from_teacher", "layers": [4, 5]},
    "drop-2,5": {"init": "layers_from_teacher", "layers": [2, 5]},
    "drop-5": {"init": "layers_from_teacher", "layers": [5]},
    "drop-0,2,5": {"init": "layers_from_teacher", "layers": [0, 2, 5]},
    "drop-0,1,2,3": {"init": "layers_from_teacher", "layers": [0, 1, 2, 3]},
    "prune-2L": {"init": "pruned", "config": {"num_hidden_layers": 2}, **PRUNE},
    "prune-4L-ffn384": {"init": "pruned", "config": {"num_hidden_layers": 4, "intermediate_size": 384}, **PRUNE},
    "prune-3L-ffn768": {"init": "pruned", "config": {"num_hidden_layers": 3, "intermediate_size": 768}, **PRUNE},
    "random-2L": {"init": "from_config", "config": {"num_hidden_layers": 2}},
}
# run only when named in --only: the shape `potstill search` found to dominate the demo's default (trial 13)
EXTRA_CANDIDATES: dict[str, dict] = {
    "prune-2L-ffn384": {"init": "pruned", "config": {"num_hidden_layers": 2, "intermediate_size": 384}, **PRUNE},
}


def _done(out: Path) -> dict[str, dict]:
    if not out.exists():
        return {}
    return {r["candidate"]: r for r in (json.loads(x) for x in out.read_text().splitlines() if x.strip())}


def _metrics_at(run_dir: Path, step: int, key: str) -> float | None:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == step and f"eval/{key}" in row:
            return float(row[f"eval/{key}"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--texts", type=int, default=640)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-texts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="candidate names (default: the 12 of CANDIDATES; "
                        "EXTRA_CANDIDATES only by name)")
    parser.add_argument("--runs", default=str(REPO / "runs" / "search_proxies"))
    parser.add_argument("--out", default=str(REPO / "runs" / "search_proxies" / "results.jsonl"))
    parser.add_argument("--score-trials", nargs="+", metavar=("STUDY_DIR", "TRIAL"),
                        help="only score these trials' saved students of a `potstill search` study on the suite subset")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    if args.score_trials:
        score_trials(Path(args.score_trials[0]), [int(n) for n in args.score_trials[1:]])
        return
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    from potstill.config import load_recipe
    from potstill.data.loaders import load_source
    from potstill.eval.diswot import diswot_score
    from potstill.eval.suite import cached_encoder, encoder_for, run_suite
    from potstill.students.loading import resolve_model_path
    from potstill.train import run_recipe

    logging.disable_progress_bar()
    out, runs = Path(args.out), Path(args.runs)
    done = _done(out)
    path = resolve_model_path("builtin:minilm", field="teacher.path")
    teacher, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    train = {"path": "builtin:general", "split": "train", "limit": args.texts}
    texts = [r["text"] for r in load_source("builtin:general", split="train", limit=16 * 8)]
    d_batch, d_labels, n_classes = _diswot_batch(tokenizer)
    teacher_encode = cached_encoder(encoder_for("builtin:minilm"))
    start = time.perf_counter()
    wanted = args.only or list(CANDIDATES)
    for name, cfg in {**CANDIDATES, **EXTRA_CANDIDATES}.items():
        if name not in wanted or name in done:
            continue
        tick = time.perf_counter()
        if cfg["init"] == "from_config":
            from potstill.students.build import from_config

            torch.manual_seed(args.seed)
            student = from_config(teacher, **cfg["config"])
        else:
            student = _student(teacher, cfg, texts, tokenizer, "embedding", args.max_length)
        params = sum(p.numel() for p in student.parameters())
        torch.manual_seed(args.seed)
        score = diswot_score(teacher, student, d_batch, d_labels, n_classes)
        del student
        run_name = f"proxy-{name}-s{args.seed}".replace(",", "_")
        share_teacher_cache(runs / run_name, runs, pattern="proxy-*")
        sets = [f"name={run_name}", f"output_dir={runs}", f"seed={args.seed}", "student=null",  # replace, not merge
                f"student={json.dumps(cfg)}",
                f"data.max_length={args.max_length}", f"data.train={json.dumps(train)}",
                f"data.eval.limit={args.eval_texts}", "eval.probe_train=null", "eval.probe_test=null",
                "eval.throughput=false", "eval.compare_before=true", f"eval.every={args.k}", "trainer.num_threads=2",
                *MEASURED_DEMO]
        recipe = load_recipe(REPO / "recipes" / "demo.yaml", sets)
        summary = run_recipe(recipe, overwrite=True)
        run_dir = runs / run_name
        suite = run_suite(encoder_for(summary["student_dir"]), teacher_encode=teacher_encode, progress=False,
                          tasks=QUICK_TASKS)
        row = {"candidate": name, "student": cfg, "params": params, "seed": args.seed, "k": args.k,
               "diswot": score.score, "heldout@0": _metrics_at(run_dir, 0, "cosine_to_teacher"),
               f"heldout@{args.k}": _metrics_at(run_dir, args.k, "cosine_to_teacher"),
               "heldout@end": _metrics_at(run_dir, summary["steps"], "cosine_to_teacher"),
               "steps": summary["steps"], "suite_average": suite.average, "per_type": suite.per_type,
               "seconds": round(time.perf_counter() - tick, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[name] = row
        print(f"{name}: suite {suite.average:.3f} diswot {score.score:.4f} heldout@0 {row['heldout@0']} "
              f"heldout@{args.k} {row[f'heldout@{args.k}']} ({row['seconds']} s)", flush=True)
    print(table(list(done.values()), args.k))
    print(f"total {time.perf_counter() - start:.0f} s")


def score_trials(study_dir: Path, numbers: list[int]) -> None:
    from potstill.eval.suite import cached_encoder, encoder_for, run_suite

    teacher = cached_encoder(encoder_for("builtin:minilm"))
    for n in numbers:
        result = run_suite(encoder_for(study_dir / "trials" / f"trial-{n:04d}" / "student"), teacher_encode=teacher,
                           progress=False, tasks=QUICK_TASKS)
        print(json.dumps({"trial": n, "average": round(result.average, 4),
                          "per_type": {k: round(v, 3) for k, v in result.per_type.items()}}), flush=True)


def table(rows: list[dict], k: int) -> str:
    lines = [f"| candidate | params | DisWOT | held-out cos @0 | held-out cos @{k} | suite avg (trained) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["suite_average"]):
        lines.append(f"| {r['candidate']} | {r['params'] / 1e6:.2f} M | {r['diswot']:.4f} | {r['heldout@0']:.3f} | "
                     f"{r[f'heldout@{k}']:.3f} | {r['suite_average']:.3f} |")
    quality = [r["suite_average"] for r in rows]
    lines.append("")
    for proxy in ("diswot", "heldout@0", f"heldout@{k}"):
        lines.append(f"Kendall τ ({proxy} vs trained suite average) over {len(rows)} candidates: "
                     f"{_kendall([r[proxy] for r in rows], quality):.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
