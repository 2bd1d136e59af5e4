"""Cost of one LLM distillation step on CPU: a minimal PyTorch loop, potstill's Distiller, TRL's GKDTrainer.

Same tiny Llama pair on every side, built from configs with fixed seeds (no download): teacher 4 layers × 256
(4 heads, MLP 688), student 2 layers × 128 (2 heads), vocab 32,000; 64 random token sequences of 256; batch 4;
loss = generalized JSD (β=0.5, T=1) over every next-token position (position t predicts token t+1, so the last
position of each row does not count: 4 × 255 tokens), mean over counted tokens; AdamW lr 1e-4, no weight decay,
no gradient clipping, constant learning rate; float32; the same thread count everywhere.

Variants:
- `minimal`: a hand-written loop: teacher forward under `inference_mode`, student forward,
  `potstill.losses.generalized_jsd(..., mask=...)`, backward, `AdamW.step()`, `zero_grad()`.
- `potstill`: `potstill.train.distiller.Distiller` with `Objective.from_name("generalized_jsd", beta=0.5)`, fed
  by potstill's `causal_lm` task adapter (`CausalLMTask`) whose `setup` is replaced to hand it these models and
  pre-tokenised examples; its per-step code (collate, teacher/student signals, mask, row count) is the real one.
  Without a `causal_lm` adapter it falls back to the bare Task below. Evaluation, checkpoints and throughput off
  (`EvalConfig(every=0, compare_before=False, throughput=False)`, `save_every=0`), `log_every=1` (the loop's
  per-step bookkeeping is all inside the timed region).
- `potstill_bare` (only with `--variants`): the same Distiller fed by a bare `Task` defined here (teacher under
  `inference_mode`, tensors served as they are), to separate the loop's cost from the task adapter's.
- `trl`: TRL's `GKDTrainer` off-policy (`lmbda=0`, `beta=0.5`, `seq_kd=False`), float32 (`bf16=False`), no
  gradient checkpointing (TRL turns both on by default), `optim="adamw_torch"`, logging/saving/evaluation off,
  sequential sampler over the same data in the same order. Skipped with a message when TRL is not installed.
- `potstill_fused`: `potstill` with `trainer.fused_lm_head: true` and the objective's `chunk_size` 256: the
  student's lm_head runs inside the loss, 256 tokens at a time, so its `[4, 256, V]` logits (and their gradient)
  never exist; the teacher's logits still do (a live teacher).
- `chunked`: `minimal` with `chunk_size=512` in the loss. Its teacher runs under `no_grad` instead of
  `inference_mode`: the chunked path saves the teacher logits for its backward, which autograd refuses for
  inference tensors.

Step time: a global optimizer post-step hook (`torch.optim.optimizer.register_optimizer_step_post_hook`)
stamps the end of every `AdamW.step()`; the step time is the interval between two consecutive stamps, i.e.
everything the loop does per optimizer step (data, both forwards, loss, backward, step, zero_grad, the loop's
own bookkeeping). The same hook times every variant, so start-up and tear-down never count. Each burst runs
`--warmup` + `--steps` + 1 optimizer steps and keeps the last `--steps` intervals.

Interleaving: every burst is a fresh subprocess; each round runs every variant once (minimal, potstill, trl,
chunked, the starting point rotating by one each round), so drift hits all sides alike. Ratios are computed
inside each round and reported as median (min–max) over rounds. All subprocesses get the same environment;
`--thp 1` sets `THP_MEM_ALLOC_ENABLE=1` (transparent huge pages in PyTorch's CPU allocator), `--thp 0` leaves
it unset (PyTorch's default).

Memory: per burst, peak RSS of the subprocess (`ru_maxrss`; the parent never imports torch, so it does not
inherit a larger peak) and "peak extra" = that peak minus the RSS after imports, models and data were built
and before the loop machinery (optimizer, Distiller, GKDTrainer) was created.

Loss check: each side reports the loss it computed on its first optimizer step (same batch, same initial
weights); they must agree to float32 rounding.

Usage: python benchmarks/llm_step.py [--rounds 5] [--steps 6] [--quick] [--thp 0|1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import load_average, peak_rss_bytes, rss_bytes, span, trl_version

VARIANTS = ("minimal", "potstill", "trl", "chunked", "potstill_fused", "potstill_bare")
DEFAULT_VARIANTS = ("minimal", "potstill", "trl", "chunked", "potstill_fused")
FUSED_CHUNK = 256
LABELS = {
    "minimal": "(a) minimal PyTorch loop",
    "potstill": "(b) potstill Distiller",
    "trl": "(c) TRL GKDTrainer (λ=0)",
    "chunked": "(d) minimal, chunk_size=512",
    "potstill_fused": f"(e) Distiller, fused head {FUSED_CHUNK}",
    "potstill_bare": "(b') Distiller, bare Task",
}
MARK = "@@RESULT "
MIB = 1024 * 1024
SEED = 0


# ---------------------------------------------------------------------------------------------- worker side
def _build(args: argparse.Namespace):
    """Teacher, student (random init from configs, fixed seeds) and the token data, identical on every side."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(layers: int, hidden: int, heads: int, intermediate: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=args.seq, use_cache=False, tie_word_embeddings=False)

    torch.manual_seed(SEED)
    teacher = LlamaForCausalLM(config(4, 256, 4, 688)).float().eval()
    torch.manual_seed(SEED + 1)
    student = LlamaForCausalLM(config(2, 128, 2, 344)).float().train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(SEED + 2)
    data = torch.randint(0, args.vocab, (args.sequences, args.seq), generator=gen)
    return teacher, student, data


