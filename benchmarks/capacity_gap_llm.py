"""The capacity gap on language models (issue #19): one small Llama student distilled from Llama teachers 1-8x
its size, each teacher trained here on 8x the student's text. Is held-out quality monotone in teacher size, and
is a teacher of about 2.5x the student the best one?

The claim under test: MiniMA (Zhang et al. 2023, "Towards the Law of Capacity Gap in Distilling Language
Models") finds the best teacher about 2.5x the student's size, larger teachers helping less. The Fashion-MNIST
sweep (`benchmarks/capacity_gap.py`) could not test it: its teachers saw the student's own data and knew little
more than the student. Here they read 8x the text.

Setup (defaults; each is a flag):
- Text: BBC News (`builtin:bbc`). Teachers train on all 1,488 articles of its train split (~0.92 M tokens);
  students on the first 186 of them (1/8; the split is in seeded shuffled order). Scored on (a) in-domain text:
  the BBC test split's articles, and (b) held-out text from other sources: the Wikipedia and Lee background
  sentences of `builtin:general`'s test split (`_llm_common.heldout_blocks`, the shared LLM held-out set).
  Perplexity per token over blocks of `--max-length` tokens (every position but a block's last predicts).
- Vocabulary: a byte-level BPE of 4,096 tokens (`potstill.students.tokenizer.train_byte_level_bpe`) trained on
  the teachers' text, shared by every model. SmolLM2's 49,152 ids would put ~3 M parameters in the embedding of
  a 64-wide student (30x its transformer body) and most of each step's compute in the output layer; 4,096
  byte-level ids keep the sweep inside one core's budget and leave no token unknown on the held-out text.
- Models: Llama built from config (tied embeddings, head dim 32, FFN 3x the width). Student: width 64, 2
  layers. Teachers: for each ratio, the shape (width a multiple of 32, depth the student's or twice it) whose
  non-embedding ("body") parameter count is closest to ratio x the student's; every model has the same
  vocabulary, so the ratio is about the transformer body (the embedding count is printed beside it).
- Teachers: next-token cross-entropy, seed 0, `--teacher-epochs` passes; saved under `<out>/teacher-*` and reused
  on a rerun whose teacher settings are the same.
- Students, seeds 0-2: the baseline with next-token cross-entropy on the student's text; a distilled student
  per teacher with forward KL(teacher || student) at T = 1 (potstill's `forward_kl`, no label term) on the same
  text, same steps, same init. Every run is a recipe through `potstill.train.run_recipe` (what `potstill run`
  does), one torch thread.

Results go to `<out>/results.json` (finished runs are reused when the settings match, so a killed sweep
resumes). Usage: python benchmarks/capacity_gap_llm.py [--out runs/capacity-gap-llm] [--seeds 0 1 2]
[--ratios 1 2 4 8] (see --help for the sizes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from _llm_common import earlier_results, heldout_blocks  # noqa: E402

from potstill.config import validate_recipe  # noqa: E402
from potstill.data.loaders import builtin_records  # noqa: E402
from potstill.io import atomic_write_text  # noqa: E402
from potstill.train import run_recipe  # noqa: E402

HEAD_DIM = 32
FFN_FACTOR = 3


def llama_fields(width: int, layers: int, max_length: int) -> dict[str, Any]:
    """The LlamaConfig fields of one model shape (the vocabulary and special ids come from the tokenizer)."""
    heads = max(1, width // HEAD_DIM)
    return {"model_type": "llama", "hidden_size": width, "intermediate_size": FFN_FACTOR * width,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "head_dim": width // heads, "max_position_embeddings": max_length, "tie_word_embeddings": True}


def parameter_counts(width: int, layers: int, vocab: int) -> tuple[int, int]:
    """(body, embedding) parameters of a shape: the body is everything but the (tied) token embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in llama_fields(width, layers, 128).items() if k != "model_type"}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **fields))
    embedding = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding, embedding


def teacher_shapes(width: int, layers: int, ratios: list[float], vocab: int) -> dict[float, tuple[int, int]]:
    """For each ratio, the (width, layers) with the student's depth or twice it and a width that is a multiple of
    HEAD_DIM whose body parameter count is closest to ratio x the student's (on a log scale)."""
    base = parameter_counts(width, layers, vocab)[0]
    candidates = [(w, n) for w in range(HEAD_DIM, 8 * width + 1, HEAD_DIM) for n in (layers, 2 * layers)]
    bodies = {shape: parameter_counts(*shape, vocab)[0] for shape in candidates}
    return {r: min(candidates, key=lambda s: (abs(math.log(bodies[s] / base / r)), s[1])) for r in ratios}


