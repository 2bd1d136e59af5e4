"""Retrieval distillation study on real text (issue #5 §6): chatterbot questions → answers, the real
all-MiniLM-L6-v2 bi-encoder as teacher, every run `recipes/chatterbot-rank.yaml` with one change, each a fresh
`python -m potstill run` process.

Methods (`--only` names):
- `margin_mse`: the recipe, 2-layer layer-drop bi-encoder (teacher layers 0 and 3), 4 teacher-mined negatives
  per question, Margin-MSE (Hofstätter et al. 2020);
- `listwise_kl`: KL(softmax(t/T) ‖ softmax(s/T)) over each question's 5 candidates, T = 0.05 (the teacher's
  dot products of unit vectors span < 1, so T = 1 would make both distributions near uniform; 1/0.05 = 20 is
  sentence-transformers' scale for cosine scores);
- `tas_b`: TAS-Balanced (Hofstätter et al. 2021): topic-clustered batches, one negative per question drawn
  over margin bins, Margin-MSE + 0.75 · in-batch Margin-MSE (teacher scores of every question × in-batch
  answer from its cached vectors);
- `labels`: no teacher, contrastive cross-entropy on the labels with the 4 mined negatives and the other
  in-batch answers (sentence-transformers' MultipleNegativesRankingLoss);
- `cross_encoder`: a cross-encoder student built from all of MiniLM's weights (6 layers + a new 1-logit
  head), Margin-MSE; it reranks candidates only, so it has no collection-retrieval metrics;
- `splade_free`: an inference-free sparse student (layer-drop encoder + a new MLM head tied to MiniLM's word
  embeddings, started lexical and calibrated to ~128 active terms; SPLADE-max document weights; a question's
  weights are the collection IDF of its tokens), Margin-MSE + 0.001 · sparse_flops (λ warm-up 20 steps), at a
  smaller budget than the others (60 steps of 16 questions: one SPLADE step costs ~10× a dense one here).

Interpolation vs extrapolation (methods-b §25, ReSTTest-style): all 2,025 chatterbot pairs, questions embedded
by the teacher, k-means into 5 buckets; `extrapolation` tests on the largest bucket and trains on the other
four, `interpolation` tests on a random sample of the same size and trains on the rest. `margin_mse@…` and
`labels@…` run on both; the split files and their mean max-cosine of test to training questions go to
`<runs>/splits/`.

Output: one JSON line per run in `<runs>/results.jsonl` (a run already there is skipped, so a killed study
resumes), then a table: collection MRR@10 / nDCG@10 / Recall@10 over all answers of train + eval, rerank MRR@10
of the 5 candidates, Kendall τ and top-10 overlap with the teacher, queries/s and the ratio to the teacher
(measured interleaved in the same run), training seconds.

Usage: python benchmarks/ranking_study.py [--only margin_mse tas_b ...] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from study_runs import REPO, run_potstill

RECIPE = REPO / "recipes" / "chatterbot-rank.yaml"

MARGIN = '[{"name": "margin_mse"}]'
LABELS = ["objectives=[]", "trainer.hard_label_weight=1", "ranking.in_batch_negatives=true"]
METHODS: dict[str, list[str]] = {
    "margin_mse": [],
    "listwise_kl": ['objectives=[{"name": "listwise_kl", "params": {"temperature": 0.05}}]'],
    "tas_b": ["ranking.sampler=tas_balanced",
              'objectives=[{"name": "margin_mse"}, {"name": "in_batch_margin_mse", "weight": 0.75}]'],
    "labels": LABELS,
    "cross_encoder": ['student={"init": "pretrained", "path": "builtin:minilm"}', "ranking.student_type=cross_encoder"],
    "splade_free": ["ranking.student_type=splade", "ranking.inference_free=true", "trainer.batch_size=16",
                    "trainer.max_steps=60",
                    'objectives=[{"name": "margin_mse"}, {"name": "sparse_flops", "weight": 0.001, '
                    '"params": {"warmup_steps": 20}}]'],
}
SPLIT_METHODS = ("margin_mse", "labels")
SPLITS = ("interpolation", "extrapolation")
METRICS = ("mrr@10", "ndcg@10", "recall@10", "rerank_mrr@10", "teacher_kendall_tau", "teacher_top10_overlap",
           "passage_active_terms", "query_active_terms")


def _write_splits(folder: Path, seed: int) -> dict[str, dict]:
    """Interpolation and extrapolation train/test JSONL files of all chatterbot pairs; returns their stats."""
    from sentence_transformers import SentenceTransformer

    from potstill.assets import chatterbot_pairs, minilm_path
    from potstill.data.splits import interpolation_extrapolation_splits

    stats_path = folder / "splits.json"
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    pairs = chatterbot_pairs()
    encoder = SentenceTransformer(str(minilm_path()), device="cpu")
    emb = encoder.encode([q for q, _, _ in pairs], batch_size=64, convert_to_numpy=True)
    both = interpolation_extrapolation_splits(emb, n_buckets=5, fold=0, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in (both.interpolation, both.extrapolation):
        for part, idx in (("train", split.train), ("test", split.test)):
            rows = [{"query": pairs[i][0], "positive": pairs[i][1], "topic": pairs[i][2]} for i in idx.tolist()]
            (folder / f"{split.kind}_{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        stats[split.kind] = {"train": int(split.train.size), "test": int(split.test.size),
                             "mean_max_similarity": split.mean_max_similarity}
    stats_path.write_text(json.dumps(stats, indent=2))
    return stats


def _run(name: str, seed: int, args: argparse.Namespace) -> dict:
    method, _, split = name.partition("@")
    run_name = f"{name.replace('@', '-')}-s{seed}"
    sets = [f"name={run_name}", f"output_dir={args.runs}", f"seed={seed}", *METHODS[method]]
    if split:
        folder = Path(args.runs) / "splits"
        sets += [f"data.train={json.dumps({'path': str(folder / f'{split}_train.jsonl')})}",
                 f"data.eval={json.dumps({'path': str(folder / f'{split}_test.jsonl')})}"]
    summary, seconds = run_potstill(RECIPE, sets, label=f"{name} seed {seed}")
    rows = {row["model"]: row for row in summary["table"]}
    teacher, before, after = rows["teacher"], rows.get("student (before)", {}), rows["student (after)"]
    return {"method": name, "seed": seed, "seconds": seconds, "steps": summary["steps"],
            "train_seconds": summary.get("train_seconds"), "params": after.get("params"),
            "queries_per_s": after.get("queries_per_s"),
            "speedup": after["queries_per_s"] / teacher["queries_per_s"] if teacher.get("queries_per_s") else None,
            **{k: after.get(k) for k in METRICS},
            "before": {k: before.get(k) for k in METRICS},
            "teacher": {k: teacher.get(k) for k in (*METRICS, "params", "queries_per_s")}}


def _fmt(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(results: list[dict]) -> str:
    cols = ("mrr@10", "ndcg@10", "recall@10", "rerank_mrr@10", "teacher_kendall_tau", "teacher_top10_overlap")
    head = ("| method | seeds | MRR@10 | nDCG@10 | R@10 | rerank MRR@10 | τ teacher | top-10 overlap | q/s | "
            "× teacher | train s |")
    lines = [head, "|" + "---|" * 11]
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["method"], []).append(r)
    shown_teacher: set[str] = set()
    for name, rs in groups.items():
        split = name.partition("@")[2] or "validation"
        if split not in shown_teacher:
            t = rs[0]["teacher"]
            lines.append(f"| teacher ({split}) | — | " + " | ".join(_fmt([t.get(c)]) for c in cols) +
                         f" | {_fmt([t.get('queries_per_s')], 0)} | 1 | — |")
            shown_teacher.add(split)
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(_fmt([r.get(c) for r in rs]) for c in cols) +
                     f" | {_fmt([r['queries_per_s'] for r in rs], 0)} | {_fmt([r['speedup'] for r in rs], 2)} | "
                     f"{_fmt([r['train_seconds'] for r in rs], 0)} |")
    sparse = [r for r in results if r.get("passage_active_terms") is not None]
    for r in sparse:
        lines.append(f"\n{r['method']} seed {r['seed']}: {r['passage_active_terms']:.0f} active terms per answer, "
                     f"{r['query_active_terms']:.1f} per question")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", help="methods, e.g. margin_mse tas_b labels@extrapolation")
    p.add_argument("--runs", default=str(REPO / "runs" / "ranking_study"))
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    out = Path(args.runs) / "results.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    have = {(r["method"], r["seed"]) for r in done}
    names = args.only or [*METHODS, *(f"{m}@{s}" for m in SPLIT_METHODS for s in SPLITS)]
    unknown = [n for n in names if n.partition("@")[0] not in METHODS or n.partition("@")[2] not in ("", *SPLITS)]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}, optionally @interpolation / "
                f"@extrapolation")
    if not args.table_only and any("@" in n for n in names):
        stats = _write_splits(Path(args.runs) / "splits", seed=0)
        print("splits:", json.dumps(stats), flush=True)
    for name in [] if args.table_only else names:
        for seed in args.seeds:
            if (name, seed) in have:
                continue
            result = _run(name, seed, args)
            print(f"{name:28s} seed {seed}: MRR@10 {_fmt([result['mrr@10']])} rerank {result['rerank_mrr@10']:.3f} "
                  f"τ {_fmt([result['teacher_kendall_tau']])} ({result['seconds']:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
            done.append(result)
    print()
    print(_table(done))
    splits = Path(args.runs) / "splits" / "splits.json"
    if splits.exists():
        print("\nsplits (mean max cosine of test to training questions):", splits.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
