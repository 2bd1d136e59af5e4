"""Self-distillation for further pre-training (Lee et al., ICLR 2023) at small scale on 2 cores (issue #21, item 11).

Per seed, three students of one starting model θ0 are compared on held-out BBC News topic classification:
- `theta0`: θ0 itself, fine-tuned directly;
- `further_pretrained` (φ): θ0 further-pretrained with MLM on the target-domain text
  (recipes/bbc-further-pretrain.yaml), then fine-tuned;
- `self_distilled`: θ0 re-trained with MLM + λ·‖h_θ(x) − sg(h_φ(x))‖² on the final-layer [CLS] of the unmasked
  text, φ the teacher (recipes/bbc-self-distil.yaml, objective further_pretraining_sd, λ = `--sd-weight`, 1 by
  default), then fine-tuned.

θ0 is all-MiniLM-L6-v2's BERT encoder cut to its first `--layers` layers (default 2, for the CPU budget) plus an MLM
head drawn from the seed (MiniLM ships none), saved once per seed so that every arm starts from the same weights.
`--head-steps N` (stage 0) first trains that head alone, the encoder and the tied decoder (the word embeddings)
frozen, for N steps of 32 Wikipedia paragraphs (gensim's dump, not the target domain; 64 tokens, 15 % masked, lr
1e-3): θ0 then starts with a working MLM head, as the paper's pre-trained models do, and the pre-training stages
spend their steps on the encoder rather than on teaching a fresh head.
The target-domain corpus is the first 100 articles of builtin:bbc's train split (the downstream training inputs,
as in the paper), 32 tokens each; both pre-training stages run `--steps` steps of 8 texts (60 steps ≈ 5 epochs).

Stage 3 (labels), identical for the three arms: (a) `probe`: logistic regression on the frozen [CLS] vectors
(standardised), trained on those 100 labelled articles; (b) `finetune`: the encoder plus a linear head on [CLS],
cross-entropy, AdamW lr 2e-4, batch 16, `--ft-epochs` epochs on the same 100 articles, word embeddings frozen (the
CPU budget); with `--ft-seeds k`, the mean of k such runs (seeds s, 1000 + s, ...), since one run's accuracy
swings by ±0.07 with the head's init and the data order. Both are scored on 400 articles of the test split (held
out from every stage). Also reported: `distance`, the L2 distance of the encoder weights (MLM head excluded) to θ0,
and `mlm_loss`, the held-out MLM loss on 100 validation articles after pre-training.

Usage: python benchmarks/further_pretraining_sd.py [--seeds 0 1 2] [--steps 60] [--lr 1e-4] [--head-steps 0]
       [--ft-epochs 5] [--ft-seeds 1] [--sd-weight 1] [--out runs/fpsd-bench]
Each pre-training stage is a fresh `python -m potstill run` process; finished seeds in --out/results.jsonl are
skipped, so a killed study resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_runs import REPO, run_potstill  # noqa: E402

RECIPES = REPO / "src" / "potstill" / "recipes"
ARMS = ("theta0", "further_pretrained", "self_distilled")
NUM_TOPICS = 5


def make_theta0(folder: Path, *, layers: int, seed: int, head_steps: int = 0) -> Path:
    """MiniLM's first `layers` layers as a BertForMaskedLM whose MLM head is drawn from `seed` (then trained
    `head_steps` steps alone when > 0)."""
    from transformers import AutoTokenizer, BertForMaskedLM

    from potstill.assets import minilm_path

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = BertForMaskedLM.from_pretrained(minilm_path(), num_hidden_layers=layers)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    if head_steps:
        train_mlm_head(model, tok, steps=head_steps, seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train_mlm_head(model: nn.Module, tok, *, steps: int, seed: int, batch_size: int = 32, max_length: int = 64,
                   lr: float = 1e-3) -> None:
    """Stage 0: the MLM head's transform and output bias learn on Wikipedia paragraphs; the encoder and the tied
    decoder (the word embeddings) stay frozen. Logits are computed at the masked positions only (the masked_lm
    task's `masked_logits`); the attention mask is the tokenizer's, so a random replacement by [PAD] stays read."""
    from transformers import DataCollatorForLanguageModeling

    from potstill.data.general import wiki_paragraphs
    from potstill.tasks.masked_lm import masked_logits

    texts = wiki_paragraphs()
    head = model.cls.predictions
    trained = list(head.transform.parameters()) + [head.bias]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
        enc = tok([texts[i] for i in idx], truncation=True, max_length=max_length)
        batch = collate([{"input_ids": ids, "attention_mask": mask}
                         for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)])
        labels = batch["labels"]
        logits = masked_logits(model, {"masked_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                       "mlm_labels": labels})
        loss = nn.functional.cross_entropy(logits, labels[labels != -100])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  stage 0 step {step + 1}/{steps}: MLM loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    for p in model.parameters():
        p.requires_grad_(True)


def bbc(split: str, limit: int) -> tuple[list[str], list[int]]:
    from potstill.data import load_source

    records = load_source("builtin:bbc", split=split, limit=limit)
    topics = sorted({r["label"] for r in load_source("builtin:bbc", split="train")})
    return [r["text"] for r in records], [topics.index(r["label"]) for r in records]


def encoder(folder: Path) -> tuple[nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def cls_features(model: nn.Module, tok, texts: list[str], max_length: int) -> torch.Tensor:
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            enc = tok(texts[start:start + 64], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            out.append(model(**enc).last_hidden_state[:, 0].float())
    return torch.cat(out)


def probe(folder: Path, data: dict, max_length: int, seed: int) -> float:
    from potstill.eval import linear_probe_accuracy

    model, tok = encoder(folder)
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    feats = cls_features(model, tok, train_x + test_x, max_length)
    return linear_probe_accuracy(feats[:len(train_x)], train_y, feats[len(train_x):], test_y, seed=seed,
                                 standardize=True)


def finetune(folder: Path, data: dict, max_length: int, seed: int, epochs: int) -> float:
    """Test accuracy after fine-tuning the encoder + a linear head on [CLS] (word embeddings frozen)."""
    torch.manual_seed(seed)
    model, tok = encoder(folder)
    model.get_input_embeddings().weight.requires_grad_(False)
    head = nn.Linear(model.config.hidden_size, NUM_TOPICS)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    texts, labels = data["train"]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(texts), generator=gen).tolist()
        for start in range(0, len(order), 16):
            idx = order[start:start + 16]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            logits = head(model(**enc).last_hidden_state[:, 0])
            loss = nn.functional.cross_entropy(logits, torch.tensor([labels[i] for i in idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    test_x, test_y = data["test"]
    with torch.inference_mode():
        pred = head(cls_features(model, tok, test_x, max_length)).argmax(-1)
    return float((pred == torch.tensor(test_y)).float().mean())


def distance(folder: Path, theta0: Path) -> float:
    """L2 distance of the encoder weights (the MLM head and the unused, freshly drawn pooler excluded) to θ0's."""
    a, _ = encoder(folder)
    b, _ = encoder(theta0)
    ref = dict(b.named_parameters())
    return float(torch.sqrt(sum(((p - ref[n]) ** 2).sum() for n, p in a.named_parameters()
                                if n in ref and not n.startswith("pooler."))))


def study_settings(args: argparse.Namespace) -> dict:
    """The flags a results row depends on: a rerun reuses only the rows written with the same values."""
    return {k: getattr(args, k) for k in ("steps", "lr", "head_steps", "ft_seeds", "ft_epochs", "sd_weight")}


def run_seed(seed: int, args: argparse.Namespace, data: dict) -> dict:
    work = args.out / (f"seed{seed}" + (f"-head{args.head_steps}" if args.head_steps else ""))
    theta0 = make_theta0(work / "theta0", layers=args.layers, seed=seed, head_steps=args.head_steps)
    common = [f"output_dir={work}", f"seed={seed}", f"trainer.max_steps={args.steps}", f"trainer.lr={args.lr}",
              f"trainer.num_threads={args.threads}", f"data.max_length={args.max_length}", "eval.probe_train=null",
              "eval.probe_test=null",
              "eval.compare_before=false"]
    timings = {}
    s1, timings["stage1_s"] = run_potstill(RECIPES / "bbc-further-pretrain.yaml",
                                           ["name=further_pretrained", *common, f"teacher.path={theta0}",
                                            f"student.path={theta0}"], label=f"seed {seed} stage 1")
    phi = work / "further_pretrained" / "student"
    s2, timings["stage2_s"] = run_potstill(RECIPES / "bbc-self-distil.yaml",
                                           ["name=self_distilled", *common, f"teacher.path={phi}",
                                            f"student.path={theta0}", f"objectives.0.weight={args.sd_weight}"],
                                           label=f"seed {seed} stage 2")
    sd = work / "self_distilled" / "student"
    row: dict = {"seed": seed, **study_settings(args), **{k: round(v, 1) for k, v in timings.items()}}
    for arm, folder, summary in (("theta0", theta0, None), ("further_pretrained", phi, s1), ("self_distilled", sd, s2)):
        start = time.perf_counter()
        row[arm] = {"probe": probe(folder, data, args.max_length, seed),
                    "finetune": statistics.mean(finetune(folder, data, args.max_length, 1000 * k + seed, args.ft_epochs)
                                                for k in range(args.ft_seeds)),
                    "distance": distance(folder, theta0)}
        if summary is not None:
            row[arm]["mlm_loss"] = _metric(summary, "mlm_loss")
        row[arm]["stage3_s"] = round(time.perf_counter() - start, 1)
    sd_terms = [json.loads(line) for line in (work / "self_distilled" / "metrics.jsonl").read_text().splitlines()]
    terms = [r["obj/further_pretraining_sd"] for r in sd_terms if "obj/further_pretraining_sd" in r]
    row["sd_term_first_last"] = [terms[0], terms[-1]] if terms else None
    return row


def _metric(summary: dict, name: str) -> float | None:
    """The student's final value of `name` in a run summary (searched through its nested tables)."""
    found: list[float] = []

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif key.endswith(name) and isinstance(node, (int, float)):
            found.append(float(node))

    walk(summary.get("student_metrics", summary))
    return found[-1] if found else None


def table(rows: list[dict]) -> str:
    lines = ["| arm | probe acc | fine-tune acc | ‖θ − θ0‖₂ | held-out MLM loss |", "|---|---|---|---|---|"]

    def cell(arm: str, key: str, digits: int = 3) -> str:
        values = [r[arm][key] for r in rows if r[arm].get(key) is not None]
        if not values:
            return "—"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    for arm in ARMS:
        lines.append(f"| {arm} | {cell(arm, 'probe')} | {cell(arm, 'finetune')} | {cell(arm, 'distance', 2)} | "
                     f"{cell(arm, 'mlm_loss', 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each pre-training stage")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of both pre-training stages")
    parser.add_argument("--layers", type=int, default=2, help="MiniLM layers kept in θ0")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per text (the recipes' data.max_length)")
    parser.add_argument("--ft-epochs", type=int, default=5)
    parser.add_argument("--ft-seeds", type=int, default=1, help="fine-tuning runs per arm (head init and order "
                        "seeds); `finetune` is their mean accuracy")
    parser.add_argument("--sd-weight", type=float, default=1.0, help="λ, the weight of the [CLS] matching term "
                        "in stage 2 (the MLM loss keeps weight 1)")
    parser.add_argument("--head-steps", type=int, default=0, help="stage 0: steps that train θ0's MLM head alone "
                        "on Wikipedia before the arms start (0 = keep the freshly drawn head)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fpsd-bench")
    args = parser.parse_args(argv)
    if args.ft_seeds < 1 or args.head_steps < 0 or args.sd_weight < 0:
        parser.error("--ft-seeds must be >= 1, --head-steps and --sd-weight >= 0")
    args.out = args.out.resolve()
    torch.set_num_threads(args.threads)
    data = {"train": bbc("train", 100), "test": bbc("test", 400)}
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    # rows written before a setting existed ran at its default
    rows = [r for r in rows if all(r.get(k, parser.get_default(k)) == v for k, v in study_settings(args).items())]
    for seed in args.seeds:
        if any(r["seed"] == seed for r in rows):
            continue
        row = run_seed(seed, args, data)
        print(json.dumps(row), flush=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        with results.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        rows.append(row)
    rows = [r for r in rows if r["seed"] in args.seeds]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
