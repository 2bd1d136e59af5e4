"""AutoDistil's claim at small scale: a weight-sharing supernet, trained once, ranks its subnets as they rank when
each is distilled on its own (Kendall τ > 0; methods-b §12's CPU check), without retraining any of them.

Teacher: all-MiniLM-L6-v2 (6 layers × 384, FFN 1536, head size 32). Supernet: a trainable copy of it,
`potstill.students.supernet.ElasticBert` over the space depth {1, 2, 3, 4, 6} × width {192, 288, 384} × FFN
{384, 768, 1536}. Loss: q-q / k-k / v-v relation MSE of the last layer against the teacher's (12 relation heads).
Data: `--steps` batches of `--batch` (8) `builtin:general` texts at `--max-length` (32) tokens for training, 64 BBC
validation articles (another source) at the same length for the held-out loss. For each seed:
1. the supernet trains `--steps` sandwich steps (the largest, the smallest and 2 random subnets per step);
2. proxy `supernet`: each candidate's held-out loss as a slice of the trained supernet (no retraining);
   proxy `init`: its held-out loss as a slice of the untrained copy (the teacher's own weights);
3. "trained": each candidate extracted from the untrained copy and distilled alone for `--steps` steps on the
   same batches with the same optimizer, then its held-out loss.
τ is Kendall's between each proxy and the trained losses over the candidates.

Usage: python benchmarks/autodistil_supernet.py [--seeds 0 1 2] [--steps 60] [--batch 8] [--max-length 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from potstill.students.supernet import (  # noqa: E402
    ElasticBert,
    ElasticSpace,
    Subnet,
    last_layer_qkv,
    sandwich_step,
    subnet_relation_loss,
)

SPACE = ElasticSpace(layers=(1, 2, 3, 4, 6), hidden=(192, 288, 384), ffn=(384, 768, 1536))
CANDIDATES = [Subnet(1, 384, 1536), Subnet(2, 384, 1536), Subnet(2, 192, 768), Subnet(3, 288, 1536),
              Subnet(4, 192, 384), Subnet(4, 384, 768), Subnet(6, 192, 1536), Subnet(2, 288, 384),
              Subnet(3, 384, 384), Subnet(1, 192, 384)]
HEADS, LR = 12, 1e-4
BATCH, MAX_LENGTH = 8, 32  # set from --batch / --max-length


def batches(tokenizer, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(texts), BATCH):
        enc = tokenizer(texts[start:start + BATCH], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        out.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


@torch.no_grad()
def teacher_qkv(teacher, data: list[dict[str, torch.Tensor]]) -> list[list[torch.Tensor]]:
    rows = []
    for inputs in data:
        with last_layer_qkv(teacher) as qkv:
            teacher(**inputs)
        rows.append([qkv[p] for p in ("query", "key", "value")])
    return rows


@torch.no_grad()
def heldout(elastic: ElasticBert, subnet: Subnet, data, targets) -> float:
    elastic.eval()
    losses = [float(subnet_relation_loss(elastic, subnet, x, t, heads=HEADS))
              for x, t in zip(data, targets, strict=True)]
    return statistics.fmean(losses)


def train(elastic: ElasticBert, pick, data, targets) -> None:
    optimizer = torch.optim.AdamW([p for p in elastic.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    elastic.train()
    for step, (inputs, target) in enumerate(zip(data, targets, strict=True)):
        sandwich_step(elastic, pick(step), inputs, target, heads=HEADS)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def kendall(a: list[float], b: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def run_seed(seed: int, steps: int, teacher, tokenizer, general: list[str], bbc: list[str]) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    texts = random.Random(seed).sample(general, steps * BATCH)
    train_data, held_data = batches(tokenizer, texts), batches(tokenizer, bbc)
    train_targets, held_targets = teacher_qkv(teacher, train_data), teacher_qkv(teacher, held_data)
    start = time.perf_counter()
    untrained = ElasticBert(copy.deepcopy(teacher).requires_grad_(False), SPACE)
    init = {c.label: heldout(untrained, c, held_data, held_targets) for c in CANDIDATES}
    supernet = ElasticBert(copy.deepcopy(teacher).requires_grad_(True), SPACE)
    train(supernet, lambda _step: SPACE.sample(rng, n_random=2), train_data, train_targets)
    proxy = {c.label: heldout(supernet, c, held_data, held_targets) for c in CANDIDATES}
    supernet_seconds = time.perf_counter() - start
    trained = {}
    for c in CANDIDATES:
        alone = ElasticBert(untrained.extract(c).requires_grad_(True), ElasticSpace((c.layers,), (c.hidden,),
                                                                                   (c.ffn,)))
        torch.manual_seed(seed)
        train(alone, lambda _step, c=c: [Subnet(c.layers, c.hidden, c.ffn)], train_data, train_targets)
        trained[c.label] = heldout(alone, Subnet(c.layers, c.hidden, c.ffn), held_data, held_targets)
    labels = [c.label for c in CANDIDATES]
    return {"seed": seed, "init": init, "supernet": proxy, "trained": trained,
            "tau_supernet": kendall([proxy[k] for k in labels], [trained[k] for k in labels]),
            "tau_init": kendall([init[k] for k in labels], [trained[k] for k in labels]),
            "supernet_seconds": supernet_seconds, "total_seconds": time.perf_counter() - start}


def main() -> None:
    global BATCH, MAX_LENGTH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    BATCH, MAX_LENGTH = args.batch, args.max_length
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    from potstill.assets import minilm_path
    from potstill.data.loaders import load_source

    teacher = AutoModel.from_pretrained(minilm_path()).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    general = [r["text"] for r in load_source("builtin:general", split="train", required=("text",))]
    bbc = [r["text"] for r in load_source("builtin:bbc", split="validation", required=("text",), limit=64)]
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, args.steps, teacher, tokenizer, general, bbc))
        r = results[-1]
        print(f"seed {seed}: τ(supernet proxy, trained) {r['tau_supernet']:+.3f}   τ(init proxy, trained) "
              f"{r['tau_init']:+.3f}   supernet {r['supernet_seconds']:.0f} s, all {r['total_seconds']:.0f} s",
              flush=True)
        for c in CANDIDATES:
            print(f"  {c.label:18s} init {r['init'][c.label]:.4f}  supernet {r['supernet'][c.label]:.4f}  "
                  f"trained {r['trained'][c.label]:.4f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    for key in ("tau_supernet", "tau_init"):
        values = [r[key] for r in results]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key}: {statistics.fmean(values):+.3f} ± {spread:.3f} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
