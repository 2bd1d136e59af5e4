"""CycleAlign's data side: agreement rankings, the black-box ranking prompt and its parser, the demo pool.

Hong et al. 2023, "CycleAlign: Iterative Distillation from Black-box LLM to White-box Models for Better Human
Alignment" (arXiv 2310.16271; no official code). Each cycle, for every prompt the white-box policy samples n
responses; a black-box LLM ranks them from text alone, helped by in-context demonstrations; the white-box ranks
them by its own length-normalised log-prob. The *agreement ranking* is the longest common subsequence of the two
rankings (best first): the responses whose relative order both models agree on, in that order. It is the training
label of the ranking loss (`potstill.losses.rrhf`), and the prompts with a high agreement become the black-box's
demonstrations in the next cycle. The loop itself is `potstill.train.cyclealign_cycles`.

Choices made here (the paper gives no code): rankings are lists of 0-based response indices, best first; the
agreement rate is |LCS| / n; of equally long common subsequences the one keeping the *first* ranking's higher
items is taken (the loop passes the black-box's ranking first); a demo shows only its agreed responses, in their
sampled order and renumbered, with the agreed ranking as the answer; the pool keeps the `capacity` demos of
highest agreement (newer first on a tie, one per query); a reply that is not a full ranking of 1 … n is skipped
and counted, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

INSTRUCTION = ("You rank candidate responses to a query from the most helpful and harmless to the least. "
               "Answer with the response numbers only, best first, separated by '>', e.g. 2 > 1 > 3.")


def longest_common_subsequence(first: Sequence[int], second: Sequence[int]) -> list[int]:
    """The longest common subsequence of two rankings (module docstring for the tie rule)."""
    a, b = list(first), list(second)
    # suffix[i][j] = length of the LCS of a[i:] and b[j:]
    suffix = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            suffix[i][j] = suffix[i + 1][j + 1] + 1 if a[i] == b[j] else max(suffix[i + 1][j], suffix[i][j + 1])
    common, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            common.append(a[i])
            i, j = i + 1, j + 1
        elif suffix[i + 1][j] > suffix[i][j + 1]:
            i += 1
        else:  # on a tie drop the second ranking's item: the first ranking's higher items are kept
            j += 1
    return common


def agreement_rate(first: Sequence[int], second: Sequence[int]) -> float:
    """|LCS(first, second)| / n: 1 when the rankings agree, 1/n at worst for two orders of the same n items."""
    n = max(len(first), len(second))
    return len(longest_common_subsequence(first, second)) / n if n else 0.0


def rank_by_scores(scores: Sequence[float]) -> list[int]:
    """Indices from the highest score to the lowest (the first index first on a tie)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def order_to_scores(order: Sequence[int], n: int) -> tuple[list[float], list[bool]]:
    """Rank scores (n − position; higher = better) and a counted-mask over n responses for a possibly partial
    ranking `order` (responses not in it are not counted), the layout `potstill.losses.rrhf` reads."""
    scores, counted = [0.0] * n, [False] * n
    for position, index in enumerate(order):
        scores[index], counted[index] = float(n - position), True
    return scores, counted


@dataclass(frozen=True)
class Demo:
    """A demonstration for the black-box: a query, its responses, and the agreed ranking over them (best first,
    indices into `responses`), with the agreement rate and the cycle it came from."""

    query: str
    responses: tuple[str, ...]
    ranking: tuple[int, ...]
    agreement: float
    cycle: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "responses": list(self.responses), "ranking": list(self.ranking)}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Demo:
        return cls(query=row["query"], responses=tuple(row["responses"]), ranking=tuple(row["ranking"]),
                   agreement=float(row["agreement"]), cycle=int(row["cycle"]))


def agreement_demo(query: str, responses: Sequence[str], agreement: Sequence[int], *, n: int,
                   cycle: int) -> Demo:
    """The demo a prompt's agreement ranking makes: the agreed responses in their sampled order, renumbered."""
    shown = sorted(agreement)
    renumber = {index: k for k, index in enumerate(shown)}
    return Demo(query=query, responses=tuple(responses[i] for i in shown),
                ranking=tuple(renumber[i] for i in agreement), agreement=len(agreement) / n, cycle=cycle)


