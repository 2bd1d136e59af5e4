"""Self-J's judge: a causal LM with a score head that rates an (instruction, response) pair 0–9 without a reference.

Paper: Ye & Ng 2024, "Self-Judge: Selective Instruction Following with Alignment Self-Evaluation"
(arXiv 2409.00935). The authors fine-tune the whole judging LM (LoRA) to write the score digit; its score is the
expectation of the digit under the next-token distribution renormalised over "0".."9". Here the LM stays frozen
and a small `ScoreHead` replaces its output layer at the score position, which is cheap enough to train on a CPU:

    logits_k(h) = W_k · h + b_k + U_k · gelu(V h),   k = 0..9,   score = Σ_k k · softmax(logits)_k

where h is the LM's final (normed) hidden state at the last prompt position, W, b start as the LM's output rows
of the ten digit tokens, and the low-rank residual U·gelu(V·) starts at zero (U = 0). Untrained, the head gives
exactly the model's own reference-free self-evaluation; training moves it with `self_judge` (both views of the
prompt, reference-guided and reference-free, share the head, as they share the LM in the paper).

`SelfJudge` runs the prompts (`potstill.data.self_judge.judge_prompt`, chat-templated when the tokenizer has a
template), caches nothing, and offers the paper's two uses: `best_of_n` (rerank sampled responses) and
`answer_or_abstain` (selective instruction following: decline below a threshold). `fit_score_head` trains the
head on cached hidden states of the two views; its targets are two-hot over the digits by default, so a
fractional label (the recalibrated ones are) keeps its exact value (`target="hard"` rounds it to one digit, as
writing the score as a single token would).
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch
from torch import nn

from potstill.data.self_judge import MAX_SCORE, judge_prompt
from potstill.errors import UserError
from potstill.losses.self_judge import DISTILL_WEIGHT, NOREF_WEIGHT, expected_score, score_targets, self_judge


def score_token_ids(tokenizer, max_score: int = MAX_SCORE) -> list[int]:
    """The ids of the single tokens "0".."max_score"; a tokenizer that splits a digit is refused."""
    ids = []
    for digit in range(max_score + 1):
        pieces = tokenizer(str(digit), add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise UserError(f"judge tokenizer: the score {digit} is {len(pieces)} tokens, expected one token per "
                            "digit 0-9")
        ids.append(int(pieces[0]))
    return ids


class ScoreHead(nn.Module):
    """K score logits from a hidden state: the LM's digit rows (`weight` [K, D], `bias` [K]) + a zero-started
    low-rank residual of rank `rank`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, rank: int = 16) -> None:
        super().__init__()
        num_scores, hidden = weight.shape
        self.linear = nn.Linear(hidden, num_scores)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias if bias is not None else torch.zeros(num_scores))
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, num_scores, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(hidden))
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden) + self.up(nn.functional.gelu(self.down(hidden)))


def score_head(hidden: int, num_scores: int = MAX_SCORE + 1, rank: int = 16) -> ScoreHead:
    """A `ScoreHead` of this shape with zero score rows: the factory of `task: judge`, which copies the judging LM's
    digit rows in (`SelfJudge.head`); a saved head loads through it."""
    return ScoreHead(torch.zeros(num_scores, hidden), rank=rank)


