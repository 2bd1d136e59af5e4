"""BiAlign on a toy in-context-learning setting (issue #21 item 5; methods-a §13, CPU check (c)).

Claim under test (Qin et al., "Improving In-context Learning via Bidirectional Alignment", arXiv 2312.17055):
adding the input-preference ranking loss to token-level KD makes the student prefer the demonstration sets the
teacher prefers (Kendall τ between their demo-set scores rises) and keeps or improves its ICL accuracy.

Tasks: label inference from noisy demonstrations. A task has one answer label (one of 16 label words v0..v15);
a demonstration is an (input, label) pair, "k3 v9", its input a random key word (k0..k15, uninformative). A query's
pool holds 7 demos: 3 with the task's label and 4 with other labels. A prompt is `shots` = 3 demos from the pool
then the query's input, e.g. "k3 v9 k7 v1 k12 v9 k5" → " v9": how many of the set's demos carry the right label
(0 to 3) and where they stand change how likely the answer is, so the models have graded preferences over the
sets. Tokens are the words (a 33-id vocabulary, no tokenizer).

Pretraining (both models, from config, no downloads): sequences of 8 (key, label) pairs of a task with a random
label, each pair's label the task's with probability 0.5, else a random one; cross-entropy on every label token
(batch 64, AdamW 3e-3, 50 warm-up steps): the models learn to infer the label from their context.
Teacher: GPT-2, 2 layers, width 64, 4 heads, `--teacher-steps` steps (seed 1234, the same for every seed).
Student: GPT-2, 1 layer, width 32, 2 heads (about a tenth of the teacher's non-embedding weights), from scratch by
default (`--student-pretrain-steps` 0; seed = the run's seed, the same start for every row of a seed): it learns
in-context label inference only from the distillation rows.
Checkpoints in `<out>/teacher.pt`, `<out>/student-<seed>.pt` (a rerun with more steps continues them).

Distillation data (the same for every row and seed): 4096 queries of tasks whose label is one of v0..v11, each
with M = 4 demo sets (`potstill.data.icl_demos.DemoSetCollator`), the teacher's logits computed once. Each row
trains the pretrained student `--steps` steps, batch 32 queries × 4 sets, AdamW 3e-3, 50 warm-up steps, clipping
1.0, batches drawn by the seed.

Rows (all on the same M-set batches):
- sft: cross-entropy on the gold answer of every variant;
- kd: `bialign` with μ = 0 (forward KL on the answer tokens of every variant: output alignment only);
- bialign: `bialign` with μ = `--mu` and margin λ = `--margin` (output + input-preference alignment).

Held-out evaluation: tasks whose label is one of v12..v15, never an answer in the distillation data (seen only
in pretraining), 256 queries, 6 demo sets each (a different draw from training's). ICL accuracy = the argmax over
the 16 label tokens is the task's label, averaged over the 6 × 256 prompts. Kendall τ (τ-a) between the teacher's
and the student's 6 demo-set scores (mean log-probability of the answer), per query, averaged over queries.

Usage: python benchmarks/bialign.py [--seeds 0 1 2] [--steps 600] [--teacher-steps 1000]
       [--student-pretrain-steps 0] [--mu 1.0] [--margin 0.01] [--only sft kd bialign] [--threads 1]
       [--out runs/bialign] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from potstill.data.icl_demos import DemoSetCollator, ICLQuery, icl_queries
from potstill.examples import icl_labels
from potstill.examples.icl_labels import VALUES, VOCAB, icl_record
from potstill.losses.bialign import bialign, demo_set_scores

VALUE_IDS = torch.tensor([VOCAB[v] for v in VALUES])
SHOTS, TRAIN_SETS, EVAL_SETS = 3, 4, 6
TRAIN_LABELS, HELD_OUT_LABELS = list(range(12)), list(range(12, 16))
ROWS = ("sft", "kd", "bialign")
TEACHER, STUDENT = (2, 64, 4), (1, 32, 2)  # layers, width, heads


def encode(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


def query(label: int, rng: random.Random) -> ICLQuery:
    """One query of the task whose answer is `label`; its pool: 3 demos with the label, 4 with other labels."""
    return icl_queries([icl_record(label, rng)])[0]


def gpt2(layers: int, width: int, heads: int, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=16, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def warmup_adamw(model: torch.nn.Module, lr: float) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))


def pretraining_batch(rng: random.Random, size: int, noise: float) -> dict[str, torch.Tensor]:
    """Label inference: 8 (key, label) pairs of a task with a random label (`icl_labels.pretraining_batch`), as a
    batch with its attention mask. Loss on every label token."""
    ids, targets = icl_labels.pretraining_batch(rng, size, noise)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "targets": targets}


def pretrained(layers: int, width: int, heads: int, seed: int, steps: int, path: Path) -> torch.nn.Module:
    """A GPT-2 from config, pretrained `steps` steps on many-shot lookups (batch 64, noise 0.5, AdamW 3e-3).
    `path` keeps model, optimizer and data-RNG state every 250 steps: a later call with more steps continues
    where the last one stopped (the same weights as one uninterrupted run)."""
    model = gpt2(layers, width, heads, seed=seed)
    if steps == 0:
        return model
    rng = random.Random(seed)
    opt, sched = warmup_adamw(model, 3e-3)
    done = 0
    if path.is_file():
        state = torch.load(path, weights_only=False)
        if state["step"] > steps:
            raise SystemExit(f"{path} holds {state['step']} steps, more than the {steps} asked: remove it")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.setstate(state["rng"])
        done = state["step"]
    start = time.time()
    for step in range(done, steps):
        batch = pretraining_batch(rng, 64, noise=0.5)
        logits = logits_of(model, batch)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            print(f"{path.stem} step {step + 1}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {"step": step + 1, "model": model.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "rng": rng.getstate()}
            torch.save(state, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
    return model


def kendall_tau(a: list[float], b: list[float]) -> float:
    """τ-a: (concordant − discordant) / number of pairs."""
    n = len(a)
    total = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            total += float((a[i] - a[j]) * (b[i] - b[j]) > 0) - float((a[i] - a[j]) * (b[i] - b[j]) < 0)
    return total / (n * (n - 1) / 2)


@torch.no_grad()
def evaluate(student: torch.nn.Module, teacher: torch.nn.Module, queries: list[ICLQuery]) -> dict[str, float]:
    collate = DemoSetCollator(encode, num_sets=EVAL_SETS, shots=SHOTS, seed=99)
    correct, taus = [], []
    teacher_correct = []
    for start in range(0, len(queries), 64):
        chunk = queries[start:start + 64]
        batch = collate(chunk, list(range(start, start + len(chunk))))
        scores = {}
        for name, model in (("student", student), ("teacher", teacher)):
            logits = logits_of(model, batch)
            scores[name] = demo_set_scores(logits, batch["targets"]).view(-1, EVAL_SETS)
            rows, cols = (batch["targets"] != -100).nonzero(as_tuple=True)
            guess = VALUE_IDS[logits[rows, cols][:, VALUE_IDS].argmax(-1)]
            hits = (guess == batch["targets"][rows, cols]).float().tolist()
            (correct if name == "student" else teacher_correct).extend(hits)
        for s, t in zip(scores["student"].tolist(), scores["teacher"].tolist(), strict=True):
            taus.append(kendall_tau(s, t))
    return {"icl_accuracy": statistics.mean(correct), "kendall_tau": statistics.mean(taus),
            "teacher_icl_accuracy": statistics.mean(teacher_correct)}


@torch.no_grad()
def distillation_set(teacher: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's training data, the same for every row and seed: 4096 queries of the training tasks × M = 4
    demo sets (`DemoSetCollator`, seed 5), with the teacher's logits computed once."""
    rng = random.Random(5)
    queries = [query(rng.choice(TRAIN_LABELS), rng) for _ in range(4096)]
    collate = DemoSetCollator(encode, num_sets=TRAIN_SETS, shots=SHOTS, seed=5)
    batch = collate(queries, list(range(len(queries))))
    del batch["demo_sets"]  # per query, not per row
    batch["teacher_logits"] = torch.cat([logits_of(teacher, {k: v[i:i + 1024] for k, v in batch.items()})
                                         for i in range(0, len(queries) * TRAIN_SETS, 1024)])
    return batch