def update_demo_pool(pool: Sequence[Demo], candidates: Sequence[Demo], *, capacity: int,
                     min_agreement: float) -> list[Demo]:
    """The pool after a cycle: candidates with agreement ≥ `min_agreement` and at least two ranked responses
    join; one demo per query (the newer wins); the `capacity` best by agreement (newer first on a tie) stay."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    by_query: dict[str, tuple[int, Demo]] = {}
    joined = list(pool) + [d for d in candidates if d.agreement >= min_agreement and len(d.ranking) >= 2]
    for position, demo in enumerate(joined):
        kept = by_query.get(demo.query)
        if kept is None or demo.cycle >= kept[1].cycle:
            by_query[demo.query] = (position, demo)
    ordered = sorted(by_query.values(), key=lambda pd: (-pd[1].agreement, -pd[1].cycle, pd[0]))
    return [demo for _, demo in ordered[:capacity]]


def select_demos(pool: Sequence[Demo], k: int, *, exclude_query: str | None = None) -> list[Demo]:
    """The first `k` demos of the (best-first) pool, leaving out the query being ranked."""
    return [d for d in pool if d.query != exclude_query][:k]


def prompt_token_ids(tokenizer: Any, prompt: str, *, chat_template: bool = True) -> list[int]:
    """The policy's tokens for `prompt`, what it samples after and what the ranking loss conditions on: with
    `chat_template` and a tokenizer that has one (an instruct model), the prompt as one user turn plus the opening
    of the assistant's turn (`apply_chat_template(..., add_generation_prompt=True)`, its special tokens written by
    the template itself); else the plain text as the tokenizer encodes it."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def format_request(query: str, responses: Sequence[str]) -> str:
    lines = [f"Query: {query}", "Responses:"]
    lines += [f"[{k + 1}] {' '.join(text.split())}" for k, text in enumerate(responses)]
    lines.append(f"Rank all {len(responses)} responses, best first.")
    return "\n".join(lines)


def format_ranking(ranking: Sequence[int]) -> str:
    return " > ".join(str(i + 1) for i in ranking)


def ranking_messages(query: str, responses: Sequence[str], demos: Sequence[Demo] = (), *,
                     instruction: str = INSTRUCTION) -> list[dict[str, str]]:
    """The chat asking the black-box to rank `responses`: the instruction, each demo as a user turn and the
    assistant's answer, then the request."""
    messages = [{"role": "system", "content": instruction}]
    for demo in demos:
        messages.append({"role": "user", "content": format_request(demo.query, demo.responses)})
        messages.append({"role": "assistant", "content": format_ranking(demo.ranking)})
    messages.append({"role": "user", "content": format_request(query, responses)})
    return messages


_CHAIN = re.compile(r"\[?\s*\d+\s*\]?(?:\s*(?:>|≻)\s*\[?\s*\d+\s*\]?)+")
_NUMBER = re.compile(r"\d+")


def _as_order(numbers: Sequence[int], n: int) -> list[int] | None:
    return [k - 1 for k in numbers] if sorted(numbers) == list(range(1, n + 1)) else None


def parse_ranking(text: str, n: int) -> list[int] | None:
    """The 0-based ranking of n responses in a black-box reply, or None when the reply holds no full ranking.

    Read, in order: the last chain of numbers joined by '>' ("2 > 1 > 3", "[2] > [1] > [3]"); else the last line
    whose numbers are exactly 1 … n once each ("2, 1, 3"). Anything else (missing, repeated or unknown numbers,
    prose without a ranking) is None."""
    if not isinstance(text, str) or n < 1:
        return None
    for chain in reversed(_CHAIN.findall(text)):
        order = _as_order([int(k) for k in _NUMBER.findall(chain)], n)
        if order is not None:
            return order
    for line in reversed(text.splitlines()):
        order = _as_order([int(k) for k in _NUMBER.findall(line)], n)
        if order is not None:
            return order
    return None


@dataclass
class CycleAlignState:
    """The loop's state after `cycle` finished cycles: the demo pool and one history row per cycle."""

    cycle: int = 0
    demos: list[Demo] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"cycle": self.cycle, "demos": [d.to_dict() for d in self.demos],
                "history": [dict(row) for row in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CycleAlignState:
        return cls(cycle=int(state["cycle"]), demos=[Demo.from_dict(d) for d in state["demos"]],
                   history=[dict(row) for row in state["history"]])
