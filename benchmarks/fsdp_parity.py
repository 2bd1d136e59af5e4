"""FSDP2 sharded training against one process and DDP (issue #18): the same losses and weights, half the state
per process.

Set-up (no download): a random teacher `LlamaConfig(hidden 64, 4 layers, 4 heads, 2 KV heads, MLP 128, tied
embeddings)` under seed 0 with a byte-level BPE tokenizer trained here on 8 sentences (vocab ≈ 320); student
`init: layers_from_teacher, layers: [0, 2]`; data: 64 two-sentence texts, `max_length: 24`; objective `forward_kl`;
trainer: lr 1e-2, `max_steps` (default 12), `save_every: 6`, one thread per process, global batch 8. Runs:
- `single`: 1 process, batch 8 (`potstill run`);
- `ddp`: `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU), batch 4 per process;
- `fsdp`: `accelerate launch --config_file docs/accelerate/fsdp2.yaml` (2 processes), batch 4 per process.

Reported: the largest |loss difference| over the steps and the largest |weight difference| of the saved student
against `single`, and the bytes of the last checkpoint's student + optimizer state each process writes
(`sharded/__<rank>_0.distcp` under FSDP; under DDP the main process writes the whole `student.safetensors` +
`optimizer.pt`).

Usage: python benchmarks/fsdp_parity.py [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "what is two plus two", "two plus two is four",
         "the bird sang a song in the tree", "my friend reads a book every night", "rain fell on the old roof",
         "the sun rose over the hill"]


def make_teacher(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<bos>", "<eos>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 initializer_range=0.3, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)).save_pretrained(folder)
    tok.save_pretrained(folder)


def recipe(root: Path, name: str, batch: int, distributed: str, steps: int) -> Path:
    raw = {"name": name, "output_dir": str(root / "runs"), "task": "causal_lm", "seed": 0,
           "teacher": {"path": str(root / "teacher")}, "student": {"init": "layers_from_teacher", "layers": [0, 2]},
           "data": {"train": str(root / "train.jsonl"), "max_length": 24}, "objectives": [{"name": "forward_kl"}],
           "trainer": {"max_steps": steps, "batch_size": batch, "lr": 1e-2, "log_every": 1, "num_threads": 1,
                       "save_every": steps // 2, "distributed": distributed},
           "eval": {"throughput": False, "compare_before": False}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def launch(root: Path, path: Path, flags: list[str], port: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    cmd = ([sys.executable, "-m", "potstill", "run", str(path)] if not flags else
           [sys.executable, "-m", "accelerate.commands.launch", *flags, "--main_process_port", str(port),
            "-m", "potstill", "run", str(path)])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=900)
    if proc.returncode:
        sys.exit(f"{path.stem} failed:\n{proc.stderr[-3000:]}")


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_teacher(root / "teacher")
        (root / "train.jsonl").write_text("".join(json.dumps({"text": f"{a}, {b}"}) + "\n"
                                                  for a in TEXTS for b in TEXTS))
        launch(root, recipe(root, "single", 8, "ddp", args.steps), [], 0)
        launch(root, recipe(root, "ddp", 4, "ddp", args.steps),
               ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"], 29611)
        launch(root, recipe(root, "fsdp", 4, "fsdp", args.steps),
               ["--config_file", str(REPO / "docs" / "accelerate" / "fsdp2.yaml")], 29613)
        runs = root / "runs"
        base_losses, base = losses(runs / "single"), load_file(str(runs / "single" / "student" / "model.safetensors"))
        last = f"checkpoints/step-{args.steps:08d}"
        print(f"{args.steps} steps, global batch 8; differences against 1 process")
        print(f"{'run':<8}{'final loss':>12}{'max |Δloss|':>14}{'max |Δweight|':>15}  checkpoint state per process")
        for name in ("single", "ddp", "fsdp"):
            run = runs / name
            weights = load_file(str(run / "student" / "model.safetensors"))
            d_loss = max(abs(a - b) for a, b in zip(losses(run), base_losses, strict=True))
            d_weight = max(float((weights[k] - base[k]).abs().max()) for k in base)
            if name == "fsdp":
                sizes = [p.stat().st_size for p in sorted((run / last / "sharded").glob("*.distcp"))]
                state = " + ".join(f"rank {r}: {s / 1e3:.0f} kB" for r, s in enumerate(sizes))
            else:
                whole = sum((run / last / f).stat().st_size for f in ("student.safetensors", "optimizer.pt"))
                state = f"main process: {whole / 1e3:.0f} kB (whole)"
            print(f"{name:<8}{losses(run)[-1]:>12.6f}{d_loss:>14.2e}{d_weight:>15.2e}  {state}")


if __name__ == "__main__":
    main()
