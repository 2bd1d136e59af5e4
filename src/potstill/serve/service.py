"""Request handling for `potstill serve`: fault settings, OpenAI-shaped errors, request validation, the request
log and the response bodies (`_Service`, the state behind one app). See `potstill.serve` for the API."""

from __future__ import annotations

import hmac
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.errors import UserError
from potstill.teachers.endpoint import MAX_TOP_LOGPROBS

from .generation import Generation, _context_length, generate

#: `max_tokens` of a completion request that gives none (OpenAI's legacy default).
DEFAULT_COMPLETION_TOKENS = 16


@dataclass
class FaultSettings:
    """Injected faults. `fail_rate` of generation requests get `fail_status` (with a `Retry-After: retry_after`
    header when that is set) before any generation; `delay_rate` of them first sleep `delay_s` seconds. Both are
    drawn from `random.Random(seed)`, so a sequential test sees the same faults every run."""

    fail_rate: float = 0.0
    fail_status: int = 500
    delay_rate: float = 0.0
    delay_s: float = 0.0
    seed: int = 0
    retry_after: float | None = None

    def __post_init__(self) -> None:
        for name in ("fail_rate", "delay_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{name}: expected a fraction in [0, 1], got {value}")
        if not 400 <= self.fail_status <= 599:
            raise UserError(f"fail_status: expected an HTTP error status (400-599), got {self.fail_status}")
        if self.delay_s < 0:
            raise UserError(f"delay_s: expected seconds >= 0, got {self.delay_s}")
        if self.retry_after is not None and self.retry_after < 0:
            raise UserError(f"retry_after: expected seconds >= 0, got {self.retry_after}")


class _ApiError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -- request validation -----------------------------------------------------------------------------------------

