"""On-policy distillation (GKD: Agarwal et al., 2024, "On-Policy Distillation of Language Models").

Training only on fixed sequences leaves a gap between what the student sees in training and what it
generates at inference. GKD mixes in the student's own outputs: with probability λ (`generation.lmbda`) a
micro-batch's completions are replaced by completions the student samples after the same prompts
(`generation.max_new_tokens`, temperature, top-k, top-p; TRL's defaults: 128 tokens, temperature 0.9), and
the teacher then scores those sequences as usual, so the divergence is taken on the student's distribution
of sequences. λ = 0 is plain (supervised) KD, λ = 1 fully on-policy.

The coin and the samples are seeded by (seed, micro-batch, process), so a resumed run redraws exactly the
same batches.

`revise` (optional) rewrites the sampled completions before they are collated: MGSR's sequence correction
and re-generation (`potstill.data.mgsr_scrg`, `mgsr.scrg`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from potstill.data.lm_records import prompt_of, with_completion
from potstill.data.sampling import SamplingSettings, sample_completions


def on_policy_seed(seed: int, micro_batch: int) -> int:
    """The seed of micro-batch `micro_batch`'s coin and samples on this process."""
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (seed * 1_000_003 + micro_batch) * 1_009 + rank


def on_policy_batch(batch: dict[str, Any], student: nn.Module, micro_batch: int, *, lmbda: float, seed: int,
                    examples: list[dict[str, list[int]]], settings: SamplingSettings, pad_id: int,
                    eos_id: int | None, max_length: int,
                    collate: Callable[[list[dict], list[int]], dict[str, Any]],
                    revise: Callable[[list[list[int]], list[list[int]], int], list[list[int]]] | None = None,
                    ) -> dict[str, Any]:
    """`batch` unchanged, or with probability `lmbda` the same prompts (`examples[i]` for the batch's `index`)
    followed by the `student`'s sampled completions, collated by `collate(examples, indices)` (on the
    device) and marked `on_policy`. `revise(prompts, completions, seed)`, when given, rewrites the samples."""
    seed = on_policy_seed(seed, micro_batch)
    if float(torch.rand(1, generator=torch.Generator().manual_seed(seed))) >= lmbda:
        return batch
    indices = batch["index"].tolist()
    prompts = [prompt_of(examples[i]) for i in indices]
    completions = sample_completions(student, prompts, settings=settings, pad_token_id=pad_id, eos_token_id=eos_id,
                                     seed=seed)
    if revise is not None:
        completions = revise(prompts, completions, seed)
    new = collate([with_completion(p, c, max_length) for p, c in zip(prompts, completions, strict=True)], indices)
    return {**new, "on_policy": True}