def _order(n: int, batch_size: int) -> list[int]:
    """Record order of potstill's Distiller for seed SEED, epoch 0 (its documented contract: a permutation drawn
    from the seed and the epoch), so that every side trains on the same batches in the same order."""
    import torch

    gen = torch.Generator().manual_seed(SEED * 1_000_003)
    perm = torch.randperm(n, generator=gen).tolist()
    return perm[: n // batch_size * batch_size]


def _shift_mask(batch: int, seq: int):
    """True where a position has a next token to predict: every position but the last of each row."""
    import torch

    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[:, -1] = False
    return mask


def _run_minimal(args, teacher, student, data, n_steps: int, chunk_size: int | None) -> tuple[list[float], str]:
    import torch

    from potstill.losses import generalized_jsd

    order = _order(len(data), args.batch)
    batches = [data[order[i:i + args.batch]] for i in range(0, len(order), args.batch)]
    attention = torch.ones(args.batch, args.seq, dtype=torch.long)
    mask = _shift_mask(args.batch, args.seq)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    losses = []
    # The chunked loss saves the teacher logits for backward; autograd refuses that for inference tensors.
    teacher_mode = torch.no_grad if chunk_size else torch.inference_mode
    for step in range(n_steps):
        ids = batches[step % len(batches)]
        with teacher_mode():
            teacher_logits = teacher(input_ids=ids, attention_mask=attention).logits
        student_logits = student(input_ids=ids, attention_mask=attention).logits
        loss = generalized_jsd(student_logits, teacher_logits, beta=0.5, mask=mask, chunk_size=chunk_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [float(x) for x in losses[:1]], ""


def _bench_task(teacher, student, data, args):
    """A potstill `Task` that serves pre-tokenised token tensors; the signals are next-token logits [B, T, V]."""
    import torch

    from potstill.tasks.base import Task

    class TokenTask(Task):
        signal_kind = "logits"
        name = "bench_causal_lm"

        def __init__(self) -> None:  # no recipe: models and data are built by the benchmark
            self.recipe, self.run_dir, self.device = None, Path("."), torch.device("cpu")
            self.teacher, self.student = teacher, student
            self.train_records = [{"input_ids": row} for row in data]
            self.eval_records = []
            self._attention = torch.ones(args.batch, args.seq, dtype=torch.long)
            self._mask = _shift_mask(args.batch, args.seq)

        def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
            pass

        def collate(self, records, indices):
            ids = torch.stack([r["input_ids"] for r in records])
            return {"input_ids": ids, "attention_mask": self._attention, "mask": self._mask}

        def count_rows(self, batch) -> int:
            return int(batch["mask"].sum())

        def teacher_signal(self, batch):
            with torch.inference_mode():
                return self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        def student_signal(self, model, batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        def signal_mask(self, batch):
            return batch["mask"]

        def evaluate(self, model, *, role: str = "student") -> dict[str, float]:
            return {}

        def save_student(self, model, path: Path) -> None:
            pass

    return TokenTask()


def _recipe(args: argparse.Namespace, fused: bool = False, chunk_size: int | None = None):
    """The run as a potstill recipe (causal_lm task). Teacher and student come from the benchmark, not from it.
    `fused`: `trainer.fused_lm_head`; `chunk_size`: the objective's (FUSED_CHUNK tokens when fused and None)."""
    from potstill.config import CausalLMRecipe

    chunk_size = chunk_size or (FUSED_CHUNK if fused else None)
    params = {"beta": 0.5, **({"chunk_size": chunk_size} if chunk_size else {})}

    return CausalLMRecipe.model_validate({
        "name": "llm_step", "task": "causal_lm", "seed": SEED,
        "teacher": {"path": "built-by-benchmarks/llm_step.py"},
        "student": {"init": "from_config", "config": {"num_hidden_layers": 2, "hidden_size": 128}},
        "data": {"train": {"path": "random-tokens"}},
        "objectives": [{"name": "generalized_jsd", "params": params}],
        "trainer": {"max_steps": 1, "batch_size": args.batch, "lr": args.lr, "weight_decay": 0.0,
                    "schedule": "constant", "warmup_steps": 0, "max_grad_norm": None, "log_every": 1,
                    "save_every": 0, "num_threads": args.threads, "fused_lm_head": fused},
        "eval": {"every": 0, "compare_before": False, "throughput": False},
    })


def _causal_lm_task(teacher, student, data, recipe, run_dir: Path):
    """potstill's `causal_lm` adapter with its per-step code untouched (collate, `prepare_batch`, signals, mask,
    row count); only `setup` is replaced, to hand it the benchmark's models and pre-tokenised examples instead
    of loading a tokenizer, checkpoints and text files. None when this potstill has no causal_lm task."""
    try:
        from potstill.tasks.causal_lm import CausalLMTask
    except ImportError:
        return None

    class BenchCausalLM(CausalLMTask):
        def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
            self.teacher, self.student, self.tokenizer = teacher, student, None
            self.vocab_size, self.pad_id = teacher.config.vocab_size, 0
            self.topk_cache, self.seq_kd_file, self.train_format = None, None, "text"  # no cache, no seq-KD
            # The adapter's example format: targets[j] = token j + 1, -100 at the last position.
            self.train_records = [{"input_ids": row, "targets": row[1:] + [-100]} for row in data.tolist()]
            self.eval_records = []

        def save_student(self, model, path: Path) -> None:  # after the loop; nothing to keep
            pass

    return BenchCausalLM(recipe, run_dir=run_dir)


def _run_potstill(args, teacher, student, data, n_steps: int, bare: bool = False, fused: bool = False,
                  chunk_size: int | None = None) -> tuple[list[float], str]:
    from potstill.train.distiller import Distiller, Objective

    run_dir = Path(tempfile.mkdtemp(prefix="llm_step_potstill_"))
    try:
        recipe = _recipe(args, fused=fused, chunk_size=chunk_size)
        task = None if bare else _causal_lm_task(teacher, student, data, recipe, run_dir)
        used = "causal_lm adapter"
        if task is None:
            task, used = _bench_task(teacher, student, data, args), "bare Task of this file"
        trainer = recipe.trainer.model_copy(update={"max_steps": n_steps})
        objectives = [Objective.from_name(o.name, o.weight, **o.params) for o in recipe.objectives]
        distiller = Distiller(task, objectives, trainer, run_dir=run_dir, seed=SEED, eval_config=recipe.eval)
        distiller.fit(overwrite=True)
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        return [float(first["loss"])], used
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_trl(args, teacher, student, data, n_steps: int) -> tuple[list[float], str]:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    # GKDTrainer needs a tokenizer only for its pad id (used when generating, never at λ=0): a two-word one.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
        pad_token="<pad>", unk_token="<unk>")
    order = _order(len(data), args.batch)
    dataset = Dataset.from_dict({"input_ids": data[order].tolist()})

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    out_dir = tempfile.mkdtemp(prefix="llm_step_trl_")
    try:
        config = GKDConfig(
            output_dir=out_dir, lmbda=0.0, beta=0.5, seq_kd=False, max_steps=n_steps,
            per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=args.lr,
            weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
            optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=False, train_sampling_strategy="sequential",
            seed=SEED, max_length=args.seq,
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                             data_collator=collate, processing_class=tokenizer)
        losses: list[torch.Tensor] = []
        step_fn = trainer.training_step

        def training_step(*a, **k):  # records the loss it returns; the computation is untouched
            loss = step_fn(*a, **k)
            losses.append(loss)
            return loss

        trainer.training_step = training_step
        torch.set_num_threads(args.threads)
        trainer.train()
        return [float(x) for x in losses[:1]], ""
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _worker(args: argparse.Namespace) -> None:
    """Run the variants named by `--worker` (comma-separated) one after the other in this process; print one
    result line each. Memory is only meaningful for a single variant per process."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(args.threads)
    variants = args.worker.split(",")
    if "trl" in variants:
        import trl.experimental.gkd  # noqa: F401  (imported before the baseline, like potstill's modules)
    import potstill.train.distiller  # noqa: F401
    from potstill.losses import generalized_jsd  # noqa: F401

    stamps: list[tuple[float, float]] = []

    def stamp(optimizer, _args, _kwargs) -> None:
        if type(optimizer) is torch.optim.AdamW:  # not accelerate's wrapper around it
            stamps.append((time.perf_counter(), time.process_time()))

    register_optimizer_step_post_hook(stamp)
    n_steps = args.warmup + args.steps + 1
    for variant in variants:
        teacher, student, data = _build(args)
        stamps.clear()
        baseline = rss_bytes()
        if variant in ("minimal", "chunked"):
            chunk_size = 512 if variant == "chunked" else None
            first_loss, used = _run_minimal(args, teacher, student, data, n_steps, chunk_size)
        elif variant in ("potstill", "potstill_bare", "potstill_fused"):
            first_loss, used = _run_potstill(args, teacher, student, data, n_steps, bare=variant == "potstill_bare",
                                             fused=variant == "potstill_fused")
        else:
            first_loss, used = _run_trl(args, teacher, student, data, n_steps)
        if len(stamps) != n_steps:
            raise RuntimeError(f"{variant}: expected {n_steps} optimizer steps, saw {len(stamps)}")
        intervals = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup:]
        cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup:]
        print(MARK + json.dumps({
            "variant": variant, "intervals": intervals, "cpu": cpu, "first_loss": first_loss[0], "task": used,
            "peak": peak_rss_bytes(), "baseline": baseline, "threads": torch.get_num_threads(),
        }), flush=True)
        del teacher, student, data


# ---------------------------------------------------------------------------------------------- parent side
def _child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if args.thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def _burst(args: argparse.Namespace, variants: list[str]) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", ",".join(variants), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--vocab", str(args.vocab),
           "--seq", str(args.seq), "--batch", str(args.batch), "--sequences", str(args.sequences),
           "--lr", str(args.lr)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(args))
    found = [json.loads(line[len(MARK):]) for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or len(found) != len(variants):
        raise RuntimeError(f"{','.join(variants)} burst failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return found


def _main(args: argparse.Namespace) -> int:
    variants = [v for v in VARIANTS if v in args.variants]
    if "trl" in variants and not trl_version():
        print("TRL is not installed: skipping (c). Install it with `pip install -e '.[bench]'`.")
        variants.remove("trl")
    versions = ""
    if "trl" in variants:
        versions = f", trl {trl_version()}"
    print(f"LLM distillation step, CPU: teacher Llama 4×256 → student 2×128, vocab {args.vocab}, seq {args.seq}, "
          f"batch {args.batch}, {args.sequences} sequences; generalized JSD β=0.5 T=1, AdamW lr {args.lr}, fp32, "
          f"{args.threads} threads")
    print(f"THP_MEM_ALLOC_ENABLE={'1' if args.thp else 'unset'}; {args.rounds} interleaved rounds × "
          f"{len(variants)} variants, {'all in one process (--quick)' if args.quick else 'each burst a fresh process'}"
          f": {args.warmup} warm-up + {args.steps} timed "
          f"steps{versions}; python {sys.version.split()[0]}")
    print(f"load average at start: {load_average()}")
    if args.quick:
        print("--quick: a smoke test (tiny shapes, 2 steps, one process); its times and memory mean nothing")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        if args.quick:  # one process for every variant: fast, but its memory numbers mean nothing
            for found in _burst(args, variants):
                results[found["variant"]].append(found)
        else:  # rotate the order each round so that no side always runs first or last
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                results[v].append(_burst(args, [v])[0])
        loads.append(os.getloadavg()[0])
        line = "  ".join(f"{v} {statistics.median(results[v][-1]['intervals']):.3f}s "
                         f"(cpu {statistics.median(results[v][-1]['cpu']):.3f}s)" for v in variants)
        print(f"round {r + 1}/{args.rounds}: {line}  (load {load_average()})", flush=True)

    def wall(b: dict) -> float:
        return statistics.median(b["intervals"])

    def cpu(b: dict) -> float:
        return statistics.median(b["cpu"])

    def extra_mem(b: dict) -> float:
        return (b["peak"] - b["baseline"]) / MIB

    def per_round(v: str, key) -> list[float]:
        return [key(b) for b in results[v]]

    print()
    header = (f"{'variant':<30} {'wall s/step':>22} {'CPU s/step':>22} {'peak extra MiB':>18} {'peak RSS MiB':>13} "
              f"{'first-batch loss':>17}")
    print(header)
    print("-" * len(header))
    for v in variants:
        extra_s, peak_s = "-", "-"
        if not args.quick:
            extra_s = span(per_round(v, extra_mem), "{:.0f}")
            peak_s = f"{statistics.median(b['peak'] / MIB for b in results[v]):.0f}"
        print(f"{LABELS[v]:<30} {span(per_round(v, wall)):>22} {span(per_round(v, cpu)):>22} {extra_s:>18} "
              f"{peak_s:>13} {results[v][0]['first_loss']:>17.9g}")
    print("(median over rounds of each burst's median step, (min–max) over rounds; CPU = process user+sys time, "
          "all threads)\n")

    def ratio(a: str, b: str, key) -> str:
        return span([key(x) / key(y) for x, y in zip(results[a], results[b], strict=True)])

    pairs = [("potstill", "minimal", "≤ 1.03"), ("trl", "potstill", "≥ 1.3"), ("trl", "minimal", ""),
             ("chunked", "minimal", ""), ("potstill_fused", "minimal", ""), ("potstill_fused", "potstill", ""),
             ("potstill_bare", "minimal", ""), ("potstill", "potstill_bare", "")]
    print(f"{'ratio, per round':<22} {'wall time':>22} {'CPU time':>22} {'peak extra memory':>22}  target")
    for a, b, target in pairs:
        if {a, b} <= set(variants):
            mem = ratio(a, b, extra_mem) if not args.quick else "-"
            print(f"{a + ' / ' + b:<22} {ratio(a, b, wall):>22} {ratio(a, b, cpu):>22} {mem:>22}  "
                  f"{'time ' + target if target else ''}")
    if {"potstill", "trl"} <= set(variants) and not args.quick:
        print(f"{'potstill / trl':<22} {'':>22} {'':>22} {ratio('potstill', 'trl', extra_mem):>22}  memory < 1")
    first = {v: results[v][0]["first_loss"] for v in variants}
    ref = first[variants[0]]
    worst = max(abs(x - ref) / max(abs(ref), 1e-30) for x in first.values())
    print(f"\nfirst-batch loss: {', '.join(f'{v} {x:.9g}' for v, x in first.items())}; "
          f"max relative difference {worst:.1e} ({'same' if worst < 1e-4 else 'DIFFERENT'})")
    for v in variants:
        if results[v][0]["task"]:
            print(f"{v}: the Distiller was fed by the {results[v][0]['task']}")
    threads = {v: {b["threads"] for b in results[v]} for v in variants}
    print(f"torch threads after each run: {threads}")
    print(f"load average (1 min) over the run: {span(loads, '{:.2f}')}; at end: {load_average()}")
    return 0 if worst < 1e-4 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (A B C D A B C D ...)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per burst")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each burst")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min): small vocab and seq")
    parser.add_argument("--thp", type=int, choices=(0, 1), default=0,
                        help="1: THP_MEM_ALLOC_ENABLE=1 for every subprocess; 0: unset (PyTorch default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                        help="potstill_bare (not run by default): the Distiller fed by a bare Task defined here "
                             "instead of the causal_lm adapter, to tell loop costs from task costs")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # comma-separated variants to run in this process
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.quick:
        args.rounds, args.steps, args.vocab, args.seq, args.sequences = 1, 2, 4_000, 64, 16
    return _main(args)


if __name__ == "__main__":
    sys.exit(main())
