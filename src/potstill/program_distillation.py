"""Program distillation, the data side: a teacher writes a program per question, kept only when it runs right.

Jie & Lu, "Leveraging Training Data in Few-Shot Prompting for Numerical Reasoning" (ACL Findings 2023): prompt
a code-capable teacher for a Python program that solves each training question; run it; accept it when
``|answer − gold| < 1e-2``; when it fails, ask again with sampling (temperature 0.5), up to a retry cap
(`max_sample_freq`, 1 in their code). The accepted (question → program) pairs then fine-tune a small code
model (plain SFT on the program tokens; see benchmarks/program_distillation.py), whose program is executed at
inference. The accepted pairs are also the pool of dynamic few-shot exemplars: the k most similar questions
with their correct programs go into the prompt (`potstill.data.program_exemplars`).

`generate_programs` (`potstill generate --filter program --reference-column answer --resample N`) does the
annotation loop through an `EndpointTeacher`:

- round 0 asks every question with the generation settings (greedy by default); round r = 1..retries asks the
  still-unsolved ones again at `retry_temperature` (default 0.5) with seed `(seed or 0) + r`, so every retry is
  its own request and its own row of the response cache;
- every prompt holds the instruction, up to `exemplars` (default 4; the paper's code uses 8) verified programs
  of the most similar questions (the seed exemplars given, plus every program verified earlier in this run),
  and the question;
- the program is the reply's first fenced code block (or the whole reply when it compiles as Python); it runs
  in the sandbox of `potstill.data.program_executor` and `check_answer` compares it with the record's
  reference (`reference_column`);
- a kept row is the record's other fields plus ``prompt`` (the question), ``completion`` (the program; the
  causal_lm task's prompt_completion format, ready for SFT), ``program_answer`` (what it printed), ``attempts``
  and ``provenance``; a question still unsolved after the last retry goes to `<out>.rejected.jsonl` with every
  attempt's status, reason and reply. Nothing is lost and no program can stop the run (a hang is a timeout);
- a request that fails for good (`EndpointError`, e.g. a malformed reply) lists the record in the report's
  `failed`, and a re-run asks again. Everything answered comes back from the response cache on a re-run: the
  same records, settings and replies give the same prompts (the exemplars too), so a killed run resumes
  without paying twice. (A retry whose exemplars changed, because a record failed before and is solved now,
  is a new prompt and is asked anew.)
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from potstill.data.program_executor import ANSWER_TOLERANCE, ExecutionLimits, verify_program
from potstill.data.program_exemplars import EMBEDDERS, Embedder, Exemplar, ExemplarIndex
from potstill.errors import UserError
from potstill.generate import GenerationReport, GenerationSettings, conversation, public_url, sidecar
from potstill.io import atomic_write_json, atomic_write_text
from potstill.lockfile import hold

PROGRAM_INSTRUCTION = ("Write a Python program that solves the question. Store the final result in a variable "
                       "named `answer`. Reply with the program only, in a ```python code block.")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class ProgramSettings:
    """How programs are sampled and verified. Defaults: 1 retry at temperature 0.5 (the paper's code), 4
    exemplars by TF-IDF similarity, the executor's default limits, tolerance 1e-2, 4 programs run at once (a
    hanging one holds one worker until its limit)."""

    retries: int = 1
    retry_temperature: float = 0.5
    exemplars: int = 4
    embedder: str | Embedder = "tfidf"
    limits: ExecutionLimits = field(default_factory=ExecutionLimits)
    tolerance: float = ANSWER_TOLERANCE
    instruction: str = PROGRAM_INSTRUCTION
    workers: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise UserError(f"workers: expected a whole number >= 1 of programs run at once, got {self.workers!r}")
        for name in ("retries", "exemplars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name}: expected a whole number >= 0, got {value!r}")
        if self.retries and not self.retry_temperature > 0:
            raise UserError(f"retry_temperature: retries need sampling, a temperature > 0; got "
                            f"{self.retry_temperature!r}")
        if isinstance(self.embedder, str) and self.embedder not in EMBEDDERS:
            raise UserError(f"embedder: expected one of {', '.join(EMBEDDERS)}, got {self.embedder!r}")


@dataclass
class ProgramReport(GenerationReport):
    """A `GenerationReport` plus the attempts made, their statuses (ok, wrong_answer, timeout, memory, output,
    blocked, error, no_program) and one summary per round."""

    attempts: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def extract_program(text: str) -> str | None:
    """The program of a reply: its first fenced code block, else the whole reply when it compiles as Python,
    else None."""
    match = _FENCE.search(text)
    if match:
        program = match.group(1).strip("\n")
        return program if program.strip() else None
    body = text.strip()
    if not body:
        return None
    try:
        compile(body, "<reply>", "exec")
    except (SyntaxError, ValueError):
        return None
    return body


def program_prompt(question: str, exemplars: Sequence[Exemplar], instruction: str = PROGRAM_INSTRUCTION) -> str:
    """The user turn: the instruction, each exemplar as "Question: …" and its program in a fenced block, then
    "Question: <question>"."""
    shots = [f"Question: {e.question}\n```python\n{e.program}\n```" for e in exemplars]
    return "\n\n".join([instruction, *shots, f"Question: {question}"])


def generate_programs(records: Sequence[dict], teacher: Any, out: str | Path, *, column: str = "question",
                      reference_column: str | None = "answer", settings: GenerationSettings = GenerationSettings(),
                      program: ProgramSettings = ProgramSettings(), exemplars: Sequence[Exemplar] = (),
                      on_progress: Callable[[int, int], None] | None = None) -> ProgramReport:
    """Annotate every record's question with a verified program (see the module docstring); write the kept rows
    to `out` (JSONL), the rest to `<out>.rejected.jsonl` and a summary to `<out>.manifest.json`.
    `on_progress(settled, total)` is called after each round. `<out>.lock` is held throughout."""
    out = Path(out)
    if not reference_column:
        raise UserError("filter 'program' needs a reference column (--reference-column): the record field that "
                        "holds the gold answer")
    missing = [i + 1 for i, rec in enumerate(records) if reference_column not in rec]
    if missing:
        raise UserError(f"reference column {reference_column!r} is missing from record(s) "
                        f"{', '.join(map(str, missing[:5]))}{' …' if len(missing) > 5 else ''}")
    bad = [i + 1 for i, rec in enumerate(records) if not isinstance(rec.get(column), str)]
    if bad:
        raise UserError(f"filter 'program': column {column!r} must hold the question as text (record {bad[0]})")
    if settings.rationale:
        raise UserError("--rationale and --filter program do not go together: the teacher writes a program")
    with hold(sidecar(out, "lock"), what=f"output {out}"):
        return _annotate(records, teacher, out, column, reference_column, settings, program, exemplars, on_progress)


def _annotate(records: Sequence[dict], teacher: Any, out: Path, column: str, reference_column: str,
              settings: GenerationSettings, program: ProgramSettings, exemplars: Sequence[Exemplar],
              on_progress: Callable[[int, int], None] | None) -> ProgramReport:
    started, clock = _now(), time.perf_counter()
    before = dict(teacher.stats)
    index = ExemplarIndex(program.embedder, exemplars)
    provenance = {"teacher": {"base_url": public_url(getattr(teacher, "base_url", "")),
                              "model": getattr(teacher, "model", None)},
                  "settings": {**asdict(settings), "retries": program.retries, "exemplars": program.exemplars,
                               "retry_temperature": program.retry_temperature, "embedder": index.name,
                               "limits": asdict(program.limits), "tolerance": program.tolerance}}
    provenance["settings"].pop("instruction")
    report = ProgramReport(prompts=len(records))
    statuses: Counter[str] = Counter()
    attempts: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(records))}
    kept: dict[int, dict] = {}
    failed: dict[int, str] = {}
    pending = list(range(len(records)))
    for round_ in range(program.retries + 1):
        if not pending:
            break
        temperature = settings.temperature if round_ == 0 else program.retry_temperature
        seed = settings.seed if round_ == 0 else (settings.seed or 0) + round_
        questions = [records[i][column] for i in pending]
        shots = index.nearest(questions, program.exemplars)
        messages = [conversation(program_prompt(q, s, program.instruction), settings)
                    for q, s in zip(questions, shots, strict=True)]
        results = teacher.chat_many(messages, max_tokens=settings.max_tokens, temperature=temperature,
                                    top_p=settings.top_p, seed=seed)
        sources = [None if isinstance(r, Exception) else extract_program(r.text) for r in results]
        golds = [records[i][reference_column] for i in pending]
        with ThreadPoolExecutor(max_workers=program.workers) as pool:
            runs = list(pool.map(lambda job: None if job[0] is None else verify_program(
                job[0], job[1], program.limits, tolerance=program.tolerance), zip(sources, golds, strict=True)))
        unsolved, solved = [], 0
        for i, shot, result, source, run in zip(pending, shots, results, sources, runs, strict=True):
            if isinstance(result, Exception):
                failed[i] = str(result)
                continue
            report.answered += 1
            report.from_cache += int(result.cached)
            if run is None:
                status, reason, value = "no_program", "no program in the reply", None
            else:
                status, reason, value = run.status, run.reason(), run.value
            statuses[status] += 1
            attempts[i].append({"attempt": round_ + 1, "temperature": temperature, "seed": seed, "status": status,
                                "reason": reason, "exemplars": len(shot), "request_key": result.key,
                                "cached": result.cached, "response": result.text})
            if status == "ok" and source is not None:
                solved += 1
                kept[i] = _kept_row(records[i], column, source, value, attempts[i], result, provenance)
                index.add(records[i][column], source)
            else:
                unsolved.append(i)
        report.rounds.append({"round": round_, "temperature": temperature, "seed": seed, "asked": len(pending),
                              "kept": solved, "failed": len(pending) - solved - len(unsolved)})
        pending = unsolved
        if on_progress is not None:
            on_progress(len(records) - len(pending), len(records))
    rejected = [{"record": i + 1, "reason": attempts[i][-1]["reason"], column: records[i][column],
                 reference_column: records[i][reference_column], "attempts": attempts[i]}
                for i in pending if i not in failed]
    rows = [kept[i] for i in sorted(kept)]
    report.failed = [{"record": i + 1, "error": failed[i]} for i in sorted(failed)]
    report.kept, report.rejected = len(rows), len(rejected)
    report.attempts, report.statuses = sum(map(len, attempts.values())), dict(sorted(statuses.items()))
    report.seconds = time.perf_counter() - clock
    report.requests = teacher.stats.get("requests", 0) - before.get("requests", 0)
    report.retries = teacher.stats.get("retries", 0) - before.get("retries", 0)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(sidecar(out, "rejected.jsonl"),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
    atomic_write_json(sidecar(out, "manifest.json"), {
        **provenance, "output": str(out), "column": column, "filter": "program",
        "reference_column": reference_column, "started_at": started, "finished_at": _now(), **asdict(report)})
    return report


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _kept_row(record: dict, column: str, source: str, value: Any, attempts: list[dict], result: Any,
              provenance: dict) -> dict:
    produced = {"prompt": record[column], "completion": source, "program_answer": value,
                "attempts": len(attempts)}
    row = {f"source_{k}" if k in produced else k: v for k, v in record.items() if k != column}
    row.update(produced)
    last = attempts[-1]
    row["provenance"] = {**provenance, "request_key": result.key, "cached": result.cached,
                         "served_model": result.model, "finish_reason": result.finish_reason,
                         "temperature": last["temperature"], "seed": last["seed"], "exemplars": last["exemplars"],
                         "written_at": _now()}
    return row
