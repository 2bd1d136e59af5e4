"""Generated grade-school arithmetic word problems with gold answers, and a scripted program-writing teacher.

This is a *generated* data set, not GSM8K: every problem is built from templates and random numbers, and its
gold answer is computed, so it is exact. It stands in for the grade-school math problems of program
distillation (Jie & Lu, ACL Findings 2023) on a machine with no LLM that writes programs reliably.

A problem starts with a quantity and applies two operations to it, each told by a sentence:

    "mia has 17 shells . mia finds 13 more . mia loses 5 of them . how many shells does mia have now ?"

Each operation (+, −, ×, ÷) has two phrasings; the ordered pair of operations is the problem's `template`
(16 in all). `HELD_OUT_TEMPLATES` are four pairs never used in `split="train"`: each operation appears once
first and once second among them, so a held-out problem uses sentences the training problems all have, in an
order they never have (a compositional split). Numbers: the start 2-40, + and − by 2-20, × and ÷ by 2-5; every
intermediate value is a whole number ≥ 0 (÷ divides exactly).

`reference_program` writes the gold solution as a short straight-line Python program (the answer in the
variable `answer`). `scripted_reply` plays the teacher: it reads the last "Question:" of a prompt and answers
with that program in a fenced block, except with probability `error_rate` (default 0.3, the "right 70 % of the
time" of the paper's CPU check) when it writes a flawed one: a wrong operation, a wrong number, a missing step,
a program that never ends, or one with a syntax error. Its draw is a function of (question, temperature,
seed): greedy (temperature 0) always gives the same reply, and a retry with another seed draws again.
`scripted_transport` serves it as an OpenAI-compatible chat endpoint (an `httpx.MockTransport`) for
`EndpointTeacher(transport=...)`, so generation goes through the real client, cache and retries.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from potstill.errors import UserError

NAMES = ("tom", "ann", "sam", "lea", "max", "eva", "ben", "mia")
ITEMS = ("apples", "pens", "cards", "stones", "books", "shells")
OPERATIONS = ("+", "-", "*", "/")
# two phrasings per operation; {x} is the operation's number
PHRASES: dict[str, tuple[str, str]] = {
    "+": ("{n} buys {x} more .", "{n} finds {x} more ."),
    "-": ("{n} gives {x} away .", "{n} loses {x} of them ."),
    "*": ("{n} then has {x} times as many .", "each of them is swapped for {x} new ones ."),
    "/": ("{n} splits them into {x} equal piles and keeps one pile .", "{n} keeps only one in every {x} ."),
}
OPENING = "{n} has {a} {i} ."
QUESTION = "how many {i} does {n} have now ?"
HELD_OUT_TEMPLATES = frozenset({("+", "*"), ("-", "/"), ("*", "-"), ("/", "+")})
TRAIN_TEMPLATES = tuple((p, q) for p in OPERATIONS for q in OPERATIONS if (p, q) not in HELD_OUT_TEMPLATES)
FlawKind = Literal["operation", "number", "step", "hang", "syntax"]
FLAWS: tuple[FlawKind, ...] = ("operation", "number", "step", "hang", "syntax")


@dataclass(frozen=True)
class ArithProblem:
    """One problem: its text, gold answer, start value, the two (operation, number) steps, and template."""

    question: str
    answer: int
    start: int
    steps: tuple[tuple[str, int], tuple[str, int]]

    @property
    def template(self) -> str:
        return f"{self.steps[0][0]}{self.steps[1][0]}"

    def record(self) -> dict[str, Any]:
        """The JSONL record: question, answer (the gold), template."""
        return {"question": self.question, "answer": self.answer, "template": self.template}


def _apply(value: int, op: str, x: int) -> int | None:
    if op == "/":
        return value // x if value % x == 0 else None
    result = {"+": value + x, "-": value - x, "*": value * x}[op]
    return result if result >= 0 else None


def _number(rng: random.Random, op: str) -> int:
    return rng.randint(2, 5) if op in "*/" else rng.randint(2, 20)


def random_problem(rng: random.Random, template: tuple[str, str]) -> ArithProblem:
    """A problem of `template` (a pair of operations) with random numbers, name, item and phrasings."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    while True:
        start = rng.randint(2, 40)
        steps, value = [], start
        for op in template:
            x = _number(rng, op)
            value = _apply(value, op, x)  # type: ignore[assignment]
            if value is None:
                break
            steps.append((op, x))
        if value is not None:
            break
    sentences = [OPENING.format(n=name, a=start, i=item)]
    sentences += [rng.choice(PHRASES[op]).format(n=name, x=x) for op, x in steps]
    sentences.append(QUESTION.format(n=name, i=item))
    return ArithProblem(" ".join(sentences), value, start, (steps[0], steps[1]))