def train_student(row: str, seed: int, data: dict[str, torch.Tensor], args: argparse.Namespace) -> torch.nn.Module:
    student = pretrained(*STUDENT, seed, args.student_pretrain_steps, args.out / f"student-{seed}.pt")
    order = torch.Generator().manual_seed(seed)
    queries = data["input_ids"].shape[0] // TRAIN_SETS
    opt, sched = warmup_adamw(student, 3e-3)
    for _ in range(args.steps):
        picked = torch.randint(0, queries, (32,), generator=order)
        rows = (picked.unsqueeze(1) * TRAIN_SETS + torch.arange(TRAIN_SETS)).flatten()
        batch = {k: v[rows] for k, v in data.items()}
        logits = logits_of(student, batch)
        if row == "sft":
            loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
        else:
            loss = bialign(logits, batch["teacher_logits"], labels=batch["targets"], num_sets=TRAIN_SETS,
                           margin=args.margin, rank_weight=args.mu if row == "bialign" else 0.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
    return student.eval()


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[str, dict[str, float]], seeds: list[int], mu: float, margin: float) -> str:
    lines = ["| row | ICL accuracy (held-out) | Kendall τ teacher–student (held-out) | ICL accuracy (seen labels) | "
             "Kendall τ (seen labels) | s / run |", "|---|---|---|---|---|---|"]
    for row in ROWS:
        got = [results[f"{row}/{s}"] for s in seeds if f"{row}/{s}" in results]
        if got:
            seconds = statistics.mean(g["seconds"] for g in got)
            name = f"bialign (μ = {mu:g}, λ = {margin:g})" if row == "bialign" else row
            lines.append(f"| {name} | {_fmt([g['icl_accuracy'] for g in got])} | "
                         f"{_fmt([g['kendall_tau'] for g in got])} | {_fmt([g['seen_icl_accuracy'] for g in got])} | "
                         f"{_fmt([g['seen_kendall_tau'] for g in got])} | {seconds:.0f} |")
    teacher = [g["teacher_icl_accuracy"] for g in results.values()][:1]
    if teacher:
        lines.append(f"| teacher | {teacher[0]:.3f} | 1 | | 1 | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--student-pretrain-steps", type=int, default=0)
    parser.add_argument("--mu", type=float, default=1.0)
    parser.add_argument("--margin", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--out", type=Path, default=Path("runs/bialign"))
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test, the numbers mean nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.teacher_steps, args.student_pretrain_steps, args.out = 5, 5, 5, args.out / "quick"
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = pretrained(*TEACHER, 1234, args.teacher_steps, args.out / "teacher.pt").eval()
    data = distillation_set(teacher)
    eval_rng = random.Random(11)
    eval_queries = [query(HELD_OUT_LABELS[i % len(HELD_OUT_LABELS)], eval_rng) for i in range(256)]
    seen_queries = [query(TRAIN_LABELS[i % len(TRAIN_LABELS)], eval_rng) for i in range(256)]
    results_path = args.out / (f"results-v2-t{args.teacher_steps}-p{args.student_pretrain_steps}-s{args.steps}"
                               f"-mu{args.mu}-m{args.margin}.json")
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for seed in args.seeds:
        for row in args.only:
            key = f"{row}/{seed}"
            if key in results:
                continue
            start = time.time()
            student = train_student(row, seed, data, args)
            seconds = time.time() - start
            seen = evaluate(student, teacher, seen_queries)
            results[key] = {**evaluate(student, teacher, eval_queries), "seconds": seconds,
                            "seen_icl_accuracy": seen["icl_accuracy"], "seen_kendall_tau": seen["kendall_tau"]}
            print(key, json.dumps(results[key]), flush=True)
            results_path.write_text(json.dumps(results, indent=1))
    print(table(results, args.seeds, args.mu, args.margin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
