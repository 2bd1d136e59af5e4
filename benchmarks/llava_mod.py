"""LLaVA-MoD's two stages on text (issue #21 §2): a sparse mixture-of-experts student against a dense student of
equal active size (stage 1, mimic distillation), then preference distillation against more mimic (stage 2).

The claims under test (Shu et al. 2024, "LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation"):
1. a sparse MoE student distils better than a dense student with the same parameters active per token;
2. preference distillation with the teacher as the DPO reference improves the mimic-distilled student's
   preference judgements beyond what further mimic distillation does.

Setup (every run is a packaged recipe through `potstill.train.run_recipe`, what `potstill run` does):
- Stage 1, `recipes/smollm2-moe.yaml` as shipped: SmolLM2-135M-Instruct → a Mixtral student (4 layers, width 192,
  4 experts of FFN 384, top-2: 13.4M parameters, 11.6M active per token) with forward KL on the teacher's
  top-64 cache + LM cross-entropy + moe_router_aux (0.01), 300 steps of 8 blocks of 128 BBC tokens. "dense": the
  same recipe with a Llama student of the same width and depth and one FFN of 768 (= 2 experts × 384 active:
  11.6M parameters) and no router loss. Same cache, data order, steps and learning rate.
- Stage 2, `recipes/smollm2-moe-dpo.yaml` as shipped, from each seed's MoE student: "dpo" = dpo_teacher_ref
  (sigmoid DPO, β 0.1, the teacher as reference) on `builtin:bbc-continuations` pairs, 100 steps of 8 pairs;
  "mimic" = the same run with forward_kl to the teacher on the chosen completions instead (equal data and steps);
  "dpo+klW" = the recipe's DPO with forward_kl on the chosen completions beside it at weight W, an anchor that keeps
  the student a language model while DPO moves its preferences (as RPO adds an NLL term to DPO).
- Scores: the LM suite (`potstill eval --suite lm`: perplexity, KL and top-1 agreement on Lee / Newsgroups /
  fortunes; continuation and QA multiple choice), none of it BBC text; stage 2 also the held-out preference
  accuracy on 100 validation pairs (log p(chosen) > log p(rejected)) from the run's own table.

Results go to `<out>/results.json`; finished runs of the same settings are reused, so a killed sweep resumes
(a run it left half done starts again). Usage:
    python benchmarks/llava_mod.py --cache runs/smollm2-topk64 [--out runs/llava-mod] [--seeds 0 1 2]
        [--threads 1] [--stages 1 2] [--stage1-steps N] [--stage2-steps N] [--variants moe dense dpo mimic dpo+kl0.1]
`--cache` is built first when missing (`potstill cache recipes/smollm2-moe.yaml --out DIR`, ~10 min).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from _llm_common import earlier_results, fmt_mean_std  # noqa: E402

from potstill.config import load_recipe  # noqa: E402
from potstill.io import atomic_write_text  # noqa: E402

STAGE1, STAGE2 = REPO / "recipes" / "smollm2-moe.yaml", REPO / "recipes" / "smollm2-moe-dpo.yaml"
DENSE_STUDENT = {"model_type": "llama", "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4,
                 "num_attention_heads": 3, "num_key_value_heads": 1, "max_position_embeddings": 256,
                 "tie_word_embeddings": True}
ANCHORED = "dpo+kl"  # a stage-2 variant named dpo+klW: DPO plus forward_kl at weight W


def variant_name(text: str) -> str:
    """`--variants` entries: the four runs of the claims, or an anchored DPO with its weight."""
    if text in ("moe", "dense", "dpo", "mimic"):
        return text
    try:
        if text.startswith(ANCHORED) and float(text[len(ANCHORED):]) >= 0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected moe, dense, dpo, mimic or dpo+klW (W a weight ≥ 0)")


def stage_recipe(path: Path, variant: str, *, seed: int, out: Path, args: argparse.Namespace) -> Any:
    """The packaged recipe of a stage with this variant's `--set` overrides (what a user would type)."""
    sets = [f"seed={seed}", f"output_dir={out}", f"name={variant}-s{seed}", f"trainer.num_threads={args.threads}"]
    steps = args.stage1_steps if path == STAGE1 else args.stage2_steps
    if steps is not None:
        sets.append(f"trainer.max_steps={steps}")
    if path == STAGE1:
        sets.append(f"teacher.cache={args.cache}")
        if variant == "dense":  # null first: a mapping given to --set is merged into the one there
            sets += ["student.config=null", f"student.config={json.dumps(DENSE_STUDENT)}",
                     'objectives=[{"name": "forward_kl", "params": {"chunk_size": 256}}]']
    else:
        sets.append(f"student.path={out / f'moe-s{seed}' / 'student'}")
        if variant == "mimic":
            sets.append('objectives=[{"name": "forward_kl"}]')
        elif variant.startswith(ANCHORED):
            shipped = [o.model_dump(exclude_defaults=True) for o in load_recipe(path).objectives]
            objectives = shipped + [{"name": "forward_kl", "weight": float(variant[len(ANCHORED):])}]
            sets.append(f"objectives={json.dumps(objectives)}")
    return load_recipe(path, sets)


