"""Self-J on SmolLM2-135M-Instruct: does the self-trained judge rate held-out arithmetic answers better than the
model's own reference-free self-evaluation, and does self-distillation help? (issue 21, item 6)

Task (true quality known without humans): "What is a ∘ b?" with ∘ ∈ {+, −, ×} (+/− on 2–60, × on 2–12). The
model answers n = 4 times per question at temperature 1; its reply is prefilled with "a ∘ b =" so that the number
it writes can be read. True quality of a reply: closeness = max(0, 1 − |pred − gold| / max(|gold|, 1)) (1 when
right, 0 when unreadable); `correct` = pred == gold. Train and held-out questions are disjoint.

Labels (no human, no gold quality): the model's reference-guided self-evaluation (expected digit 0–9 of its
next token after a judging prompt holding the gold "a ∘ b = c") recalibrated by MiniLM cosine(reply, gold)
(`potstill.data.self_judge`). Judges: the frozen SmolLM2 + a score head (`potstill.students.self_judge`) trained
on cached hidden states of the two prompt views with Self-J's loss (α = 0.3, β = 2) or without the distillation
term (β = 0). Rows on the held-out replies, all reference-free except the three marked "uses gold":

    Self-J judge · judge without self-distillation · raw self-evaluation (no reference) ·
    similarity-only (cosine to the gold; uses gold) · self-evaluation with reference (uses gold) ·
    Self-J label = recalibrated self-evaluation (uses gold) · judge trained on cosine-only labels (the paper's
    "Judge (Cosine)")

Metrics: Spearman and Pearson with closeness; best-of-4 accuracy (is the top-scored reply of a question right);
selective accuracy at 50 % abstention (accuracy on the half of the held-out replies the score ranks highest).

    PYTHONPATH=src python benchmarks/self_judge.py --seeds 0 1 2 --out runs/self_judge    # ~35 min a seed, loaded
    PYTHONPATH=src python benchmarks/self_judge.py --seeds 0 --write-data src/potstill/recipes/self-judge
        # only seed 0's replies, as the records of recipes/smollm2-self-judge.yaml (task: judge)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from potstill.assets import smollm2_path
from potstill.data.program_exemplars import minilm_embedder
from potstill.data.self_judge import MAX_SCORE, build_records, cosine_similarities
from potstill.eval.judge import judge_metrics
from potstill.students.self_judge import SelfJudge, fit_score_head

SYSTEM = "You are a precise judge."
ROWS = ("Self-J judge", "judge without self-distillation", "raw self-evaluation (no reference)",
        "similarity-only (uses gold)", "self-evaluation with reference (uses gold)", "Self-J label (uses gold)",
        "judge trained on cosine-only labels")


def problems(rng: random.Random, count: int, seen: set[str]) -> list[tuple[str, int]]:
    """`count` new (expression, gold) pairs not in `seen` (which grows)."""
    out = []
    while len(out) < count:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(2, 60), rng.randint(2, 60))
        if op == "-" and b > a:
            a, b = b, a
        expr = f"{a} {op} {b}"
        if expr not in seen:
            seen.add(expr)
            out.append((expr, {"+": a + b, "-": a - b, "*": a * b}[op]))
    return out


def sample_replies(model, tok, exprs: list[str], n: int, seed: int) -> list[str]:
    """n sampled replies per expression, each the prefill "a ∘ b =" plus the model's continuation's first line."""
    tok.padding_side = "left"
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {e}?"}], tokenize=False,
                                       add_generation_prompt=True) + f"{e} =" for e in exprs]
    torch.manual_seed(seed)
    replies = []
    for start in range(0, len(prompts), 32):
        enc = tok(prompts[start:start + 32], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=5,
                                 num_return_sequences=n, pad_token_id=tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        for j, row in enumerate(out):
            text = tok.decode(row[width:], skip_special_tokens=True).split("\n")[0].rstrip()
            replies.append(f"{exprs[start + j // n]} ={text}")
    return replies


def closeness(reply: str, gold: int) -> tuple[float, bool]:
    match = re.search(r"=\s*(-?\d+)", reply)
    if match is None:
        return 0.0, False
    pred = int(match.group(1))
    return max(0.0, 1.0 - abs(pred - gold) / max(abs(gold), 1)), pred == gold


def seed_replies(seed: int, args: argparse.Namespace, model, tok) -> dict[str, tuple[list[tuple[str, int]], list[str]]]:
    """split ("train", "test") → (its disjoint questions, args.n sampled replies to each): what a seed judges."""
    rng, seen = random.Random(seed), set()
    splits = {"train": problems(rng, args.train, seen), "test": problems(rng, args.test, seen)}
    return {split: (items, sample_replies(model, tok, [e for e, _ in items], args.n, seed * 1000 + (split == "test")))
            for split, items in splits.items()}


def write_data(out: Path, seed: int, args: argparse.Namespace, model, tok) -> None:
    """`task: judge` records of this seed's questions: train.jsonl (instruction, response, reference) and eval.jsonl
    (the test questions; also quality, correct and group), the data of recipes/smollm2-self-judge.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    for split, (items, replies) in seed_replies(seed, args, model, tok).items():
        split = "eval" if split == "test" else split
        rows = []
        for i, reply in enumerate(replies):
            expr, gold = items[i // args.n]
            row = {"instruction": f"What is {expr}?", "response": reply, "reference": f"{expr} = {gold}"}
            if split == "eval":
                quality, correct = closeness(reply, gold)
                row.update(quality=quality, correct=correct, group=i // args.n)
            rows.append(json.dumps(row))
        (out / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
        print(f"{out / split}.jsonl: {len(rows)} replies", flush=True)


def run_seed(seed: int, args: argparse.Namespace, model, tok, embed) -> dict[str, Any]:
    started = time.perf_counter()
    judge = SelfJudge(model, tok, system=SYSTEM, rank=args.rank)
    data: dict[str, dict[str, Any]] = {}
    for split, (items, replies) in seed_replies(seed, args, model, tok).items():
        exprs = [e for e, _ in items]
        golds = [g for _, g in items for _ in range(args.n)]
        questions = [f"What is {e}?" for e in exprs for _ in range(args.n)]
        refs = [f"{e} = {g}" for e, g in items for _ in range(args.n)]
        graded = [closeness(r, g) for r, g in zip(replies, golds, strict=True)]
        free = judge.features(judge.prompts(questions, replies), batch_size=args.batch)
        ref = judge.features(judge.prompts(questions, replies, refs), batch_size=args.batch)
        data[split] = {"questions": questions, "replies": replies, "refs": refs, "free": free, "ref": ref,
                       "quality": np.array([q for q, _ in graded]), "correct": np.array([c for _, c in graded], float),
                       "groups": [i // args.n for i in range(len(replies))],
                       "cos": cosine_similarities(replies, refs, embed),
                       "self_eval_ref": judge.scores_from_features(ref).numpy(),
                       "self_eval_free": judge.scores_from_features(free).numpy()}
        print(f"seed {seed} {split}: {len(replies)} replies, accuracy {data[split]['correct'].mean():.3f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    train, test = data["train"], data["test"]
    if args.save_features:  # hidden states and scores, to study labels and heads without the LM again
        torch.save(data,
                   Path(args.out) / f"features_seed{seed}.pt")
    records = build_records(train["questions"], train["replies"], train["refs"], train["self_eval_ref"].tolist(),
                            train["cos"].tolist())
    labels = torch.tensor([r.label for r in records], dtype=torch.float32)
    label_test = build_records(test["questions"], test["replies"], test["refs"], test["self_eval_ref"].tolist(),
                               test["cos"].tolist())
    scores = {ROWS[2]: test["self_eval_free"], ROWS[3]: MAX_SCORE * np.clip(test["cos"], 0, 1),
              ROWS[4]: test["self_eval_ref"], ROWS[5]: np.array([r.label for r in label_test])}
    losses: dict[str, list[float]] = {}
    cosine_labels = torch.tensor(MAX_SCORE * np.clip(train["cos"], 0, 1), dtype=torch.float32)
    for row, beta, targets in ((ROWS[0], 2.0, labels), (ROWS[1], 0.0, labels), (ROWS[6], 2.0, cosine_labels)):
        torch.manual_seed(seed)
        head_judge = SelfJudge(model, tok, system=SYSTEM, rank=args.rank)
        losses[row] = fit_score_head(head_judge.head, train["free"], train["ref"], targets, distill_weight=beta,
                       epochs=args.epochs, lr=args.lr, seed=seed)
        scores[row] = head_judge.scores_from_features(test["free"]).numpy()
    # spearman_vs_label, the yardstick: agreement with the held-out reference-based score (the label)
    result: dict[str, Any] = {row: judge_metrics(scores[row], quality=test["quality"], correct=test["correct"],
                                                 groups=test["groups"], labels=scores[ROWS[5]]) for row in ROWS}
    result["_replies"] = {"reply": test["replies"], "quality": test["quality"].tolist(),
                          **{row: np.round(scores[row], 4).tolist() for row in ROWS}}
    result["_reference"] = {"random_reply_acc": float(test["correct"].mean()),
                            "oracle_best_of_n_acc": float(np.mean([test["correct"][np.array(test["groups"]) == g].max()
                                                                   for g in set(test["groups"])])),
                            "label_spearman_train": float(spearmanr(labels.numpy(), train["quality"])[0]),
                            "train_loss_first_last": {k: [v[0], v[-1]] for k, v in losses.items()},
                            "seconds": time.perf_counter() - started}
    return result


def print_table(results: dict[Any, dict[str, Any]]) -> None:
    """Mean ± sd over seeds of every row's metrics, then each seed's reference numbers."""
    seeds = sorted(results)
    print(f"\n{'row':<44}{'spearman':>13}{'pearson':>13}{'best-of-n':>13}{'sel@50%':>13}{'ρ vs label':>13}"
          f"   (mean ± sd, {len(seeds)} seeds)")
    for row in ROWS:
        cells = []
        for key in ("spearman", "pearson", "best_of_n_acc", "selective_acc_50", "spearman_vs_label"):
            vals = np.array([results[s][row][key] for s in seeds])
            cells.append(f"{vals.mean():+.3f}±{vals.std():.3f}")
        print(f"{row:<44}" + "".join(f"{c:>13}" for c in cells))
    for seed in seeds:
        print(f"seed {seed}:", json.dumps(results[seed]["_reference"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=40, help="training questions")
    parser.add_argument("--test", type=int, default=30, help="held-out questions")
    parser.add_argument("--n", type=int, default=4, help="replies per question")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/self_judge")
    parser.add_argument("--save-features", action="store_true")
    parser.add_argument("--write-data", type=Path, default=None,
                        help="only write the first seed's replies as task: judge records (train.jsonl, eval.jsonl) "
                        "in this folder")
    parser.add_argument("--report", nargs="+", default=None,
                        help="only print the table of these results.json files (seeds run as separate processes)")
    args = parser.parse_args()
    if args.report:
        merged = {}
        for path in args.report:
            merged.update(json.loads(Path(path).read_text())["results"])
        print_table(merged)
        return
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if args.write_data is not None:
        write_data(args.write_data, args.seeds[0], args, model, tok)
        return
    embed = minilm_embedder()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(seed, args, model, tok, embed)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print_table(results)

if __name__ == "__main__":
    main()