def recipe(name: str, out: Path, *, seed: int, shape: tuple[int, int], teacher: dict[str, Any], articles: int,
           epochs: float, kd: bool, args: argparse.Namespace) -> dict[str, Any]:
    train: dict[str, Any] = {"path": "builtin:bbc", "split": "train"}
    if articles:
        train["limit"] = articles
    return {
        "name": name, "output_dir": str(out), "task": "causal_lm", "seed": seed, "teacher": teacher,
        "student": {"init": "from_config", "config": llama_fields(*shape, args.max_length)},
        "data": {"train": train, "max_length": args.max_length, "packing": True},
        "objectives": [{"name": "forward_kl", "params": {"temperature": 1.0}}] if kd else [],
        "trainer": {"epochs": epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": 0.0,
                    "warmup_ratio": 0.05, "schedule": "cosine", "hard_label_weight": 0.0 if kd else 1.0,
                    "log_every": 50, "num_threads": 1},
        "eval": {"every": 0, "compare_before": False, "throughput": False},
    }


def eval_blocks(tokenizer: Any, args: argparse.Namespace) -> dict[str, dict[str, torch.Tensor]]:
    """{"in-domain": {"bbc-test": blocks}, "held-out": {source: blocks}}: LongTensors [n, max_length] of text
    joined with EOS (no BOS), as the training text is packed."""
    stream: list[int] = []
    need = args.eval_blocks * args.max_length
    for record in builtin_records("bbc", "test"):
        stream += tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= need:
            break
    in_domain = torch.tensor(stream[:need]).view(args.eval_blocks, args.max_length)
    held_out = heldout_blocks(tokenizer, blocks_per_source=args.heldout_blocks, block_len=args.max_length)
    return {"in-domain": {"bbc-test": in_domain}, "held-out": held_out}


def perplexities(folder: Path, blocks: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Perplexity of the saved causal LM in `folder` on each group of blocks (all its sources' tokens pooled)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = {}
    with torch.inference_mode():
        for group, sources in blocks.items():
            nll, count = 0.0, 0
            for ids in sources.values():
                for batch in ids.split(16):
                    logits = model(input_ids=batch).logits[:, :-1].float()
                    nll += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].reshape(-1), reduction="sum"))
                    count += batch[:, 1:].numel()
            out[group] = math.exp(nll / count)
    return out


def train_tokenizer(out: Path, args: argparse.Namespace) -> Any:
    from transformers import AutoTokenizer

    from potstill.students.tokenizer import train_byte_level_bpe

    folder = out / f"tokenizer-bpe{args.vocab}-a{args.teacher_articles}"
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    records = builtin_records("bbc", "train")
    texts = [r["text"] for r in records[:args.teacher_articles or None]]
    return train_byte_level_bpe(texts, args.vocab, folder)