def _int_field(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise _ApiError(400, f"{name} must be an integer {bounds}, got {value!r}", param=name)
    return value


def _float_field(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (value > low if low_open else value >= low) or value > high:
        raise _ApiError(400, f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}",
                        param=name)
    return float(value)


def _message_text(message: Any, i: int) -> tuple[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _ApiError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _ApiError(400, f"messages[{i}].content: only text parts are supported",
                                param=f"messages[{i}].content")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise _ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                        param=f"messages[{i}].content")
    return message["role"], content


class _Service:
    """The state behind one app: model, tokenizer, lock, fault RNG, request log."""

    def __init__(self, model, tokenizer, *, model_name: str, faults: FaultSettings, request_log: str | Path | None,
                 api_key: str | None, max_tokens_limit: int, aliases: tuple[str, ...] = ()) -> None:
        import random

        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.accepted_names = {model_name, *aliases}
        self.faults, self.max_tokens_limit = faults, max_tokens_limit
        self._expected_auth = f"Bearer {api_key}".encode() if api_key else None
        self.generation_lock = threading.Lock()
        self._fault_rng = random.Random(faults.seed)
        self._log_lock = threading.Lock()
        self._log_path = None if request_log is None else Path(request_log)
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_path.touch()
        self.created = int(time.time())
        self.context = _context_length(model)

    def log(self, path: str, body_sha256: str | None, status: int, fault: bool) -> None:
        if self._log_path is None:
            return
        line = json.dumps({"time": time.time(), "path": path, "body_sha256": body_sha256, "status": status,
                           "fault": fault})
        with self._log_lock, open(self._log_path, "a", encoding="utf-8") as f:  # one whole line per write
            f.write(line + "\n")

    def check_auth(self, request) -> None:
        if self._expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected_auth):
            raise _ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                            code="invalid_api_key")

    def draw_faults(self) -> tuple[bool, bool]:
        fail = self._fault_rng.random() < self.faults.fail_rate
        delay = self._fault_rng.random() < self.faults.delay_rate
        return fail, delay

    def fault_error(self) -> _ApiError:
        status = self.faults.fail_status
        headers = {} if self.faults.retry_after is None else {"Retry-After": f"{self.faults.retry_after:g}"}
        kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        return _ApiError(status, f"injected fault (fail_rate={self.faults.fail_rate:g})", kind=kind,
                         code="injected_fault", headers=headers)

    def prompt_ids(self, kind: str, body: dict) -> list[int]:
        tok = self.tokenizer
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _ApiError(400, "messages must be a non-empty list", param="messages")
            turns = [_message_text(m, i) for i, m in enumerate(messages)]
            if getattr(tok, "chat_template", None):
                try:
                    text = tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                                   add_generation_prompt=True)
                except Exception as err:  # jinja raises its own errors (e.g. "roles must alternate")
                    raise _ApiError(400, f"the chat template rejected the messages: {err}", param="messages") \
                        from err
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                text = "".join(f"{r}: {c}\n" for r, c in turns) + "assistant:"
                ids = tok(text)["input_ids"]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise _ApiError(400, "prompt must be a string (one prompt per request)", param="prompt")
            ids = tok(prompt)["input_ids"]
        if not ids:
            raise _ApiError(400, "the prompt is empty after tokenization", param="prompt")
        if self.context is not None and len(ids) >= self.context:
            raise _ApiError(400, f"the prompt is {len(ids)} tokens; the model's context is {self.context}",
                            param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
        return ids

    def parse(self, kind: str, body: Any) -> dict:
        if not isinstance(body, dict):
            raise _ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in self.accepted_names:
            raise _ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                            param="model", code="model_not_found")
        if body.get("stream"):
            raise _ApiError(400, "streaming is not supported", param="stream")
        if body.get("echo"):
            raise _ApiError(400, "echo is not supported", param="echo")
        if body.get("n", 1) != 1:
            raise _ApiError(400, f"only n=1 is supported, got n={body['n']!r}", param="n")
        default_tokens = self.max_tokens_limit if kind == "chat" else DEFAULT_COMPLETION_TOKENS
        name = "max_completion_tokens" if kind == "chat" and body.get("max_tokens") is None else "max_tokens"
        max_tokens = _int_field(body, name, default_tokens, 1)
        temperature = _float_field(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _float_field(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _ApiError(400, f"seed must be an integer, got {seed!r}", param="seed")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
            raise _ApiError(400, "stop must be a non-empty string or a list of them", param="stop")
        if kind == "chat":
            wants = body.get("logprobs")
            if wants is not None and not isinstance(wants, bool):
                raise _ApiError(400, f"logprobs must be true or false, got {wants!r}", param="logprobs")
            k = _int_field(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
            if body.get("top_logprobs") is not None and not wants:
                raise _ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            top_logprobs = k if wants else None
        else:
            top_logprobs = _int_field(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _ApiError(400, "messages must be a non-empty list", param="messages")
            for i, message in enumerate(messages):
                _message_text(message, i)
        return {"kind": kind, "body": body, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed, "stop": stop, "top_logprobs": top_logprobs}

    def run(self, params: dict) -> Generation:
        """Tokenize and generate, holding the generation lock; raises _ApiError for a prompt that does not fit."""
        with self.generation_lock:
            ids = self.prompt_ids(params["kind"], params["body"])
            limit = self.max_tokens_limit if self.context is None else min(self.max_tokens_limit,
                                                                           self.context - len(ids))
            return generate(self.model, self.tokenizer, ids, max_tokens=min(params["max_tokens"], limit),
                            temperature=params["temperature"], top_p=params["top_p"], seed=params["seed"],
                            stop=params["stop"], top_logprobs=params["top_logprobs"])

    def format(self, kind: str, gen: Generation, want_logprobs: bool) -> dict:
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                 "total_tokens": gen.prompt_tokens + gen.completion_tokens}
        if kind == "chat":
            logprobs = None
            if want_logprobs:
                logprobs = {"content": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                     "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode("utf-8"))} for a, v in top]}
                    for t, lp, top in gen.tokens]}
            choice = {"index": 0, "message": {"role": "assistant", "content": gen.text}, "logprobs": logprobs,
                      "finish_reason": gen.finish_reason}
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": self.model_name, "choices": [choice], "usage": usage}
        logprobs = None
        if want_logprobs:
            offsets, at = [], 0
            for t, _, _ in gen.tokens:
                offsets.append(at)
                at += len(t)
            tops = []
            for _, _, top in gen.tokens:
                alts: dict[str, float] = {}
                for a, v in top:
                    alts.setdefault(a, v)
                tops.append(alts)
            logprobs = {"tokens": [t for t, _, _ in gen.tokens], "token_logprobs": [lp for _, lp, _ in gen.tokens],
                        "top_logprobs": tops, "text_offset": offsets}
        choice = {"index": 0, "text": gen.text, "logprobs": logprobs, "finish_reason": gen.finish_reason}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": usage}