class SelfJudge:
    """A frozen causal LM + `ScoreHead`: `score` rates responses with no reference (the test-time judge)."""

    def __init__(self, model, tokenizer, *, system: str | None = None, rank: int = 16,
                 max_score: int = MAX_SCORE) -> None:
        self.model, self.tokenizer, self.system, self.max_score = model.eval(), tokenizer, system, max_score
        self.token_ids = score_token_ids(tokenizer, max_score)
        out = model.get_output_embeddings()
        rows = out.weight.detach()[self.token_ids].float()
        bias = out.bias.detach()[self.token_ids].float() if getattr(out, "bias", None) is not None else None
        self.head = ScoreHead(rows, bias, rank=rank)

    def prompts(self, instructions: Sequence[str], responses: Sequence[str],
                references: Sequence[str] | None = None) -> list[str]:
        """The judging prompts as the LM reads them (with references: the reference-guided view)."""
        refs: Sequence[str | None] = references if references is not None else [None] * len(responses)
        texts = [judge_prompt(x, y, r, max_score=self.max_score)
                 for x, y, r in zip(instructions, responses, refs, strict=True)]
        if getattr(self.tokenizer, "chat_template", None) is None:
            return [f"{t}\nScore:" for t in texts]
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [self.tokenizer.apply_chat_template(system + [{"role": "user", "content": t}], tokenize=False,
                                                   add_generation_prompt=True) for t in texts]

    @torch.inference_mode()
    def features(self, prompts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
        """[N, D] float32: the LM's final hidden state at each prompt's last token (left padding)."""
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        trunk = getattr(self.model, self.model.base_model_prefix)
        device = next(self.model.parameters()).device
        rows = []
        try:
            for start in range(0, len(prompts), batch_size):
                enc = self.tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(device)
                rows.append(trunk(**enc).last_hidden_state[:, -1].float().cpu())
        finally:
            self.tokenizer.padding_side = side
        return torch.cat(rows) if rows else torch.zeros(0, self.head.linear.in_features)

    def scores_from_features(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return expected_score(self.head(features))

    def score(self, instructions: Sequence[str], responses: Sequence[str], *,
              references: Sequence[str] | None = None, batch_size: int = 16) -> torch.Tensor:
        """Expected scores 0–max_score, one per response (reference-free unless `references` are given)."""
        return self.scores_from_features(self.features(self.prompts(instructions, responses, references),
                                                       batch_size=batch_size))


def load_judge(folder: str | Path, model=None, tokenizer=None) -> SelfJudge:
    """The judge a `task: judge` run saved (`<run>/student`): its score head on the judging LM named there (or
    `model`, the same LM already loaded) with the tokenizer saved there (or `tokenizer`), and the run's system
    turn."""
    from potstill.students.save import load_factory_student

    spec = json.loads((Path(folder) / "potstill_student.json").read_text())
    if model is None:
        from transformers import AutoModelForCausalLM

        from potstill.students.loading import resolve_model_path

        path = resolve_model_path(spec["judge_model"], field=f"{folder}: judge_model")  # builtin:, folder or hub id
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)  # saved with the head
    token_ids = score_token_ids(tokenizer, int(spec["kwargs"]["num_scores"]) - 1)
    if token_ids != spec["score_token_ids"]:
        raise UserError(f"{folder}: the head was trained on score tokens {spec['score_token_ids']}, this tokenizer "
                        f"gives {token_ids}: load it with the judging LM it was trained on")
    judge = SelfJudge(model, tokenizer, system=spec.get("system"), rank=int(spec["kwargs"]["rank"]),
                      max_score=int(spec["kwargs"]["num_scores"]) - 1)
    judge.head = load_factory_student(folder).eval()
    return judge


def best_of_n(scores: Sequence[float] | torch.Tensor, groups: Sequence[Hashable]) -> dict[Hashable, int]:
    """group id → index of its best-scored response (the first one on ties): best-of-n reranking."""
    values = torch.as_tensor(scores, dtype=torch.float64)
    if len(groups) != len(values):
        raise UserError(f"best_of_n: {len(values)} scores but {len(groups)} group ids")
    best: dict[Hashable, int] = {}
    for i, g in enumerate(groups):
        if g not in best or values[i] > values[best[g]]:
            best[g] = i
    return best


def answer_or_abstain(scores: Sequence[float] | torch.Tensor, threshold: float) -> torch.Tensor:
    """Selective instruction following: True where the predicted quality reaches `threshold` (answer)."""
    return torch.as_tensor(scores, dtype=torch.float64) >= threshold


def fit_score_head(head: ScoreHead, free: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, *,
                   noref_weight: float = NOREF_WEIGHT, distill_weight: float = DISTILL_WEIGHT,
                   target: str = "two_hot", epochs: int = 30, batch_size: int = 32, lr: float = 1e-3,
                   weight_decay: float = 0.0, seed: int = 0) -> list[float]:
    """Train `head` with Self-J's loss on cached hidden states of the reference-free (`free`) and reference-guided
    (`ref`) views and their labels (scores 0–K−1); returns the mean loss of each epoch."""
    if not len(free) == len(ref) == len(labels):
        raise UserError(f"fit_score_head: {len(free)} reference-free rows, {len(ref)} reference-guided rows and "
                        f"{len(labels)} labels; expected one of each per example")
    targets = score_targets(labels, head.linear.out_features, mode=target)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    head.train()
    for _ in range(epochs):
        order, total = torch.randperm(len(free), generator=generator), 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            loss = self_judge(head(free[rows]), head(ref[rows]), labels=targets[rows], noref_weight=noref_weight,
                              distill_weight=distill_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        history.append(total / max(len(order), 1))
    head.eval()
    return history
