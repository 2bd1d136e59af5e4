"""Pruned init (MiniMA's mask-gradient structured pruning) vs layer-drop init at equal parameter count, and the
DisWOT score of each candidate at initialisation against its trained quality (issue #19 §3, §2).

MiniLM (all-MiniLM-L6-v2, 22.7 M): every candidate has ~15.6 M parameters, the demo's 2-layer layer-drop student:
- `drop-0,3` / `drop-0,5`: teacher layers copied (layer-drop init);
- `prune-4L-ffn384`: 4 layers chosen by importance, 384 of 1,536 FFN neurons per layer;
- `prune-6L-h288`: all 6 layers, hidden 288 of 384 (9 of 12 heads), FFN cut to match the size;
- `prune-3L-h352`: 3 layers by importance, hidden 352 (11 heads), FFN cut to match the size.
Each is distilled with the demo recipe (`recipes/demo.yaml`: embedding_mse on normalised vectors, lr 5e-4) on
`--texts` texts of builtin:general (default 640; `--max-length` 64; batch 32; one epoch: 20 steps) and scored on
the general embedding suite (`potstill.eval.suite`): by default its quick subset `QUICK_TASKS` (8 tasks covering
the six types), `--full-suite` for all 12.

SmolLM2-135M-Instruct (134.5 M): the recipe's 7-layer slice `drop-7` (53.1 M) against `prune-7L` (7 layers chosen
by importance, nothing else cut: exactly equal size) and `prune-12L-ffn` (12 layers by importance, FFN cut to match
53.1 M), each distilled with forward KL for `--llm-steps` steps (default 10) of 4 × 64 tokens on BBC News
(`recipes/smollm2-slice.yaml` otherwise) and scored on held-out BBC perplexity and KL / token agreement with the
teacher (throughput is not measured: the study ran on a shared, loaded machine). Pruning importance: calibration
batches of the training text (MiniLM 8 of 16 texts; SmolLM2 4 of 4 texts, max_length tokens each).

DisWOT (`potstill.eval.diswot`, C × C form) scores every candidate at initialisation on 64 labelled BBC training
articles (5 topics, 128 tokens); Kendall τ between the score and the trained quality (suite average; minus
held-out perplexity) is reported per model family.

Each run is a fresh `python -m potstill run` process; results go to `--out` (JSONL; finished runs are skipped, so
a killed study resumes). Usage: python benchmarks/pruned_vs_layerdrop.py [--part minilm|llm|all] [--seed 0]
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
from study_runs import REPO, run_potstill, share_teacher_cache  # noqa: E402

MINILM = {
    "drop-0,3": {"init": "layers_from_teacher", "layers": [0, 3]},
    "drop-0,5": {"init": "layers_from_teacher", "layers": [0, 5]},
    "prune-4L-ffn384": {"init": "pruned", "config": {"num_hidden_layers": 4, "intermediate_size": 384}},
    "prune-6L-h288": {"init": "pruned", "config": {"hidden_size": 288, "num_attention_heads": 9,
                                                   "intermediate_size": 0}},  # FFN fitted to the size
    "prune-3L-h352": {"init": "pruned", "config": {"num_hidden_layers": 3, "hidden_size": 352,
                                                   "num_attention_heads": 11, "intermediate_size": 0}},
}
LLM = {
    "drop-7": {"init": "layers_from_teacher", "layers": [0, 1, 2, 3, 27, 28, 29]},
    "prune-7L": {"init": "pruned", "config": {"num_hidden_layers": 7}},
    "prune-12L-ffn": {"init": "pruned", "config": {"num_hidden_layers": 12, "intermediate_size": 0}},  # F fitted
}
CALIBRATION = {"minilm": {"calibration_batches": 8, "calibration_batch_size": 16},
               "llm": {"calibration_batches": 4, "calibration_batch_size": 4}}
# One or two tasks of each of the suite's six types (~2,300 of its ~5,900 texts); --full-suite scores all 12.
QUICK_TASKS = ["polarity-classification", "newsgroups-classification", "analogy-clustering",
               "analogy-pairclassification", "newsgroups-reranking", "newsgroups-retrieval", "wordsim-sts", "lee-sts"]


# the demo recipe as these studies measured it (the demo later moved to lr 1e-3 with a WiSE-FT mix of 0.5)
MEASURED_DEMO = ["trainer.lr=5e-4", "trainer.wise_ft_alpha=null"]


def _params_of(teacher: torch.nn.Module, student_cfg: dict) -> int:
    """Parameters of the student a recipe section builds, from its config alone (meta device)."""
    import copy

    config = copy.deepcopy(teacher.config)
    if student_cfg["init"] == "layers_from_teacher":
        config.num_hidden_layers = len(student_cfg["layers"])
    else:
        for key, value in student_cfg["config"].items():
            setattr(config, key, value)
    with torch.device("meta"):
        model = type(teacher)(config)
    return sum(p.numel() for p in model.parameters())


def _fit_ffn(teacher: torch.nn.Module, cfg: dict, target: int) -> dict:
    """cfg with intermediate_size (a multiple of 8) making the student's size closest to `target`."""
    best = min(range(8, teacher.config.intermediate_size + 1, 8),
               key=lambda f: abs(_params_of(teacher, {**cfg, "config": {**cfg["config"], "intermediate_size": f}})
                                 - target))
    return {**cfg, "config": {**cfg["config"], "intermediate_size": best}}