def train_teacher(out: Path, ratio: float, shape: tuple[int, int], tokenizer_dir: str,
                  args: argparse.Namespace) -> Path:
    """The teacher's saved folder: trained now, or reused when a finished run with the same settings is there."""
    name = f"teacher-w{shape[0]}-l{shape[1]}"
    settings = {"shape": list(shape), "tokenizer": tokenizer_dir, "articles": args.teacher_articles,
                "epochs": args.teacher_epochs, "lr": args.lr, "batch_size": args.batch_size,
                "max_length": args.max_length}
    marker = out / name / "capacity_gap_teacher.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return out / name / "student"
    started = time.perf_counter()
    run_recipe(validate_recipe(recipe(name, out, seed=0, shape=shape, teacher={"tokenizer": tokenizer_dir},
                                      articles=args.teacher_articles, epochs=args.teacher_epochs, kd=False,
                                      args=args)), overwrite=True)
    atomic_write_text(marker, json.dumps(settings))
    print(f"teacher {ratio:g}x {name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return out / name / "student"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def print_table(result: dict[str, Any], seeds: list[int], ratios: list[float]) -> None:
    student = result["student"]
    print(f"\nstudent: width {student['shape'][0]}, {student['shape'][1]} layers, {student['body']:,} body + "
          f"{student['embedding']:,} embedding parameters; seeds {seeds}")
    print("| row | teacher shape (width × layers) | teacher body params (× student) | teacher ppl held-out / "
          "in-domain | student ppl held-out (mean ± std) | student ppl in-domain (mean ± std) |")
    print("|---|---|---|---|---|---|")
    rows = [("labels only (CE)", "ce", None)] + [(f"KD from the {r:g}x teacher", f"kd-{r:g}x", r) for r in ratios]
    for label, key, ratio in rows:
        runs = [result["runs"][f"{key}-s{s}"] for s in seeds if f"{key}-s{s}" in result["runs"]]
        if not runs:
            continue
        teacher_cols = "— | — | —"
        if ratio is not None:
            t = result["teachers"][f"{ratio:g}"]
            teacher_cols = (f"{t['shape'][0]} × {t['shape'][1]} | {t['body']:,} ({t['body'] / student['body']:.2f}×)"
                            f" | {t['ppl']['held-out']:.1f} / {t['ppl']['in-domain']:.1f}")
        print(f"| {label} | {teacher_cols} | {mean_std([r['ppl']['held-out'] for r in runs])} | "
              f"{mean_std([r['ppl']['in-domain'] for r in runs])} |")
    for group in ("held-out", "in-domain"):
        means = {r: statistics.mean(result["runs"][f"kd-{r:g}x-s{s}"]["ppl"][group] for s in seeds)
                 for r in ratios if all(f"kd-{r:g}x-s{s}" in result["runs"] for s in seeds)}
        if len(means) < 2:
            continue
        order = [means[r] for r in sorted(means)]
        monotone = all(b <= a for a, b in zip(order, order[1:], strict=False))
        best = min(means, key=lambda r: means[r])
        print(f"{group}: student perplexity by teacher ratio "
              + ", ".join(f"{r:g}x {means[r]:.1f}" for r in sorted(means))
              + f"; better with every larger teacher: {'yes' if monotone else 'no'}; best teacher: {best:g}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "capacity-gap-llm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--student-width", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096, help="byte-level BPE vocabulary size")
    parser.add_argument("--teacher-articles", type=int, default=0, help="BBC train articles (0: all 1,488)")
    parser.add_argument("--student-articles", type=int, default=186, help="the first N of them (186: 1/8)")
    parser.add_argument("--teacher-epochs", type=float, default=1.0)
    parser.add_argument("--student-epochs", type=float, default=3.0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-blocks", type=int, default=64, help="in-domain blocks (BBC test)")
    parser.add_argument("--heldout-blocks", type=int, default=32, help="held-out blocks per source")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tokenizer = train_tokenizer(out, args)
    tokenizer_dir = str(out / f"tokenizer-bpe{args.vocab}-a{args.teacher_articles}")
    blocks = eval_blocks(tokenizer, args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "seeds", "ratios")}
    results_path = out / "results.json"
    result = earlier_results(results_path, settings)
    student_shape = (args.student_width, args.student_layers)
    body, embedding = parameter_counts(*student_shape, len(tokenizer))
    result["student"] = {"shape": list(student_shape), "body": body, "embedding": embedding}
    result.setdefault("teachers", {})

    teachers: dict[float, Path] = {}
    for ratio, shape in teacher_shapes(*student_shape, args.ratios, len(tokenizer)).items():
        teachers[ratio] = train_teacher(out, ratio, shape, tokenizer_dir, args)
        t_body, t_embedding = parameter_counts(*shape, len(tokenizer))
        result["teachers"][f"{ratio:g}"] = {"shape": list(shape), "body": t_body, "embedding": t_embedding,
                                           "ppl": perplexities(teachers[ratio], blocks)}

    for seed in args.seeds:
        jobs = [("ce", {"tokenizer": tokenizer_dir}, False)]
        jobs += [(f"kd-{r:g}x", {"path": str(teachers[r])}, True) for r in args.ratios]
        for row, teacher, kd in jobs:
            key = f"{row}-s{seed}"
            if key in result["runs"]:
                continue
            run_started = time.perf_counter()
            run_recipe(validate_recipe(recipe(key, out, seed=seed, shape=student_shape, teacher=teacher,
                                              articles=args.student_articles, epochs=args.student_epochs, kd=kd,
                                              args=args)), overwrite=True)
            result["runs"][key] = {"ppl": perplexities(out / key / "student", blocks),
                                   "seconds": time.perf_counter() - run_started}
            atomic_write_text(results_path, json.dumps(result, indent=1))
            print(f"{key}: held-out ppl {result['runs'][key]['ppl']['held-out']:.1f}, in-domain "
                  f"{result['runs'][key]['ppl']['in-domain']:.1f} ({result['runs'][key]['seconds']:.0f} s)",
                  flush=True)
    atomic_write_text(results_path, json.dumps(result, indent=1))
    print_table(result, args.seeds, args.ratios)
    print(f"\n{time.perf_counter() - started:.0f} s in all; results in {results_path}")


if __name__ == "__main__":
    main()