def arith_problems(n: int, *, split: Literal["train", "held_out", "all"] = "train", seed: int = 0,
                   exclude: set[str] | None = None) -> list[ArithProblem]:
    """`n` distinct problems: templates cycled in order (`TRAIN_TEMPLATES`, the four `HELD_OUT_TEMPLATES`, or
    all 16), numbers from `random.Random(seed)`. Questions in `exclude` are skipped (to keep splits apart)."""
    if split == "train":
        templates = list(TRAIN_TEMPLATES)
    elif split == "held_out":
        templates = sorted(HELD_OUT_TEMPLATES)
    elif split == "all":
        templates = [(p, q) for p in OPERATIONS for q in OPERATIONS]
    else:
        raise UserError(f"split: expected train, held_out or all, got {split!r}")
    rng, seen = random.Random(seed), set(exclude or ())
    problems: list[ArithProblem] = []
    for attempt in range(100 * n + 1000):
        if len(problems) == n:
            break
        problem = random_problem(rng, templates[attempt % len(templates)])
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    if len(problems) < n:
        raise UserError(f"arith_problems: only {len(problems)} distinct {split} problems, {n} asked for")
    return problems


def reference_program(problem: ArithProblem) -> str:
    """The gold solution as a straight-line program, one statement per line, the result in `answer`."""
    lines = [f"count = {problem.start}"]
    lines += [f"count = count {'//' if op == '/' else op} {x}" for op, x in problem.steps]
    return "\n".join([*lines, "answer = count"])


def _phrase_patterns() -> list[tuple[str, re.Pattern[str]]]:
    out = []
    for op, phrasings in PHRASES.items():
        for phrase in phrasings:
            pattern = re.escape(phrase).replace(re.escape("{n}"), r"\w+").replace(re.escape("{x}"), r"(\d+)")
            out.append((op, re.compile(pattern)))
    return out


_PATTERNS = _phrase_patterns()
_OPENING = re.compile(r"^(\w+) has (\d+) (\w+) \.")


def parse_problem(question: str) -> ArithProblem | None:
    """The problem a generated question states (start, steps, answer), or None when it is not one."""
    question = " ".join(question.split())
    opening = _OPENING.match(question)
    if not opening:
        return None
    found = sorted((m.start(), op, int(m.group(1))) for op, pattern in _PATTERNS for m in pattern.finditer(question))
    if len(found) != 2:
        return None
    value = int(opening.group(2))
    steps: list[tuple[str, int]] = []
    for _, op, x in found:
        next_value = _apply(value, op, x)
        if next_value is None:
            return None
        value, steps = next_value, [*steps, (op, x)]
    return ArithProblem(question, value, int(opening.group(2)), (steps[0], steps[1]))


def flawed_program(problem: ArithProblem, kind: FlawKind, rng: random.Random) -> str:
    """A plausible but wrong (or broken) program for `problem`: see the module docstring for the kinds."""
    lines = reference_program(problem).splitlines()
    step = rng.randrange(2) + 1
    op, x = problem.steps[step - 1]
    if kind == "operation":
        other = rng.choice([o for o in ("+", "-", "*") if o != op])
        lines[step] = f"count = count {other} {x}"
    elif kind == "number":
        lines[step] = f"count = count {'//' if op == '/' else op} {x + rng.choice((1, 2, 10))}"
    elif kind == "step":
        del lines[step]
    elif kind == "hang":
        lines.insert(1, "while count > 0:\n    count = count + 1")
    else:
        lines[step] = lines[step].replace("=", "==", 1) + " +"
    return "\n".join(lines)


def _draw(question: str, temperature: float, seed: int | None) -> random.Random:
    digest = hashlib.sha256(json.dumps([question, temperature, seed]).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def last_question(prompt: str) -> str:
    """The text after the last "Question:" of a prompt, up to the end of its line."""
    parts = prompt.rsplit("Question:", 1)
    return parts[-1].strip().splitlines()[0].strip() if parts[-1].strip() else ""


def scripted_reply(prompt: str, *, temperature: float = 0.0, seed: int | None = None,
                   error_rate: float = 0.3) -> str:
    """The scripted teacher's reply to a program-writing prompt (see the module docstring)."""
    problem = parse_problem(last_question(prompt))
    if problem is None:
        return "I cannot solve this problem."
    rng = _draw(problem.question, temperature, seed)
    if rng.random() < error_rate:
        program = flawed_program(problem, rng.choice(FLAWS), rng)
    else:
        program = reference_program(problem)
    return f"```python\n{program}\n```"


def scripted_transport(error_rate: float = 0.3, *, requests: list[dict] | None = None) -> Any:
    """An `httpx.MockTransport` answering `/chat/completions` with `scripted_reply` (the last user message is the
    prompt); `requests` (when given) collects every request body, to count what was asked."""
    import httpx

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if requests is not None:
            requests.append(body)
        prompt = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        text = scripted_reply(prompt, temperature=body.get("temperature", 0.0), seed=body.get("seed"),
                              error_rate=error_rate)
        return httpx.Response(200, json={"id": "scripted", "object": "chat.completion", "model": body["model"],
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": text}}],
                                         "usage": {"completion_tokens": len(text.split())}})

    return httpx.MockTransport(handle)