def _student(teacher: torch.nn.Module, cfg: dict, texts: list[str], tokenizer, kind: str, max_length: int):
    from potstill.students.build import layers_from_teacher
    from potstill.students.pruning import CALIBRATION_LOSSES, calibration_batches, prune_from_teacher

    if cfg["init"] == "layers_from_teacher":
        return layers_from_teacher(teacher, cfg["layers"])
    batches = calibration_batches(texts, tokenizer, batches=cfg["calibration_batches"],
                                  batch_size=cfg["calibration_batch_size"], max_length=max_length)
    return prune_from_teacher(teacher, cfg["config"], batches, CALIBRATION_LOSSES[kind])


def _diswot_batch(tokenizer) -> tuple[dict, torch.Tensor, int]:
    from potstill.data.loaders import load_source

    records = load_source("builtin:bbc", split="train", limit=64)
    names = sorted({r["label"] for r in records})
    enc = tokenizer([r["text"] for r in records], padding=True, truncation=True, max_length=128, return_tensors="pt")
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return batch, torch.tensor([names.index(r["label"]) for r in records]), len(names)


def _kendall(xs: list[float], ys: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(xs, ys).statistic) if len(xs) > 1 else float("nan")


def _done(out: Path) -> dict[str, dict]:
    if not out.exists():
        return {}
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


