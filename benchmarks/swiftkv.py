"""SwiftKV on SmolLM2-135M-Instruct (issue #21 §10): prefill cost against quality, before and after distillation.

For each cut layer l (default 15 and 22 of 30 layers: SingleInputKV on the last 50 % and 27 % of the depth):
- prefill FLOPs of one `--prompt-tokens` prompt up to its next-token logits, counted from the shapes
  (`potstill.students.swiftkv.prefill_flops`), against the original model's;
- measured prefill time (batch 1, `--prompt-tokens` tokens, 2 threads), interleaved round by round with the original
  (Hugging Face's forward with `logits_to_keep=1`, as `generate` runs it, and the SwiftKV code path with the cut at
  full depth, which is the original model run by the same code); the median of `--rounds` rounds;
- quality on held-out text that no run trains on (the LM suite's Lee and 20 Newsgroups texts,
  `potstill.data.lm_suite_sources`, packed into `--eval-blocks` blocks of 128 tokens): top-1 agreement with the
  teacher (the same model, transform off) and KL(teacher ‖ student) per token, at initialisation and after
  `recipes/smollm2-swiftkv.yaml` (`--steps` steps of 4 × 128 BBC tokens, only the new weights training).

`--init-cuts 26 28`: also score those cuts at initialisation (no training, no timing).

Usage: python benchmarks/swiftkv.py [--cuts 15 22] [--init-cuts 26 28] [--steps 20] [--prompt-tokens 256] [--rounds 5]
       [--eval-blocks 12] [--out runs/swiftkv_bench] [--threads 2]
Writes <out>/results.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "src" / "potstill" / "recipes" / "smollm2-swiftkv.yaml"


def heldout_examples(tokenizer: Any, blocks: int) -> list[dict[str, list[int]]]:
    from potstill.data.lm_suite_sources import source_texts
    from potstill.eval.lm_suite import perplexity_examples

    half = blocks // 2
    return [*perplexity_examples(tokenizer, source_texts("lee"), block_tokens=128, blocks=half),
            *perplexity_examples(tokenizer, source_texts("newsgroups"), block_tokens=128, blocks=blocks - half)]


def agreement(student: torch.nn.Module, teacher: torch.nn.Module, examples: list[dict], vocab: int
              ) -> dict[str, float]:
    from potstill.eval.lm import token_metrics, token_stats

    def batch_of(rows: list[dict], idx: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([rows[i]["input_ids"] for i in idx])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "targets": torch.tensor([rows[i]["targets"] for i in idx])}

    def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).logits[..., :vocab]

    batches = [list(range(i, min(i + 4, len(examples)))) for i in range(0, len(examples), 4)]
    m = token_metrics(token_stats(student, examples, batches, batch_of=batch_of, logits=logits, teacher=teacher))
    return {"agreement": m["token_agreement"], "kl": m["kl_to_teacher"], "perplexity": m["perplexity"]}


def prefill_times(base: torch.nn.Module, models: dict[str, torch.nn.Module], prompt: torch.Tensor,
                  rounds: int) -> dict[str, float]:
    """Median seconds of one prefill per model; every round runs each model once, in turn."""
    runs = {"original (HF, logits_to_keep=1)": lambda: base(input_ids=prompt, use_cache=False, logits_to_keep=1),
            **{name: (lambda m=m: m.prefill(prompt)) for name, m in models.items()}}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def distil(cut: int, steps: int, out: Path) -> Path:
    from potstill.config import load_recipe
    from potstill.train import run_recipe

    recipe = load_recipe(RECIPE, [f"name=swiftkv-cut{cut}", f"output_dir={out / 'runs'}",
                                  f"student.config.cut_layer={cut}", f"trainer.max_steps={steps}",
                                  "eval.compare_before=false", "data.eval=null"])
    run_recipe(recipe)
    return out / "runs" / f"swiftkv-cut{cut}" / "student"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cuts", type=int, nargs="+", default=[15, 22])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--init-cuts", type=int, nargs="*", default=[],
                        help="cuts scored at initialisation only (no training, no timing)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eval-blocks", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/swiftkv_bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.assets import smollm2_path
    from potstill.data.lm_suite_sources import source_texts
    from potstill.students.swiftkv import SwiftKVForCausalLM, prefill_flops

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    vocab = len(tokenizer)
    examples = heldout_examples(tokenizer, args.eval_blocks)
    prompt = torch.tensor([tokenizer(" ".join(source_texts("lee")))["input_ids"][:args.prompt_tokens]])
    depth = base.config.num_hidden_layers
    models = {f"swiftkv cut {depth} (= original)": SwiftKVForCausalLM(base, depth),
              **{f"swiftkv cut {c}": SwiftKVForCausalLM(base, c) for c in args.cuts}}
    times = prefill_times(base, models, prompt, args.rounds)
    flops_original = prefill_flops(base.config, args.prompt_tokens)
    rows = [{"model": "original", "cut": depth, "prefill_gflops": flops_original / 1e9,
             "prefill_s_hf": times["original (HF, logits_to_keep=1)"],
             "prefill_s": times[f"swiftkv cut {depth} (= original)"], "agreement": 1.0, "kl": 0.0}]
    for cut in args.cuts:
        model = models[f"swiftkv cut {cut}"].eval()
        before = agreement(model, base, examples, vocab)
        print(f"cut {cut}: before distillation {before}", flush=True)
        trained = SwiftKVForCausalLM.from_pretrained(distil(cut, args.steps, out)).eval()
        after = agreement(trained, base, examples, vocab)
        print(f"cut {cut}: after {args.steps} steps {after}", flush=True)
        flops = prefill_flops(base.config, args.prompt_tokens, cut_layer=cut)
        rows.append({"model": f"swiftkv cut {cut}", "cut": cut, "prefill_gflops": flops / 1e9,
                     "flops_reduction": 1 - flops / flops_original,
                     "prefill_s": times[f"swiftkv cut {cut}"],
                     "speedup_vs_same_code": times[f"swiftkv cut {depth} (= original)"] / times[f"swiftkv cut {cut}"],
                     "speedup_vs_hf": times["original (HF, logits_to_keep=1)"] / times[f"swiftkv cut {cut}"],
                     "agreement_before": before["agreement"], "kl_before": before["kl"],
                     "agreement": after["agreement"], "kl": after["kl"], "steps": args.steps})
        del trained
    for cut in args.init_cuts:
        init = agreement(SwiftKVForCausalLM(base, cut).eval(), base, examples, vocab)
        print(f"cut {cut} at initialisation: {init}", flush=True)
        rows.append({"model": f"swiftkv cut {cut} (init)", "cut": cut,
                     "prefill_gflops": prefill_flops(base.config, args.prompt_tokens, cut_layer=cut) / 1e9,
                     "flops_reduction": 1 - prefill_flops(base.config, args.prompt_tokens, cut_layer=cut)
                     / flops_original, "prefill_s": float("nan"), "agreement_before": init["agreement"],
                     "kl_before": init["kl"], "agreement": init["agreement"], "kl": init["kl"], "steps": 0})
    result = {"prompt_tokens": args.prompt_tokens, "rounds": args.rounds, "threads": args.threads,
              "eval_tokens": sum(sum(t != -100 for t in ex["targets"]) for ex in examples),
              "seconds": time.perf_counter() - started, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"{'model':<18}{'GFLOPs':>8}{'-FLOPs':>8}{'prefill s':>11}{'speed-up':>10}{'agree0':>8}{'KL0':>7}"
          f"{'agree':>7}{'KL':>7}")
    for r in rows:
        print(f"{r['model']:<18}{r['prefill_gflops']:>8.2f}{r.get('flops_reduction', 0):>8.1%}{r['prefill_s']:>11.3f}"
              f"{r.get('speedup_vs_same_code', 1):>10.2f}{r.get('agreement_before', 1):>8.3f}"
              f"{r.get('kl_before', 0):>7.3f}{r['agreement']:>7.3f}{r['kl']:>7.3f}")
    print(f"HF original prefill: {rows[0]['prefill_s_hf']:.3f} s; eval tokens {result['eval_tokens']}; "
          f"total {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
