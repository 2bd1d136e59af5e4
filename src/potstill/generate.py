"""Synthetic training data from a text-only teacher: prompts → teacher responses → a JSONL dataset.

`potstill generate` (and `generate_dataset` here) sends every prompt of a file to an OpenAI-compatible endpoint
(`potstill.teachers.endpoint.EndpointTeacher`) and writes one JSONL row per answered prompt, with provenance. This
is the data side of black-box distillation: sequence-level KD from an API model (Kim & Rush 2016), the
synthetic-data and reasoning-chain recipes of Shirgaonkar et al. 2024, and the rationales of Distilling
Step-by-Step (Hsieh et al. 2023).

Modes:
- plain: each row is `{prompt, completion}` (the causal_lm task's prompt_completion format), ready for an SFT or
  seq-KD recipe;
- rationale (chain of thought): the prompt is wrapped in an instruction to reason step by step and finish with a
  line `Answer: <answer>`; each row is `{input, rationale, label}`, the columns of the `step_by_step` recipe
  section. A response without an answer line is rejected.

Filter (optional): `match` keeps rows whose answer equals the record's reference (`reference_column`) after
normalisation (case, surrounding space and punctuation, thousands separators; numbers compared as numbers);
`verifier` keeps rows for which a user function `fn(record, answer) -> bool` says yes. Rejected rows go to
`<out>.rejected.jsonl` with the reason, so a filter can be audited. `potstill generate --filter program`
(program distillation) is a separate loop, `potstill.program_distillation.generate_programs`: the teacher
writes a program, a sandbox runs it, and it is kept when its result matches the gold answer.

Every row carries `provenance`: teacher (base URL, requested and served model), sampling settings, the request's
cache key, whether it came from the cache, and when the row was written. `<out>.manifest.json` sums up the run
(counts, failures, settings, start and end time). The outputs are written atomically at the end; the teacher's
response cache (SQLite, default `<out>.cache.sqlite`) is what makes a killed or partly failed run resumable: a
re-run answers every prompt already answered from the cache and asks the endpoint only for the rest. `<out>.lock`
is held while a generation runs, so a second one on the same output is refused instead of paying twice.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from potstill.errors import UserError
from potstill.io import atomic_write_json, atomic_write_text
from potstill.lockfile import hold

RATIONALE_INSTRUCTION = ("Think step by step and explain your reasoning. Then give the final answer on its own last "
                         "line, in the form `Answer: <answer>`.")
ANSWER_LINE = re.compile(r"^\s*\**\s*(?:final\s+)?answer\s*\**\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
FilterKind = Literal["none", "match", "verifier"]


@dataclass(frozen=True)
class GenerationSettings:
    """How the teacher is asked. Defaults: greedy (temperature 0), 256 new tokens, no log-probs, no system
    prompt, plain mode."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0
    system: str | None = None
    rationale: bool = False
    instruction: str = RATIONALE_INSTRUCTION

    def request_params(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "top_logprobs": self.top_logprobs}


@dataclass
class GenerationReport:
    """What a generation did; also written as `<out>.manifest.json`."""

    prompts: int = 0
    answered: int = 0
    from_cache: int = 0
    kept: int = 0
    rejected: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    requests: int = 0
    retries: int = 0


def public_url(url: str) -> str:
    """`url` without user:password and query string, for provenance (credentials never reach a file)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def conversation(prompt: str | list[dict], settings: GenerationSettings) -> list[dict]:
    """The chat messages sent for one prompt: optional system prompt, then the user turn (with the rationale
    instruction in rationale mode). A prompt that is already a list of messages is used as it is (plus the
    system prompt when it has none)."""
    if isinstance(prompt, list):
        messages = list(prompt)
        if settings.system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": settings.system})
        return messages
    content = f"{prompt}\n\n{settings.instruction}" if settings.rationale else prompt
    messages = [{"role": "user", "content": content}]
    if settings.system:
        messages.insert(0, {"role": "system", "content": settings.system})
    return messages


def split_rationale(text: str) -> tuple[str, str] | None:
    """(rationale, answer) from a chain-of-thought response: the answer is the last `Answer: …` line, the
    rationale everything before it. None when the response has no answer line or an empty rationale."""
    matches = list(ANSWER_LINE.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    answer = last.group(1).strip(" \t*`")
    rationale = text[:last.start()].strip()
    if not answer or not rationale:
        return None
    return rationale, answer


def normalise_answer(text: str) -> str:
    """Lower-case, collapse spaces, drop surrounding punctuation/quotes/markup and thousands separators."""
    text = " ".join(str(text).split()).lower().strip(" \t.,;:!?\"'`*()[]")
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


def answers_match(answer: str, reference: Any) -> bool:
    """Whether a teacher's answer equals a reference: as numbers when both parse as numbers (within 1e-6
    relative), else as normalised strings."""
    a, b = normalise_answer(answer), normalise_answer(str(reference))
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def load_prompts(path: str | Path, column: str) -> list[dict]:
    """Records of a prompts file: JSONL/JSON/CSV/TSV/Parquet (the prompt in `column`, a string or a list of chat
    messages) or .txt (one prompt per non-empty line, stored under `column`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"prompts file {path} does not exist")
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [{column: line.strip()} for line in lines if line.strip()]
    else:
        from potstill.data import load_records

        records = load_records(path, required=(column,))
    if not records:
        raise UserError(f"{path}: no prompts")
    for i, rec in enumerate(records):
        value = rec[column]
        if not (isinstance(value, str) and value.strip()) and not _is_messages(value):
            raise UserError(f"{path}: record {i + 1}: column {column!r} must be a non-empty string or a list of "
                            f"{{role, content}} messages, got {type(value).__name__}")
    return records


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))