def _append(out: Path, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_part(part: str, args: argparse.Namespace) -> list[dict]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from potstill.data.loaders import load_source
    from potstill.eval.diswot import diswot_score
    from potstill.students.loading import resolve_model_path

    out, runs = Path(args.out), Path(args.runs)
    done = _done(out)
    minilm = part == "minilm"
    path = resolve_model_path("builtin:minilm" if minilm else "builtin:smollm2", field="teacher.path")
    teacher = (AutoModel if minilm else AutoModelForCausalLM).from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    space = dict(MINILM if minilm else LLM)
    reference = _params_of(teacher, space["drop-0,3" if minilm else "drop-7"])
    space = {name: _fit_ffn(teacher, cfg, reference) if cfg.get("config", {}).get("intermediate_size") == 0 else cfg
             for name, cfg in space.items()}
    train = ({"path": "builtin:general", "split": "train", "limit": args.texts} if minilm
             else {"path": "builtin:bbc", "split": "train"})
    max_length = args.max_length
    texts = [r["text"] for r in load_source(train["path"], split=train["split"], limit=16 * 8)]
    d_batch, d_labels, n_classes = _diswot_batch(tokenizer)
    rows = []
    for name, cfg in space.items():
        key = f"{part}/{name}/seed{args.seed}"
        if key in done:
            rows.append(done[key])
            continue
        if cfg["init"] == "pruned":
            cfg = {**cfg, **CALIBRATION[part]}
        student = _student(teacher, cfg, texts, tokenizer, "embedding" if minilm else "causal_lm", max_length)
        params = sum(p.numel() for p in student.parameters())
        score = diswot_score(teacher, student, d_batch, d_labels, n_classes)
        del student
        run_name = f"{'minilm' if minilm else 'llm'}-{name}-s{args.seed}".replace(",", "_")
        sets = [f"name={run_name}", f"output_dir={runs}", f"seed={args.seed}", f"student={json.dumps(cfg)}",
                f"data.max_length={max_length}"]
        if minilm:
            sets += [f"data.train={json.dumps(train)}", "data.eval.limit=100", "eval.probe_train=null",
                     "eval.probe_test=null", "eval.throughput=false", "trainer.num_threads=2", *MEASURED_DEMO]
            share_teacher_cache(runs / run_name, runs, pattern="minilm-*")
            recipe = REPO / "recipes" / "demo.yaml"
        else:
            sets += [f"trainer.max_steps={args.llm_steps}", "trainer.batch_size=4", "trainer.warmup_steps=2",
                     "eval.throughput=false"]
            recipe = REPO / "recipes" / "smollm2-slice.yaml"
        summary, seconds = run_potstill(recipe, sets, label=key)
        table = {r["model"]: r for r in summary["table"]}
        after, t_row = table["student (after)"], table["teacher"]
        row = {"key": key, "part": part, "candidate": name, "seed": args.seed, "student": cfg, "params": params,
               "diswot": score.to_dict(), "seconds": round(seconds, 1), "steps": summary.get("steps"),
               "metrics": {k: v for k, v in after.items() if isinstance(v, (int, float))},
               "teacher_metrics": {k: v for k, v in t_row.items() if isinstance(v, (int, float))}}
        if minilm:
            row["suite"] = _suite(summary["student_dir"], args)
        _append(out, row)
        rows.append(row)
        print(f"{key}: {json.dumps({k: row[k] for k in ('params', 'seconds', 'diswot')})}", flush=True)
    return rows


_TEACHER_SUITE: dict = {}


def _suite(student_dir: str, args: argparse.Namespace) -> dict:
    from potstill.eval.suite import cached_encoder, encoder_for, run_suite

    tasks = None if args.full_suite else QUICK_TASKS
    if "encode" not in _TEACHER_SUITE:
        _TEACHER_SUITE["encode"] = cached_encoder(encoder_for("builtin:minilm"))
        teacher = run_suite(_TEACHER_SUITE["encode"], teacher_encode=_TEACHER_SUITE["encode"], progress=False,
                        tasks=tasks)
        _TEACHER_SUITE["result"] = {"average": teacher.average, "per_type": teacher.per_type}
        Path(args.out).with_name("teacher_suite.json").write_text(json.dumps(_TEACHER_SUITE["result"]))
    result = run_suite(encoder_for(student_dir), teacher_encode=_TEACHER_SUITE["encode"], progress=False,
                       tasks=tasks)
    return {"average": result.average, "average_over_types": result.average_over_types,
            "per_type": result.per_type, **{k: v for k, v in result.fidelity.items() if v is not None}}


def table(rows: list[dict], part: str) -> str:
    if part == "minilm":
        lines = ["| candidate | init | params | suite avg | cls | clust | pair | rerank | retr | sts | recall@10 | "
                 "DisWOT |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            t = r["suite"]["per_type"]
            lines.append(f"| {r['candidate']} | {r['student']['init']} | {r['params'] / 1e6:.2f} M | "
                         f"{r['suite']['average']:.3f} | " + " | ".join(
                             f"{t.get(k, float('nan')):.3f}" for k in ("classification", "clustering",
                                                                        "pair_classification", "reranking",
                                                                        "retrieval", "sts")) +
                         f" | {r['suite'].get('neighbour_recall@10', float('nan')):.3f} | "
                         f"{r['diswot']['score']:.4f} |")
        quality = [r["suite"]["average"] for r in rows]
    else:
        lines = ["| candidate | init | params | perplexity | KL to teacher | token agreement | DisWOT |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            m = r["metrics"]
            lines.append(f"| {r['candidate']} | {r['student']['init']} {json.dumps(r['student'].get('config', ''))}"
                         f" | {r['params'] / 1e6:.2f} M | {m.get('perplexity', float('nan')):.1f} | "
                         f"{m.get('kl_to_teacher', float('nan')):.3f} | {m.get('token_agreement', float('nan')):.3f} "
                         f"| {r['diswot']['score']:.4f} |")
        quality = [-r["metrics"].get("perplexity", float("nan")) for r in rows]
    tau = _kendall([r["diswot"]["score"] for r in rows], quality)
    lines.append(f"\nKendall τ (DisWOT score vs trained quality) over {len(rows)} candidates: {tau:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["minilm", "llm", "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texts", type=int, default=640)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--full-suite", action="store_true")
    parser.add_argument("--llm-steps", type=int, default=10)
    parser.add_argument("--runs", default=str(REPO / "runs" / "pruned_vs_layerdrop"))
    parser.add_argument("--out", default=str(REPO / "runs" / "pruned_vs_layerdrop" / "results.jsonl"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    start = time.perf_counter()
    for part in (["minilm", "llm"] if args.part == "all" else [args.part]):
        rows = run_part(part, args)
        print(f"\n## {part} (seed {args.seed})\n\n{table(rows, part)}\n", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
