"""A toy in-context-learning world for BiAlign's recipe (recipes/bialign-toy.yaml): label inference from noisy
demonstrations, the setting of benchmarks/bialign.py.

A task has one answer among 16 label words v0..v15; a demonstration is "k<i> v<j>", an uninformative key word and a
label. A query's pool holds 3 demos with the task's label and 4 with other labels, so a set of 3 demos drawn from it
carries 0–3 right labels and a model that infers the label from its context prefers some sets to others.

- `trained_teacher`: a GPT-2 from config pretrained on many-shot noisy label sequences (the teacher factory);
- `write_recipe_data(folder)`: the word-level tokenizer (id 0 = padding, k0..k15 = 1..16, v0..v15 = 17..32, the
  ids the factory's model uses) and the ICL records (`potstill.data.icl_demos`: query, target, pool).

    python -m potstill.examples.icl_labels recipes/bialign-toy    # rewrites the recipe's folder
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from torch import nn

KEYS = [f"k{i}" for i in range(16)]
VALUES = [f"v{i}" for i in range(16)]
VOCAB = {"<pad>": 0, **{w: i + 1 for i, w in enumerate(KEYS + VALUES)}}
POOL_RIGHT, POOL_WRONG = 3, 4


def gpt2(layers: int = 2, width: int = 64, heads: int = 4, seed: int = 0) -> nn.Module:
    """A GPT-2 over the toy vocabulary, weights drawn from `seed` (the global RNG state is kept)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(VOCAB), n_positions=32, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def pretraining_batch(rng: random.Random, size: int, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` sequences of 8 (key, label) pairs of a task with a random label, each pair's label the task's with
    probability 1 − `noise`, else a random one; targets on the label tokens."""
    ids = torch.zeros(size, 16, dtype=torch.long)
    for b in range(size):
        label = rng.randrange(16)
        for pair in range(8):
            value = label if rng.random() >= noise else rng.randrange(16)
            ids[b, 2 * pair], ids[b, 2 * pair + 1] = VOCAB[KEYS[rng.randrange(16)]], VOCAB[VALUES[value]]
    targets = torch.full_like(ids, -100)
    targets[:, 0:-1:2] = ids[:, 1::2]
    return ids, targets


def trained_teacher(steps: int = 300, layers: int = 2, width: int = 64, heads: int = 4, lr: float = 3e-3,
                    seed: int = 1234) -> nn.Module:
    """`gpt2(layers, width, heads, seed)` pretrained `steps` steps (batch 64, AdamW `lr`, 50 warm-up steps) on
    noisy label sequences: it learns to infer a task's label from its context. Deterministic for a seed."""
    model = gpt2(layers, width, heads, seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))
    for _ in range(steps):
        ids, targets = pretraining_batch(rng, 64)
        logits = model(input_ids=ids).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


def icl_record(label: int, rng: random.Random) -> dict:
    """One query of the task whose answer is `label`, with its pool of demonstrations."""
    wrong = [rng.choice([v for v in range(16) if v != label]) for _ in range(POOL_WRONG)]
    pool = [{"input": KEYS[rng.randrange(16)], "output": VALUES[v]} for v in [label] * POOL_RIGHT + wrong]
    rng.shuffle(pool)
    return {"query": KEYS[rng.randrange(16)], "target": VALUES[label], "pool": pool}


def write_tokenizer(folder: Path) -> None:
    """The word-level tokenizer of the toy vocabulary (whitespace-split words, no special tokens added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<pad>",
                            unk_token="<pad>").save_pretrained(folder)


def write_recipe_data(folder: Path, *, train: int = 512, eval_size: int = 64, seed: int = 5) -> None:
    """`folder`/tokenizer, `folder`/train.jsonl (`train` queries whose answer is one of v0..v11) and
    `folder`/eval.jsonl (`eval_size` queries whose answer is one of v12..v15, never an answer in training)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer")
    splits = {"train.jsonl": [icl_record(rng.randrange(12), rng) for _ in range(train)],
              "eval.jsonl": [icl_record(12 + i % 4, rng) for i in range(eval_size)]}
    for name, records in splits.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    write_recipe_data(Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/bialign-toy"))
