"""Claim check (issue #21 §2): preference distillation, DPO with the teacher as reference, against plain mimic.

LLaVA-MoD (Shu et al. 2024) claims that after imitating the teacher, DPO on preference pairs with the frozen
teacher as the reference model lets the student rank answers *better than the teacher* (less hallucination), which
imitation alone cannot do: imitation copies the teacher's mistakes. Small-scale check, on a synthetic language:

- Text: word tokens n0 … n19. A prompt is four terms of an arithmetic progression mod 20 (start a, step s ∈ 1..5),
  the correct continuation the next three terms. A pair's chosen completion is the correct one; the rejected one
  is the same with one term replaced by a wrong number (a scripted annotator: the rule is the ground truth).
  Train and held-out pairs use disjoint (a, s) prompts (70 / 30 of the 100), 320 train and 200 held-out pairs.
- Models: a tiny Llama (2 layers, width 64) built from a config with the seed: the *base*. The teacher is a copy
  of the base trained briefly (`--teacher-steps` steps of cross-entropy on the train prompts' correct
  continuations), so it ranks part of the pairs right. Every student starts as the base.
- Students, trained by `potstill run` recipes (`data.format: preference`), each `--steps` steps of 8 pairs, AdamW
  lr `--lr`: mimic = forward_kl to the teacher on the chosen completions (summed per pair); dpo = `dpo_teacher_ref`
  (β 0.1, sigmoid) from the base; mimic + dpo = both at once, weight 1 each; mimic → dpo = LLaVA-MoD's two stages,
  dpo_teacher_ref started from the mimic student.
- Score: held-out preference accuracy, the share of pairs with log π(chosen | x) > log π(rejected | x) (sequence
  log-probs summed over completion tokens); for the teacher this is its implicit ranking. For students also the
  reward accuracy, the share with a positive margin against the teacher (DPO's training signal).

Mean ± sample std over seeds (base init, data, teacher and student training). Usage:
    python benchmarks/claim_dpo_teacher_ref.py [--seeds 0 1 2] [--steps 200] [--teacher-steps 8] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

NUMBERS = 20
PROMPT_TERMS, COMPLETION_TERMS = 4, 3
STEPS = (1, 2, 3, 4, 5)
DPO = {"name": "dpo_teacher_ref", "params": {"beta": 0.1}}
# name → (objectives, the run whose student it starts from; None: the base)
RUNS = {"mimic": ([{"name": "forward_kl"}], None),
        "dpo": ([DPO], None),
        "mimic + dpo": ([{"name": "forward_kl"}, DPO], None),
        "mimic → dpo": ([DPO], "mimic")}


def word_tokenizer():
    """A word-level tokenizer over n0 … n19 with <pad>, <bos> (prepended) and <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"]
                                            + [f"n{k}" for k in range(NUMBERS)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def words(terms: list[int]) -> str:
    return " ".join(f"n{t % NUMBERS}" for t in terms)


def make_pairs(prompts: list[tuple[int, int]], count: int, rng: random.Random) -> list[dict]:
    """`count` pairs over the (start, step) `prompts`: chosen = the next terms, rejected = one term wrong."""
    pairs = []
    for _ in range(count):
        a, s = rng.choice(prompts)
        terms = [a + k * s for k in range(PROMPT_TERMS + COMPLETION_TERMS)]
        right = [t % NUMBERS for t in terms[PROMPT_TERMS:]]
        wrong = list(right)
        pos = rng.randrange(COMPLETION_TERMS)
        wrong[pos] = rng.choice([k for k in range(NUMBERS) if k != right[pos]])
        pairs.append({"prompt": words(terms[:PROMPT_TERMS]), "chosen": " " + words(right),
                      "rejected": " " + words(wrong)})
    return pairs


def base_model(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def train_teacher(model, tok, pairs: list[dict], *, steps: int, seed: int, lr: float = 3e-3, batch: int = 16):
    """Cross-entropy on the correct continuations of the train prompts (the teacher's brief training)."""
    gen = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = gen.sample(pairs, batch)
        prompt_len = len(tok(rows[0]["prompt"])["input_ids"])
        enc = tok([r["prompt"] + r["chosen"] for r in rows], return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[:, :prompt_len] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def run_seed(seed: int, *, steps: int, teacher_steps: int, lr: float, root: Path) -> dict[str, dict[str, float]]:
    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    rng = random.Random(seed)
    prompts = [(a, s) for a in range(NUMBERS) for s in STEPS]
    rng.shuffle(prompts)
    cut = int(0.7 * len(prompts))
    train, heldout = make_pairs(prompts[:cut], 320, rng), make_pairs(prompts[cut:], 200, rng)
    folder = root / f"seed{seed}"
    folder.mkdir(parents=True)
    for name, rows in (("train", train), ("heldout", heldout)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = word_tokenizer()
    base = base_model(len(tok), seed)
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    teacher = train_teacher(base, tok, train, steps=teacher_steps, seed=seed)
    teacher.save_pretrained(folder / "teacher")
    tok.save_pretrained(folder / "teacher")
    table: dict[str, dict[str, float]] = {}
    run_name = {name: f"run{i}" for i, name in enumerate(RUNS)}
    for name, (objectives, start) in RUNS.items():
        student = folder / "base" if start is None else folder / "runs" / run_name[start] / "student"
        recipe = validate_recipe({
            "name": run_name[name], "output_dir": str(folder / "runs"), "task": "causal_lm", "seed": seed,
            "teacher": {"path": str(folder / "teacher")},
            "student": {"init": "pretrained", "path": str(student)},
            "data": {"train": str(folder / "train.jsonl"), "eval": str(folder / "heldout.jsonl"), "max_length": 16,
                     "format": "preference"},
            "objectives": objectives,
            "trainer": {"max_steps": steps, "batch_size": 8, "lr": lr, "weight_decay": 0.0, "log_every": 50,
                        "num_threads": 1},
            "eval": {"throughput": False, "compare_before": False, "batch_size": 50}})
        rows = {row["model"]: row for row in run_recipe(recipe)["table"]}
        table.setdefault("teacher", rows["teacher"])
        table[name] = rows["student (after)"]
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            per_seed.append(run_seed(seed, steps=args.steps, teacher_steps=args.teacher_steps, lr=args.lr,
                                     root=Path(tmp)))
    print(f"\nheld-out preference pairs, {len(args.seeds)} seeds, {args.steps} student steps, "
          f"teacher {args.teacher_steps} steps; mean ± std (per seed)")
    print(f"{'model':<14} {'pref. accuracy':>24} {'reward accuracy':>26} {'KL to teacher':>14}")
    for model in ["teacher", *RUNS]:
        def cell(key: str, model: str = model) -> str:
            values = [t[model][key] for t in per_seed if key in t[model]]
            if not values:
                return "—"
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {std:.3f} ({', '.join(f'{v:.2f}' for v in values)})"
        kl = [t[model]["kl_to_teacher"] for t in per_seed if "kl_to_teacher" in t[model]]
        print(f"{model:<14} {cell('preference_accuracy'):>24} {cell('reward_accuracy'):>26} "
              f"{(f'{statistics.mean(kl):.3f}' if kl else '—'):>14}")
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