def suite_scores(run_dir: Path) -> dict[str, float]:
    from potstill.evaluate import evaluate_lm_suite

    result = evaluate_lm_suite(run_dir, progress=False)
    sources = result["student"]["sources"]
    scores = {f"perplexity {name}": sources[name]["perplexity"] for name in ("lee", "newsgroups", "fortunes")}
    for key in ("kl_to_teacher", "top1_agreement"):
        scores[f"{key} mean"] = statistics.mean(s[key] for s in sources.values())
    for task, value in result["student"]["multiple_choice"].items():
        scores[f"choice accuracy {task}"] = value["accuracy"]
    for task, value in result["teacher"]["multiple_choice"].items():
        scores[f"teacher choice accuracy {task}"] = value["accuracy"]
    return scores


def run_one(path: Path, variant: str, seed: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from potstill.train import run_recipe

    start = time.perf_counter()
    # overwrite: a run a killed sweep left half done starts again (results.json holds only finished runs)
    summary = run_recipe(stage_recipe(path, variant, seed=seed, out=out, args=args), overwrite=True)
    row: dict[str, Any] = {"seconds": time.perf_counter() - start, "train_seconds": summary["train_seconds"]}
    table = {r["model"]: r for r in summary["table"]}
    after = table.get("student (after)", {})
    for key in ("perplexity", "kl_to_teacher", "preference_accuracy", "params"):
        if key in after:
            row[f"validation {key}"] = after[key]
    if "preference_accuracy" in table.get("student (before)", {}):
        row["validation preference_accuracy before"] = table["student (before)"]["preference_accuracy"]
        row["teacher preference_accuracy"] = table["teacher"]["preference_accuracy"]
    row.update(suite_scores(out / f"{variant}-s{seed}"))
    return row


def print_table(results: dict[str, dict[str, Any]], variants: list[str], seeds: list[int]) -> None:
    keys = [k for k in next(iter(results.values())) if k not in ("seconds", "validation params")]
    print("| measure | " + " | ".join(variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for key in keys:
        cells = []
        for variant in variants:
            values = [results[f"{variant}-s{s}"][key] for s in seeds if key in results.get(f"{variant}-s{s}", {})]
            cells.append(fmt_mean_std(values, 3) if values else "—")
        print(f"| {key} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="the teacher's top-64 cache (built when missing)")
    parser.add_argument("--out", type=Path, default=Path("runs/llava-mod"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--stage1-steps", type=int, help="instead of smollm2-moe.yaml's 300")
    parser.add_argument("--stage2-steps", type=int, help="instead of smollm2-moe-dpo.yaml's 100")
    parser.add_argument("--variants", type=variant_name, nargs="+", default=["moe", "dense", "dpo", "mimic"],
                        help="runs to make: moe and dense (stage 1), dpo, mimic and dpo+klW (stage 2)")
    args = parser.parse_args()
    args.out, args.cache = args.out.resolve(), args.cache.resolve()
    if not (args.cache / "manifest.json").is_file():
        from potstill.cli import main as potstill

        if potstill(["cache", str(STAGE1), "--out", str(args.cache)]) != 0:
            raise SystemExit(f"could not build the teacher cache at {args.cache}")
    results_file = args.out / "results.json"
    settings = {"cache": str(args.cache), "threads": args.threads, "stage1_steps": args.stage1_steps,
                "stage2_steps": args.stage2_steps}
    record = earlier_results(results_file, settings)  # finished runs of the same settings are reused
    results = record["runs"]
    stages = {1: (STAGE1, [v for v in args.variants if v in ("moe", "dense")]),
              2: (STAGE2, [v for v in args.variants if v not in ("moe", "dense")])}
    for stage in sorted(args.stages):
        path, variants = stages[stage]
        for seed in args.seeds:
            for variant in variants:
                key = f"{variant}-s{seed}"
                if key in results:
                    continue
                if stage == 2 and not (args.out / f"moe-s{seed}" / "student").is_dir():
                    raise SystemExit(f"stage 2 starts from stage 1's MoE student of seed {seed}: run --stages 1 first")
                results[key] = run_one(path, variant, seed, args.out, args)
                args.out.mkdir(parents=True, exist_ok=True)
                # read again before writing: sweeps of other seeds or variants may share this folder
                latest = earlier_results(results_file, settings)
                latest["runs"][key] = results[key]
                atomic_write_text(results_file, json.dumps(latest, indent=1))
                results.update(latest["runs"])
    for stage in sorted(args.stages):
        if not stages[stage][1]:
            continue
        print(f"\nstage {stage}, seeds {args.seeds} (mean ± std)")
        print_table(results, stages[stage][1], args.seeds)


if __name__ == "__main__":
    main()