def _row(record: dict, column: str, completion: Any, settings: GenerationSettings, provenance: dict,
         reference_column: str | None) -> tuple[dict | None, str | None, str | None]:
    """(row, answer, reason rejected). The row keeps the record's other fields; one whose name the teacher's
    output takes is kept as `source_<name>`."""
    text = completion.text
    prompt = record[column]
    if settings.rationale:
        parsed = split_rationale(text)
        if parsed is None:
            return None, None, "no `Answer:` line after a rationale"
        rationale, answer = parsed
        produced = {"input": prompt, "rationale": rationale, "label": answer, "response": text}
    else:
        answer = text.strip()
        if not answer:
            return None, None, "empty response"
        produced = {"prompt": prompt, "completion": text}
    row = {}
    for key, value in record.items():
        if key == column:
            continue
        row[f"source_{key}" if key in produced and key != reference_column else key] = value
    if reference_column and reference_column in produced:
        row[f"source_{reference_column}"] = record[reference_column]
    row.update(produced)
    if completion.logprobs is not None:
        row["logprobs"] = [asdict(t) for t in completion.logprobs]
    row["provenance"] = {**provenance, "request_key": completion.key, "cached": completion.cached,
                         "served_model": completion.model, "finish_reason": completion.finish_reason,
                         "written_at": _now()}
    return row, answer, None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sidecar(out: Path, suffix: str) -> Path:
    """`data.jsonl` → `data.<suffix>`."""
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.{suffix}")


def generate_dataset(records: Sequence[dict], teacher: Any, out: str | Path, *, column: str = "prompt",
                     settings: GenerationSettings = GenerationSettings(), filter: FilterKind = "none",
                     reference_column: str | None = None, verifier: Callable[[dict, str], bool] | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> GenerationReport:
    """Ask `teacher` (an EndpointTeacher) for every record's prompt and write the dataset to `out` (JSONL), the
    rejected rows to `<out>.rejected.jsonl` and a summary to `<out>.manifest.json`.

    Prompts are sent as chat requests with `settings`; answered prompts come back from the teacher's cache on a
    re-run. A prompt that fails for good (after the endpoint's retries) is listed in the report's `failed` and
    left out of the dataset; a re-run asks for it again. `on_progress(done, total)` is called as answers arrive.
    One generation per output at a time: `<out>.lock` is held throughout (`potstill.lockfile`), and a second
    one is refused (a `UserError` naming the holder's PID) before it sends anything.
    """
    out = Path(out)
    if filter == "match" and not reference_column:
        raise UserError("filter 'match' needs a reference column (--reference-column): the record field that holds "
                        "the expected answer")
    if filter == "verifier" and verifier is None:
        raise UserError("filter 'verifier' needs a verifier function (--verifier module:function)")
    if reference_column:
        missing = [i + 1 for i, rec in enumerate(records) if reference_column not in rec]
        if missing:
            raise UserError(f"reference column {reference_column!r} is missing from record(s) "
                            f"{', '.join(map(str, missing[:5]))}{' …' if len(missing) > 5 else ''}")
    with hold(sidecar(out, "lock"), what=f"output {out}"):
        return _generate(records, teacher, out, column=column, settings=settings, filter=filter,
                         reference_column=reference_column, verifier=verifier, on_progress=on_progress)


def _generate(records: Sequence[dict], teacher: Any, out: Path, *, column: str, settings: GenerationSettings,
              filter: FilterKind, reference_column: str | None, verifier: Callable[[dict, str], bool] | None,
              on_progress: Callable[[int, int], None] | None) -> GenerationReport:
    started, clock = _now(), time.perf_counter()
    before = dict(teacher.stats)
    total, done = len(records), 0

    def progressed(_index: int, _result: Any) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    results = teacher.chat_many([conversation(rec[column], settings) for rec in records], on_done=progressed,
                                **settings.request_params())
    provenance = {"teacher": {"base_url": public_url(getattr(teacher, "base_url", "")),
                              "model": getattr(teacher, "model", None)},
                  "settings": _settings_dict(settings)}
    report = GenerationReport(prompts=total)
    kept, rejected = [], []
    for i, (record, result) in enumerate(zip(records, results, strict=True)):
        if isinstance(result, Exception):
            report.failed.append({"record": i + 1, "error": str(result)})
            continue
        report.answered += 1
        report.from_cache += int(result.cached)
        row, answer, reason = _row(record, column, result, settings, provenance, reference_column)
        if reason is None and filter == "match" and not answers_match(answer, record[reference_column]):
            reason = f"answer {answer!r} does not match reference {record[reference_column]!r}"
        if reason is None and filter == "verifier" and not verifier(record, answer):
            reason = "rejected by the verifier"
        if reason is None:
            kept.append(row)
        else:
            rejected.append({"record": i + 1, "reason": reason, column: record[column], "response": result.text})
    report.kept, report.rejected = len(kept), len(rejected)
    report.seconds = time.perf_counter() - clock
    report.requests = teacher.stats.get("requests", 0) - before.get("requests", 0)
    report.retries = teacher.stats.get("retries", 0) - before.get("retries", 0)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    atomic_write_text(sidecar(out, "rejected.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                              for r in rejected))
    atomic_write_json(sidecar(out, "manifest.json"), {
        **provenance, "output": str(out), "column": column, "filter": filter, "reference_column": reference_column,
        "started_at": started, "finished_at": _now(), **asdict(report)})
    return report


def _settings_dict(settings: GenerationSettings) -> dict[str, Any]:
    values = asdict(settings)
    if not settings.rationale:
        values.pop("instruction")
    return values
