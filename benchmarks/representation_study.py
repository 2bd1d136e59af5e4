"""Representation distillation study on the real all-MiniLM-L6-v2 (issue #4 §5): which objectives and which
initialisation make the best small encoder, and where each student sits on the quality / speed Pareto front.

Every run is the demo recipe (`recipes/demo.yaml`: BBC News training text, BBC topic probe, Lee similarity
ratings, cosine / neighbour recall on held-out articles, throughput interleaved with the teacher) with these
changes, each run a fresh `python -m potstill run` process:

- students: `2x384-drop` (teacher layers 0 and 3: layer-drop init), `2x384-rand` (from_config, 2 layers, random
  init), `4x192-rand` (from_config, 4 layers × 192 with the teacher's 12 heads, now of 16, and FFN 1536; random
  init: no layer-drop init exists for a narrower width), `static` (model2vec-style static embeddings from the
  teacher, PCA 256, SIF 1e-4);
- objectives: `emb` = embedding_mse on normalised sentence vectors (through a learned projection when the
  widths differ), `+hidden` = emb + hidden_mse over the uniform layer map (projected for 192 wide), `+rel` = emb
  + minilm_relations (q-q, k-k, v-v, 12 relation heads, last layers);
- `static/data-free`: the static student as built (trainer.max_steps 0), `static/trained`: then distilled
  with `emb`;
- training: `--steps` optimizer steps (default 100, ~2 epochs) of batch 32 on the BBC training-split articles
  (`--texts`, default all 1,488; max_length 128), lr 5e-4 for every student (`--lr-scratch` sets it for the
  random-init and static students; 2e-3 collapsed the random-init 2 × 384 student to a near-constant embedding,
  probe 23.7 %), warm-up
  10 %, cosine; seeds `--seeds` (default 0 1 2).

The teacher's embeddings of the training texts are computed by the first run and copied into the others (the
embedding task checks the cache's manifest). Output: one JSON line per run in `--out` (default
runs/representation_study/results.jsonl; a run already there is skipped, so a killed study resumes), then a
table of mean ± std over seeds: BBC probe accuracy, Lee Spearman, cosine to teacher (equal widths only),
neighbour recall@10, speed-up over the teacher and parameters, and the Pareto-optimal rows (no other row is at
least as good on probe accuracy and speed-up).

Usage: python benchmarks/representation_study.py [--steps 100] [--seeds 0 1 2] [--only 2x384-drop/emb ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from study_runs import REPO, run_potstill, share_teacher_cache

STUDENTS = {
    "2x384-drop": {"init": "layers_from_teacher", "layers": [0, 3]},
    "2x384-rand": {"init": "from_config", "config": {"num_hidden_layers": 2}},
    "4x192-rand": {"init": "from_config", "config": {"num_hidden_layers": 4, "hidden_size": 192}},
    "static": {"init": "static", "config": {"pca_dims": 256, "sif_coefficient": 1e-4, "normalize": True}},
}
EMB = {"name": "embedding_mse", "params": {"normalize": True}}
OBJECTIVES = {
    "emb": [EMB],
    "+hidden": [EMB, {"name": "hidden_mse"}],
    "+rel": [EMB, {"name": "minilm_relations", "params": {"relation_heads": 12}}],
}
RUNS = [
    ("2x384-drop", "emb"), ("2x384-drop", "+hidden"), ("2x384-drop", "+rel"),
    ("2x384-rand", "emb"),
    ("4x192-rand", "emb"), ("4x192-rand", "+hidden"), ("4x192-rand", "+rel"),
    ("static", "data-free"), ("static", "emb"),
]
METRICS = ("probe_accuracy", "similarity_spearman", "cosine_to_teacher", "neighbour_recall@10")


def _overrides(student: str, objectives: str, seed: int, args: argparse.Namespace) -> list[str]:
    name = f"{student}-{objectives.strip('+')}-s{seed}"
    lr = args.lr if student == "2x384-drop" else args.lr_scratch
    sets = [f"name={name}", f"output_dir={args.runs}", f"seed={seed}", f"student={json.dumps(STUDENTS[student])}",
            f"data.train.limit={args.texts}", f"trainer.lr={lr}", f"trainer.max_steps={args.steps}",
            "data.max_length=128", "eval.probe_train.limit=600",  # pinned: the demo recipe's may change
            "trainer.log_every=25", "trainer.num_threads=2", "eval.compare_before=false"]
    if objectives == "data-free":
        sets += ["trainer.max_steps=0", f"objectives={json.dumps([EMB])}"]
    else:
        sets.append(f"objectives={json.dumps(OBJECTIVES[objectives])}")
    return sets


def _run(student: str, objectives: str, seed: int, args: argparse.Namespace) -> dict:
    sets = _overrides(student, objectives, seed, args)
    share_teacher_cache(Path(args.runs) / sets[0].split("=", 1)[1], Path(args.runs))
    summary, seconds = run_potstill(REPO / "recipes" / "demo.yaml", sets, label=f"{student} {objectives} seed {seed}")
    rows = {row["model"]: row for row in summary["table"]}
    teacher, after = rows["teacher"], rows["student (after)"]
    return {"student": student, "objectives": objectives, "seed": seed, "seconds": seconds,
            "steps": summary["steps"], "final_loss": summary.get("final_loss"),
            **{k: after.get(k) for k in (*METRICS, "params", "sentences_per_s")},
            "speedup": after["sentences_per_s"] / teacher["sentences_per_s"],
            "teacher": {k: teacher.get(k) for k in (*METRICS, "params", "sentences_per_s")}}


def _fmt(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(results: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["student"], r["objectives"]), []).append(r)
    teacher = results[0]["teacher"]
    lines = ["| student | objectives | seeds | probe acc % | Lee ρ | cos→teacher | recall@10 | speed-up | params |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| teacher (MiniLM-L6) | — | — | {100 * teacher['probe_accuracy']:.1f} | "
             f"{teacher['similarity_spearman']:.3f} | 1 | 1 | 1.00 | {teacher['params'] / 1e6:.1f} M |"]
    means = {}
    for (student, objectives), rs in groups.items():
        means[(student, objectives)] = (statistics.fmean(r["probe_accuracy"] for r in rs),
                                        statistics.fmean(r["speedup"] for r in rs))
        lines.append(f"| {student} | {objectives} | {len(rs)} | {_fmt([r['probe_accuracy'] for r in rs], 100)} | "
                     f"{_fmt([r['similarity_spearman'] for r in rs], 1, 3)} | "
                     f"{_fmt([r['cosine_to_teacher'] for r in rs], 1, 3)} | "
                     f"{_fmt([r['neighbour_recall@10'] for r in rs], 1, 3)} | "
                     f"{_fmt([r['speedup'] for r in rs], 1, 2)} | "
                     f"{rs[0]['params'] / 1e6:.1f} M |")
    pareto = [k for k, (acc, speed) in means.items()
              if not any(a >= acc and s >= speed and (a, s) != (acc, speed) for a, s in means.values())]
    lines.append("")
    lines.append("Pareto-optimal (probe accuracy vs speed-up): " +
                 ", ".join(f"{s} {o}" for s, o in sorted(pareto, key=lambda k: -means[k][1])))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--texts", type=int, default=1488)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr-scratch", type=float, default=5e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", help="student/objectives pairs, e.g. 2x384-drop/emb static/data-free")
    p.add_argument("--runs", default=str(REPO / "runs" / "representation_study"))
    p.add_argument("--out", default=None)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out or Path(args.runs) / "results.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    have = {(r["student"], r["objectives"], r["seed"]) for r in done}
    runs = [tuple(x.split("/", 1)) for x in args.only] if args.only else RUNS
    for student, objectives in [] if args.table_only else runs:
        seeds = [0] if objectives == "data-free" else args.seeds  # data-free construction has no randomness
        for seed in seeds:
            if (student, objectives, seed) in have:
                continue
            result = _run(student, objectives, seed, args)
            print(f"{student:11s} {objectives:9s} seed {seed}: probe {100 * result['probe_accuracy']:.1f} "
                  f"ρ {result['similarity_spearman']:.3f} speed-up {result['speedup']:.2f} "
                  f"({result['seconds']:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
            done.append(result)
    print()
    print(_table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
