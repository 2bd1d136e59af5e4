"""MGSR's sequence level: sequence correction and re-generation (SCRG) of the student's on-policy samples.

Paper: Liu et al. 2024, "Multi-Granularity Semantic Revision for Large Language Model Distillation" (MGSR,
arXiv 2407.10068), the sequence level of its three. No official code; this is our reading of the method.

On-policy distillation (`potstill.data.on_policy`, GKD's λ) trains on the student's own samples, errors
included; an early wrong token drags the rest of the sample off course and the teacher then scores text no
one would write. SCRG revises each sample once before it is used:

1. the student samples a completion y after the prompt x (the usual on-policy draw);
2. teacher and student score x + y; at each completion position s the "semantic cognitive difference" is
   d_s = KL(p_T(· | x, y_<s) ‖ p_S(· | x, y_<s));
3. the error position is s* = argmax_s d_s; y_s* is replaced by the teacher's most likely token there;
4. the student samples a new suffix after x + y_<s* + teacher token, up to the original token budget.

The revised sequence x + y_<s* + ŷ_s* + y'_>s* is what the objectives then see. The prefix before s* is
kept as sampled. Regeneration is seeded from the on-policy seed, so a resumed run draws the same batches.

`word_span_ids` gives MGSR's span level (`potstill.losses.mgsr_span`) word spans from token strings: a span
starts at a token that begins with whitespace or is punctuation.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from potstill.data.sampling import SamplingSettings, sample_completions

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [B, T], mask [B, T]) → logits [B, T, V]
Regenerate = Callable[[list[list[int]], list[int]], list[list[int]]]  # (prefixes, budgets) → new suffixes


@dataclass(frozen=True)
class SCRGResult:
    """Revised completions, with each row's corrected position s* (-1: the row was left as it was), the
    teacher's token put there, and the divergence d_s* that chose it."""

    completions: list[list[int]]
    positions: list[int]
    tokens: list[int]
    divergences: list[float]


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[b, :len(row)] = 1
    return ids, mask


def position_divergences(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions at every position, `[B, T]` float32."""
    log_p = torch.log_softmax(teacher_logits.float(), -1)
    log_q = torch.log_softmax(student_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def correct_and_regenerate(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                           teacher_logits: LogitsFn, student_logits: LogitsFn, regenerate: Regenerate,
                           pad_id: int, eos_id: int | None = None) -> SCRGResult:
    """SCRG on a batch: for each prompt / completion pair, find the completion position of largest
    teacher–student KL, put the teacher's most likely token there and let `regenerate` write the rest.

    `regenerate(prefixes, budgets)` gets, for the rows it must continue, prompt + kept prefix + teacher token and
    the number of tokens still allowed (the completion's length minus the kept ones); it returns their new
    suffixes (cut to the budget here). A row whose teacher token is `eos_id`, or with no budget left, ends
    there. Empty completions are left as they are."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    out = SCRGResult([list(c) for c in completions], [-1] * len(rows), [-1] * len(rows), [0.0] * len(rows))
    live = [b for b, c in enumerate(completions) if len(c)]
    if not live:
        return out
    ids, mask = _right_padded([rows[b] for b in live], pad_id)
    device_t = teacher_logits(ids, mask)
    d = position_divergences(device_t, student_logits(ids, mask)).cpu()
    teacher_top = device_t.argmax(-1).cpu()
    prefixes, budgets, todo = [], [], []
    for i, b in enumerate(live):
        start, n = len(prompts[b]), len(completions[b])
        # completion token s is predicted at position start + s − 1
        scores = d[i, start - 1:start - 1 + n]
        s = int(scores.argmax())
        token = int(teacher_top[i, start - 1 + s])
        kept = list(completions[b][:s]) + [token]
        out.completions[b], out.positions[b], out.tokens[b] = kept, s, token
        out.divergences[b] = float(scores[s])
        if n - len(kept) > 0 and token != eos_id:
            prefixes.append(list(prompts[b]) + kept)
            budgets.append(n - len(kept))
            todo.append(b)
    if todo:
        for b, budget, suffix in zip(todo, budgets, regenerate(prefixes, budgets), strict=True):
            out.completions[b] = out.completions[b] + list(suffix)[:budget]
    return out


def scrg_reviser(teacher: nn.Module, student: nn.Module, *, logits: Callable[[nn.Module, torch.Tensor,
                 torch.Tensor], torch.Tensor], settings: SamplingSettings, pad_id: int, eos_id: int | None,
                 ) -> Callable[[list[list[int]], list[list[int]], int], list[list[int]]]:
    """The `revise(prompts, completions, seed)` hook of `potstill.data.on_policy.on_policy_batch` that runs SCRG
    with these models; `logits(model, ids, mask)` gives a model's next-token logits over the shared vocabulary.
    The suffixes are sampled like the first draw (`settings`), seeded with `seed + 1`."""

    def revise(prompts: list[list[int]], completions: list[list[int]], seed: int) -> list[list[int]]:
        def regenerate(prefixes: list[list[int]], budgets: list[int]) -> list[list[int]]:
            return sample_completions(student, prefixes, settings=replace(settings, max_new_tokens=max(budgets)),
                                      pad_token_id=pad_id, eos_token_id=eos_id, seed=seed + 1)

        was_training = student.training
        student.eval()
        try:
            result = correct_and_regenerate(prompts, completions, teacher_logits=lambda i, m: logits(teacher, i, m),
                                            student_logits=lambda i, m: logits(student, i, m),
                                            regenerate=regenerate, pad_id=pad_id, eos_id=eos_id)
        finally:
            student.train(was_training)
        return result.completions

    return revise


def word_span_ids(tokens: Sequence[str]) -> list[int]:
    """Word span ids for one sequence's token strings: a new span at each token that starts with whitespace
    (or a byte-level BPE's Ġ / Ċ / ▁ marker) and at each punctuation token, which is a span of its own."""
    ids, current, after_punct = [], -1, False
    for i, tok in enumerate(tokens):
        text = tok.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ")
        stripped = text.strip()
        punct = bool(stripped) and all(unicodedata.category(ch).startswith("P") for ch in stripped)
        if i == 0 or text[:1].isspace() or punct or after_punct:
            current += 1
        ids.append(current)
        after_punct = punct
    return ids
