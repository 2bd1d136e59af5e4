"""CycleAlign's loop: a black-box ranker's agreement with the white-box policy trains the policy, over cycles.

Hong et al. 2023, "CycleAlign" (arXiv 2310.16271); the data side (agreement, prompt, parser, demo pool) is
`potstill.data.cyclealign`, the losses `potstill.losses.rrhf`. One cycle c = 1 … K:

    for every prompt x: sample n responses from the policy (temperature `temperature`)
        the black-box ranks them (its chat holds up to `demos` demonstrations from the pool)
        the white-box ranks them by its length-normalised log-prob p_i
        agreement = LCS(black-box ranking, white-box ranking)
    train the policy `epochs` passes over the ranked prompts with the ranking loss on the target ranking
    demos ← the pool plus this cycle's prompts with agreement ≥ `min_demo_agreement` (the best `demo_pool`)

`target` picks the training ranking: "agreement" (CycleAlign), "black_box" (the ranker's whole ranking: RRHF
on one ranker), or "black_box_top" (its best response only: the loss is then SFT on the top sample, best-of-n
distillation). A reply that is not a full ranking, or a request that failed, skips its prompt for the cycle and is
counted in the history row (`skipped`).

The ranker is any callable from a list of chats to a list of reply texts (or exceptions), e.g.
`endpoint_ranker(EndpointTeacher(...))`, whose response cache makes a resumed cycle free, or a Python function.
After each cycle the policy's weights (`<folder>/policy-cycle<c>.pt`) and then `<folder>/state.json` are written
atomically; a killed run resumes at its next cycle. Sampling and shuffling are seeded by (seed, cycle) and each
cycle starts a fresh AdamW, so on CPU a resumed run ends with the same weights as an uninterrupted one.

The policy reads each prompt through its tokenizer's chat template when it has one (`chat_template`, on by
default: an instruct model sees a user turn and answers in the assistant's), for sampling and for the ranking loss
alike (`potstill.data.cyclealign.prompt_token_ids`); the black-box ranker sees the plain prompt.

Defaults (the paper's are for 7B models and not stated in the spec): 3 cycles, n = 4, 32 new tokens, RRHF with
λ = 1, 1 epoch of 8 prompts a step at lr 1e-5, 2 demos from a pool of 32, demo threshold agreement ≥ 0.75.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from potstill.data.cyclealign import (
    CycleAlignState,
    agreement_demo,
    longest_common_subsequence,
    order_to_scores,
    parse_ranking,
    prompt_token_ids,
    rank_by_scores,
    ranking_messages,
    select_demos,
    update_demo_pool,
)
from potstill.errors import UserError
from potstill.io import atomic_write_bytes, atomic_write_json
from potstill.losses.rrhf import RANKING_LOSSES, mean_token_logps, ranking_alignment_loss

Ranker = Callable[[list[list[dict[str, str]]]], list[Any]]
TARGETS = ("agreement", "black_box", "black_box_top")


@dataclass(frozen=True)
class CycleAlignConfig:
    """The loop's settings (module docstring)."""

    cycles: int = 3
    samples: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    epochs: int = 1
    batch_prompts: int = 8
    lr: float = 1e-5
    loss_type: str = "rrhf"
    sft_weight: float = 1.0
    target: str = "agreement"
    demos: int = 2
    demo_pool: int = 32
    min_demo_agreement: float = 0.75
    seed: int = 0
    chat_template: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise UserError(f"target: expected one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.loss_type not in RANKING_LOSSES:
            raise UserError(f"loss_type: expected one of {', '.join(RANKING_LOSSES)}, got {self.loss_type!r}")
        if self.samples < 2:
            raise UserError(f"samples: a ranking needs at least 2 responses per prompt, got {self.samples}")
        if min(self.cycles, self.demos, self.demo_pool) < 0 or min(self.max_new_tokens, self.epochs,
                                                                      self.batch_prompts) < 1:
            raise UserError("cycles, demos, demo_pool must be >= 0; max_new_tokens, epochs, batch_prompts >= 1")


def endpoint_ranker(teacher: Any, *, max_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> Ranker:
    """A ranker over an `EndpointTeacher` (anything with `chat_many`): its cache, retries and concurrency apply;
    a request that failed for good comes back as its exception (the prompt is skipped, not the run)."""
    def rank(conversations: list[list[dict[str, str]]]) -> list[Any]:
        answers = teacher.chat_many(conversations, max_tokens=max_tokens, temperature=temperature, seed=seed)
        return [a if isinstance(a, Exception) else a.text for a in answers]
    return rank


def _sample(policy: Any, prompt_ids: list[int], config: CycleAlignConfig, eos: int | None,
            pad: int) -> list[list[int]]:
    """n sampled responses (token ids, cut after the first EOS, which is kept)."""
    inputs = torch.tensor([prompt_ids])
    out = policy.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                          temperature=config.temperature, top_k=0, top_p=1.0,
                          max_new_tokens=config.max_new_tokens, num_return_sequences=config.samples,
                          pad_token_id=pad, eos_token_id=eos)
    responses = []
    for row in out[:, len(prompt_ids):].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        responses.append(row or [pad])
    return responses


def response_logps(policy: Any, prompt_ids: Sequence[list[int]], responses: Sequence[list[list[int]]],
                   pad: int) -> torch.Tensor:
    """Length-normalised log-probs `[P, n]` of each prompt's n responses under the policy (one forward pass)."""
    rows = [list(p) + list(r) for p, group in zip(prompt_ids, responses, strict=True) for r in group]
    starts = [len(p) for p, group in zip(prompt_ids, responses, strict=True) for _ in group]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[k, :len(row)] = torch.tensor(row)
        labels[k, start:len(row)] = ids[k, start:len(row)]
        attention[k, :len(row)] = 1
    logits = policy(input_ids=ids, attention_mask=attention).logits
    logps = mean_token_logps(logits[:, :-1], labels[:, 1:])
    return logps.view(len(prompt_ids), -1)


def _save(folder: Path, policy: Any, state: CycleAlignState) -> None:
    buffer = io.BytesIO()
    torch.save(policy.state_dict(), buffer)
    atomic_write_bytes(folder / f"policy-cycle{state.cycle}.pt", buffer.getvalue())
    atomic_write_json(folder / "state.json", state.state_dict())
    for old in folder.glob("policy-cycle*.pt"):
        if old.name != f"policy-cycle{state.cycle}.pt":
            old.unlink(missing_ok=True)


def _settings(config: CycleAlignConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the killed one (all but the number of cycles)."""
    return {k: v for k, v in asdict(config).items() if k != "cycles"}


def _resume(folder: Path, policy: Any, resume: bool, config: CycleAlignConfig) -> CycleAlignState:
    state_path, settings_path = folder / "state.json", folder / "settings.json"
    if not state_path.exists():
        atomic_write_json(settings_path, _settings(config))
        return CycleAlignState()
    if not resume:
        raise UserError(f"{state_path} exists: pass resume=True (--resume) to continue that CycleAlign run, or "
                        f"remove {folder}")
    saved = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.exists() else {}
    changed = sorted(k for k, v in _settings(config).items() if saved.get(k, v) != v)
    if changed:
        raise UserError(f"{settings_path}: the run was started with other settings ({', '.join(changed)}); "
                        f"resume with the same ones (only cycles may change)")
    state = CycleAlignState.from_state_dict(json.loads(state_path.read_text(encoding="utf-8")))
    weights = folder / f"policy-cycle{state.cycle}.pt"
    if state.cycle:
        if not weights.exists():
            raise UserError(f"{weights}: missing; {state_path} says cycle {state.cycle} finished, so its policy "
                            f"weights should be there")
        policy.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return state


def _train(policy: Any, prompt_ids: list[list[int]], samples: list[list[list[int]]],
           targets: list[tuple[int, list[int]]], config: CycleAlignConfig, cycle: int, pad: int) -> float:
    """The cycle's training passes; returns the mean loss over steps."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    policy.train()
    losses = []
    for epoch in range(config.epochs):
        order = list(targets)
        random.Random(f"{config.seed}-{cycle}-{epoch}").shuffle(order)
        for start in range(0, len(order), config.batch_prompts):
            batch = order[start:start + config.batch_prompts]
            logps = response_logps(policy, [prompt_ids[p] for p, _ in batch], [samples[p] for p, _ in batch], pad)
            scores, counted = zip(*(order_to_scores(target, config.samples) for _, target in batch), strict=True)
            loss = ranking_alignment_loss(logps, torch.tensor(scores), mask=torch.tensor(counted),
                                          loss_type=config.loss_type, sft_weight=config.sft_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    policy.eval()
    return sum(losses) / len(losses) if losses else float("nan")


def run_cyclealign(policy: Any, tokenizer: Any, prompts: Sequence[str], ranker: Ranker, *,
                   config: CycleAlignConfig = CycleAlignConfig(), folder: str | Path | None = None,
                   resume: bool = False, after_cycle: Callable[[int, Any], dict[str, Any]] | None = None,
                   log: Callable[[str], None] = lambda _msg: None) -> CycleAlignState:
    """Run (or, with `resume`, continue) CycleAlign on a Hugging Face causal LM `policy` (trained in place);
    returns the final state, whose `history` has one row per cycle. `after_cycle(cycle, policy)` may add
    measurements to a cycle's row (e.g. a held-out reward); it also runs once for cycle 0, before training."""
    if not prompts:
        raise UserError("prompts: CycleAlign needs at least one prompt")
    path = Path(folder) if folder is not None else None
    state = _resume(path, policy, resume, config) if path is not None else CycleAlignState()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    prompt_ids = [prompt_token_ids(tokenizer, p, chat_template=config.chat_template) for p in prompts]
    policy.eval()
    if not state.history and after_cycle is not None:
        state.history.append({"cycle": 0, **after_cycle(0, policy)})
    while state.cycle < config.cycles:
        cycle = state.cycle + 1
        torch.manual_seed(config.seed * 1_000_003 + cycle)
        with torch.no_grad():
            samples = [_sample(policy, ids, config, eos, pad) for ids in prompt_ids]
            white_scores = response_logps(policy, prompt_ids, samples, pad).tolist()
        texts = [[tokenizer.decode(r, skip_special_tokens=True) for r in group] for group in samples]
        chats = [ranking_messages(q, texts[p], select_demos(state.demos, config.demos, exclude_query=q))
                 for p, q in enumerate(prompts)]
        replies = ranker(chats)
        if len(replies) != len(chats):
            raise ValueError(f"the ranker answered {len(replies)} of {len(chats)} chats")
        targets, candidates, agreements, errors, malformed = [], [], [], [], 0
        for p, reply in enumerate(replies):
            black = None if isinstance(reply, BaseException) else parse_ranking(reply, config.samples)
            if black is None:
                if isinstance(reply, BaseException):
                    errors.append(reply)
                else:
                    malformed += 1
                continue
            agreed = longest_common_subsequence(black, rank_by_scores(white_scores[p]))
            agreements.append(len(agreed) / config.samples)
            candidates.append(agreement_demo(prompts[p], texts[p], agreed, n=config.samples, cycle=cycle))
            targets.append((p, {"agreement": agreed, "black_box": black, "black_box_top": black[:1]}[config.target]))
        loss = _train(policy, prompt_ids, samples, targets, config, cycle, pad)
        if config.demos:
            state.demos = update_demo_pool(state.demos, candidates, capacity=config.demo_pool,
                                           min_agreement=config.min_demo_agreement)
        row: dict[str, Any] = {"cycle": cycle, "ranked": len(targets), "failed": len(errors),
                               "malformed": malformed, "skipped": len(errors) + malformed, "loss": loss,
                               "demos": len(state.demos),
                               "agreement": sum(agreements) / len(agreements) if agreements else float("nan")}
        if after_cycle is not None:
            row.update(after_cycle(cycle, policy))
        state.history.append(row)
        state.cycle = cycle
        if path is not None:
            _save(path, policy, state)
        log(f"cycle {cycle}: agreement {row['agreement']:.3f} on {len(targets)} prompts "
            f"({malformed} malformed replies, {len(errors)} failed requests), loss {loss:.3f}, "
            f"{len(state.demos)} demos" + (f"; first failure: {errors[0]}" if errors else ""))
    return state
