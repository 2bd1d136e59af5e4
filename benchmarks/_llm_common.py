"""Shared pieces of the LLM benchmarks: TRL GKDTrainer settings, a wall-clock stop for it, and a held-out score.

- `gkd_config_kwargs`: the GKDConfig fields that make TRL's GKDTrainer comparable with potstill's loop on a CPU
  (float32, no gradient checkpointing, plain AdamW, no logging / saving / evaluation, sequential sampling).
- `TrlWallClock`: a `transformers.TrainerCallback` that stops training after the first optimizer step ending past
  a budget (the counterpart of potstill's `trainer.max_seconds`).
- `trl_gkd_inputs` / `trl_optimizer`: a potstill task's records, epoch order, optimizer and schedule handed to
  GKDTrainer, so both sides see the same batches and learning rates.
- `heldout_blocks` / `heldout_scores`: text that is not in any training set here (the Wikipedia and Lee
  background sentences of potstill's general corpus, test split, from gensim's test data), cut into blocks of
  tokens, and a student's perplexity, KL(teacher ‖ student) per token and top-1 agreement with the teacher on
  them. Written to be replaced by `potstill eval RUN --suite lm` once that exists.
- `write_jsonl`: records as JSON lines, for the data files the benchmarks write.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HELDOUT_SOURCES = ("wikipedia", "lee-background")
MIN_SENTENCE_CHARS = 40


def gkd_config_kwargs(*, out_dir: str, seed: int, max_length: int) -> dict[str, Any]:
    """GKDConfig fields shared by every TRL row (the loss, λ, lr and budget are the caller's)."""
    return dict(output_dir=out_dir, optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=False,
                use_cpu=True, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
                disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
                train_sampling_strategy="sequential", seed=seed, max_length=max_length,
                gradient_accumulation_steps=1)


def trl_wall_clock(max_seconds: float):
    """A TrainerCallback stopping TRL's loop after the first optimizer step that ends `max_seconds` after the
    start of training (`on_train_begin`: models, optimizer and data are ready). `.seconds`, `.steps`: spent."""
    from transformers import TrainerCallback

    class TrlWallClock(TrainerCallback):
        def __init__(self) -> None:
            self.started, self.seconds, self.steps = 0.0, 0.0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds, self.steps = time.perf_counter() - self.started, state.global_step
            if self.seconds >= max_seconds:
                control.should_training_stop = True
            return control

    return TrlWallClock()


def trl_gkd_inputs(task: Any, *, seed: int, batch_size: int, epochs: int = 200) -> tuple[Any, Callable]:
    """A set-up causal_lm task's training records as TRL GKDTrainer input, in potstill's epoch order: the
    `datasets.Dataset` (epochs of `shuffled_order`, read sequentially) and its collator. potstill's targets[j]
    is token j + 1 or -100; TRL's labels[j] is token j or -100; the prompt ends at the first target."""
    import torch
    from datasets import Dataset

    from potstill.train.data_order import shuffled_order

    pad = task.pad_id
    features = []
    for ex in task.train_records:
        ids, targets = ex["input_ids"], ex["targets"]
        labels = [-100] + [ids[j + 1] if targets[j] != -100 else -100 for j in range(len(ids) - 1)]
        first = next(j for j, t in enumerate(targets) if t != -100)
        features.append({"input_ids": ids, "labels": labels, "prompt": ids[:first + 1]})
    n = len(features)
    order = [i for e in range(epochs) for i in shuffled_order(n, seed=seed, epoch=e, global_batch=batch_size)
             .tolist()[: n // batch_size * batch_size]]

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        pwidth = max(len(r["prompt"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
        attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        prompts = torch.tensor([[pad] * (pwidth - len(r["prompt"])) + r["prompt"] for r in rows])  # left-padded
        prompt_mask = torch.tensor([[0] * (pwidth - len(r["prompt"])) + [1] * len(r["prompt"]) for r in rows])
        return {"input_ids": ids, "attention_mask": attention, "labels": labels, "prompts": prompts,
                "prompt_attention_mask": prompt_mask}

    return Dataset.from_list([features[i] for i in order]), collate


def trl_optimizer(student: Any, trainer_cfg: Any, *, horizon: int) -> tuple[Any, Any]:
    """AdamW and its warm-up + decay schedule exactly as potstill builds them from a recipe's `trainer`
    section (`param_groups`, `lr_lambda`), with the decay spread over `horizon` steps."""
    import torch

    from potstill.train.optim import lr_lambda, param_groups

    cfg = trainer_cfg
    optimizer = torch.optim.AdamW([g for g in param_groups(student, cfg.weight_decay) if g["params"]], lr=cfg.lr,
                                  betas=cfg.betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps or 0,
                                                                               horizon))


def heldout_blocks(tokenizer: Any, *, blocks_per_source: int, block_len: int) -> dict[str, Any]:
    """source → LongTensor [blocks_per_source, block_len]: the source's sentences (≥ 40 characters) of the general
    corpus' test split, in its order, tokenised, joined with EOS and cut into blocks (no BOS)."""
    import torch

    from potstill.data.loaders import builtin_records

    records = builtin_records("general", "test")
    eos = tokenizer.eos_token_id
    out = {}
    for source in HELDOUT_SOURCES:
        stream: list[int] = []
        need = blocks_per_source * block_len
        for r in records:
            if r["source"] == source and len(r["text"]) >= MIN_SENTENCE_CHARS:
                stream += tokenizer(r["text"], add_special_tokens=False)["input_ids"] + [eos]
                if len(stream) >= need:
                    break
        if len(stream) < need:
            raise RuntimeError(f"{source}: only {len(stream)} tokens, {need} needed")
        out[source] = torch.tensor(stream[:need]).view(blocks_per_source, block_len)
    return out


def heldout_scores(student: Any, teacher: Any, blocks: dict[str, Any], *, batch_size: int = 4) -> dict[str, float]:
    """Per source and over all sources (key prefix `all/`): the student's perplexity (`ppl`), mean KL(teacher ‖
    student) per predicted token (`kl`, nats), top-1 agreement with the teacher (`top1`), and the teacher's own
    perplexity (`teacher_ppl`). Every position but the last of a block predicts the next token."""
    import torch
    import torch.nn.functional as F

    totals: dict[str, list[float]] = {}
    student.eval()
    with torch.inference_mode():
        for source, ids in blocks.items():
            nll_s = nll_t = kl = agree = count = 0.0
            for start in range(0, len(ids), batch_size):
                batch = ids[start:start + batch_size]
                targets = batch[:, 1:].reshape(-1)
                ls = F.log_softmax(student(input_ids=batch).logits[:, :-1].float(), -1).flatten(0, 1)
                lt = F.log_softmax(teacher(input_ids=batch).logits[:, :-1].float(), -1).flatten(0, 1)
                nll_s += float(-ls.gather(1, targets[:, None]).sum())
                nll_t += float(-lt.gather(1, targets[:, None]).sum())
                kl += float((lt.exp() * (lt - ls)).sum())
                agree += float((ls.argmax(-1) == lt.argmax(-1)).sum())
                count += targets.numel()
            for key, value in (("nll", nll_s), ("teacher_nll", nll_t), ("kl", kl), ("top1", agree),
                               ("tokens", count)):
                totals.setdefault(f"{source}/{key}", [0.0])[0] += value
                totals.setdefault(f"all/{key}", [0.0])[0] += value
    out: dict[str, float] = {}
    for prefix in (*blocks, "all"):
        n = totals[f"{prefix}/tokens"][0]
        out[f"{prefix}/ppl"] = math.exp(totals[f"{prefix}/nll"][0] / n)
        out[f"{prefix}/teacher_ppl"] = math.exp(totals[f"{prefix}/teacher_nll"][0] / n)
        out[f"{prefix}/kl"] = totals[f"{prefix}/kl"][0] / n
        out[f"{prefix}/top1"] = totals[f"{prefix}/top1"][0] / n
        out[f"{prefix}/tokens"] = n
    return out


_TEACHER_LOCK = threading.Lock()  # rows of one benchmark run in threads and share the tiny teacher


def tiny_llama_teacher(folder: Path, *, layers: int, max_positions: int) -> Path:
    """--quick runs: a seeded Llama, 32 wide, with SmolLM2's tokenizer and vocabulary, saved in `folder` once
    (whole: written beside it and renamed, so a row never sees half a folder)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from potstill.assets import smollm2_path
    from potstill.io import atomic_dir

    with _TEACHER_LOCK:
        if (folder / "config.json").exists():
            return folder
        tok = AutoTokenizer.from_pretrained(smollm2_path())
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
                             tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
        with atomic_dir(folder) as tmp:
            LlamaForCausalLM(config).save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return folder


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """`rows` as JSON lines (UTF-8, the folder made first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_bbc_prompt_records(path: Path, shape: dict[str, int]) -> None:
    """`shape["records"]` BBC training articles as prompt / completion JSONL in SmolLM2's tokens (the first
    `shape["prompt"]` tokens, then the rest up to `shape["max_length"]` − 1), once: an existing file is kept."""
    import json

    from transformers import AutoTokenizer

    from potstill.assets import smollm2_path
    from potstill.data.loaders import builtin_records
    from potstill.io import atomic_write_text

    if path.exists():
        return
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    lines = []
    for record in builtin_records("bbc", "train"):
        ids = tok(" ".join(record["text"].split()), add_special_tokens=False)["input_ids"]
        if len(ids) < shape["max_length"]:
            continue
        prompt, completion = ids[:shape["prompt"]], ids[shape["prompt"]:shape["max_length"] - 1]
        lines.append(json.dumps({"prompt": tok.decode(prompt), "completion": tok.decode(completion)}))
        if len(lines) == shape["records"]:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


# --- one process per run: the parent launches workers, each prints its results as MARK + JSON lines ----------------
MARK = "@@ROW "


def fmt_mean_std(values: list[float], digits: int) -> str:
    """One value as it is; several as mean ± sample std."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def worker_results(log: Path) -> list[dict[str, Any]]:
    """The results a worker printed to its log (lines starting with MARK)."""
    return [json.loads(line[len(MARK):]) for line in log.read_text().splitlines() if line.startswith(MARK)]


def earlier_results(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The results.json at `path` when it was written with the same `settings` (its finished runs are reused),
    else a fresh one."""
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier.get("settings") == settings:
            return earlier
    return {"settings": settings, "runs": {}}


def serve_items(items: str, run: Callable[[str, int], dict[str, Any]]) -> None:
    """The worker side: `run(row, seed)` for each "row:seed" of the comma-separated `items`, each result printed as
    one MARK line with its row, seed, wall time and load average."""
    for item in items.split(","):
        row, seed = item.rsplit(":", 1)
        started = time.perf_counter()
        result = run(row, int(seed))
        result.update(row=row, seed=int(seed), wall_seconds=time.perf_counter() - started, load=os.getloadavg())
        print(MARK + json.dumps(result), flush=True)


def run_worker_pool(batches: list[list[str]], command: Callable[[list[str]], list[str]], *, jobs: int,
                    threads: int, log_dir: Path, log_suffix: str, on_result: Callable[[dict[str, Any]], None],
                    after_worker: Callable[[], None]) -> int:
    """Run `command(items)` for each batch of "row:seed" items, at most `jobs` processes at a time, each with
    `threads` OpenMP threads and its own log in `log_dir`; `on_result` gets every result a finished worker
    printed, then `after_worker()` runs (e.g. saving results.json). Returns the number of failed workers."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    pending, running, failed = list(batches), [], 0
    while pending or running:
        while pending and len(running) < jobs:
            items = pending.pop(0)
            log = log_dir / f"{items[0].replace(':', '-')}{log_suffix}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(command(items), stdout=out, stderr=subprocess.STDOUT, env=env)
            running.append((proc, log, items))
        time.sleep(0.5)
        for proc, log, items in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, log, items))
            for result in worker_results(log):
                on_result(result)
            after_worker()
            if proc.returncode:
                failed += 1
                print(f"{','.join(items)} failed (exit {proc.returncode}); see {log}", flush=True)
    return failed


def study_parser(description: str, rows: list[str] | tuple[str, ...], *, budget_seconds: float, threads: int,
                 records: int, out: str, quick_seconds: float, only_help: str) -> argparse.ArgumentParser:
    """The options both LLM studies take: budget, seeds, rows, processes, threads, data size, output, smoke run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--budget-seconds", type=float, default=budget_seconds, help="training wall time per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=rows, help=only_help)
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (each its own process)")
    parser.add_argument("--threads", type=int, default=threads, help="torch threads per run")
    parser.add_argument("--records", type=int, default=records, help="BBC prompt / completion records to train on")
    parser.add_argument("--out", default=out)
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny smoke run (tiny teacher, {quick_seconds:g} s per run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.set_defaults(quick_seconds=quick_seconds)
    return parser


def parse_study_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parsed options; a smoke run caps the budget."""
    args = parser.parse_args(argv)
    if args.quick:
        args.budget_seconds = min(args.budget_seconds, args.quick_seconds)
    return args
