"""`potstill serve`: a local Hugging Face causal LM behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

It is the offline stand-in for a hosted teacher: `EndpointTeacher` talks to it exactly as to OpenAI or vLLM,
and its fault injection (a seeded fraction of requests failed with a chosen status, or delayed) makes retries,
back-off and resume testable on one machine.

Routes (all under /v1):
- `GET /models`: the one served model.
- `POST /chat/completions`: `messages` go through the tokenizer's chat template with the generation prompt
  (tokenized without adding special tokens, as `apply_chat_template` does); a tokenizer without a template
  gets "role: content" lines followed by "assistant:". Content may be a string or a list of text parts.
- `POST /completions`: a `prompt` string, tokenized with the tokenizer's special tokens (e.g. BOS).

Parameters: `model` (optional; another name is a 404), `max_tokens` (chat also reads `max_completion_tokens`;
default 16 for completions and `max_tokens_limit` for chat; capped at `max_tokens_limit` and at the model's
context), `temperature` (0 = greedy, the default is 1 as in OpenAI's API), `top_p` (nucleus: the smallest set of
most likely tokens whose mass reaches top_p), `seed` (sampling from a `torch.Generator` seeded with it is
repeatable), `stop` (a string or list; the text is cut before the first occurrence), `n` (1 only),
log-probs (chat: `logprobs: true` with `top_logprobs: k`, k <= 20; completions: `logprobs: k`, k <= 20).
Log-probs are the model's own `log_softmax` at each generated step, before temperature and top-p (vLLM's
default "raw" log-probs), floored at -9999 as OpenAI does. The end-of-sequence token ends the text and is not
listed among the tokens; `usage.completion_tokens` counts every generated token, EOS included. With a stop
string the tokens listed are those needed to spell the returned text (the last may run into the stop string).
A token's string is `tokenizer.decode([id])` and its `bytes` are that string's UTF-8 bytes.

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed request, 401
for a missing or wrong key (when `api_key` is set), 404 for an unknown model or route.

One generation runs at a time (`app.state.generation_lock`, a `threading.Lock`; tests may hold it to pause the
server). Faults are drawn (from `random.Random(seed)`, two draws per generation request, in arrival order) and the
delay is slept before the lock is taken. A reply whose client has gone away by the end of its generation is
logged with status 499 and not sent.

Request log (JSON lines; each request appends one whole line, then the file is closed again): `time` (Unix
seconds), `path`, `body_sha256` (sha256 of the canonical JSON of the body, of its raw bytes when it is not JSON,
null when empty), `status`, `fault`. Headers and keys are never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from potstill.errors import UserError
from potstill.teachers.endpoint import MAX_TOP_LOGPROBS
from potstill.teachers.response_cache import canonical_json

logger = logging.getLogger("potstill.serve")

#: OpenAI's floor for the log-prob of a very unlikely token (JSON has no -inf).
LOGPROB_FLOOR = -9999.0
#: `max_tokens` of a completion request that gives none (OpenAI's legacy default).
DEFAULT_COMPLETION_TOKENS = 16
BUILTIN_SMOLLM2 = "builtin:smollm2"


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


@dataclass
class Generation:
    """What `generate` produced: the text, why it stopped, and per-token (string, log-prob, top list)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens: list[tuple[str, float, list[tuple[str, float]]]] = field(default_factory=list)


class _ApiError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _pick(logits, temperature: float, top_p: float, generator) -> int:
    import torch

    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token when the mass of the tokens before it already reaches top_p (the first always stays).
        sorted_probs[sorted_probs.cumsum(0) - sorted_probs >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _forward_args(model) -> tuple[str, dict]:
    """The KV-cache keyword of `model.forward` (transformers >= 5.2x renamed `past_key_values` to `cache`) and
    `logits_to_keep=1` where supported (only the last position's logits are needed)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def generate(model, tokenizer, prompt_ids: list[int], *, max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
             top_logprobs: int | None = None) -> Generation:
    """Decode up to `max_tokens` tokens after `prompt_ids` with the KV cache; one sequence, no padding.

    `temperature=0` is greedy; otherwise tokens are drawn from softmax(logits / temperature), nucleus-filtered
    by `top_p`, with a `torch.Generator` seeded by `seed` (a random seed when None). `top_logprobs=None` records
    no log-probs; k >= 0 records each chosen token's log-prob and the k most likely at its step, from the
    untempered log_softmax. Stops at an EOS token (finish "stop"), a stop string (finish "stop"; the text is cut
    before it) or `max_tokens` (finish "length").
    """
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    eos = _eos_ids(model, tokenizer)
    stop = [s for s in (stop or []) if s]
    new_ids: list[int] = []
    lengths: list[int] = []  # len(decode(new_ids[:i + 1])) after each kept token
    steps: list[tuple[str, float, list[tuple[str, float]]]] = []
    finish, text, generated = "length", "", 0
    inputs = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache_arg, extra = _forward_args(model)
    past = None
    with torch.inference_mode():
        for _ in range(max_tokens):
            out = model(input_ids=inputs, use_cache=True, **{cache_arg: past}, **extra)
            past = out[cache_arg]
            logits = out.logits[0, -1].float()
            token = _pick(logits, temperature, top_p, generator)
            generated += 1
            if token in eos:
                finish = "stop"
                break
            new_ids.append(token)
            if top_logprobs is not None:
                logprobs = torch.log_softmax(logits, dim=-1)
                top = torch.topk(logprobs, min(top_logprobs, logprobs.numel())) if top_logprobs else None
                alts = ([] if top is None else
                        [(tokenizer.decode([i]), max(v, LOGPROB_FLOOR))
                         for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)])
                steps.append((tokenizer.decode([token]), max(float(logprobs[token]), LOGPROB_FLOOR), alts))
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            lengths.append(len(text))
            cut = _first_stop(text, stop) if stop else None
            if cut is not None:
                text, finish = text[:cut], "stop"
                keep = next((i + 1 for i, n in enumerate(lengths) if n >= cut), len(lengths)) if cut else 0
                steps = steps[:keep]
                break
            inputs = torch.tensor([[token]], dtype=torch.long, device=device)
    return Generation(text=text, finish_reason=finish, prompt_tokens=len(prompt_ids), completion_tokens=generated,
                      tokens=steps)


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
                 api_key: str | None, max_tokens_limit: int) -> None:
        import random

        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
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
        if model is not None and model != self.model_name:
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


_NOT_JSON = object()


def _body_sha256(raw: bytes) -> tuple[str | None, Any]:
    """(sha256 of the canonical JSON body, or of the raw bytes when not JSON; the parsed body or _NOT_JSON)."""
    if not raw:
        return None, None
    try:
        body = json.loads(raw)
    except ValueError:
        return hashlib.sha256(raw).hexdigest(), _NOT_JSON
    return hashlib.sha256(canonical_json(body)).hexdigest(), body


def create_app(model, tokenizer, *, model_name: str, faults: FaultSettings = FaultSettings(),
               request_log: str | Path | None = None, api_key: str | None = None,
               max_tokens_limit: int = 512) -> FastAPI:
    """A FastAPI app serving `model` (a HF causal LM, put in eval mode) as `model_name`; see the module docstring.

    `app.state.generation_lock` serialises generations (tokenization included: fast tokenizers are not safe to
    share between threads that change their settings).
    """
    if not isinstance(max_tokens_limit, int) or max_tokens_limit < 1:
        raise UserError(f"max_tokens_limit: expected an integer >= 1, got {max_tokens_limit!r}")
    if not model_name:
        raise UserError("model_name: expected the name clients send as 'model'; got an empty value")
    model.eval()
    service = _Service(model, tokenizer, model_name=model_name, faults=faults, request_log=request_log,
                       api_key=api_key, max_tokens_limit=max_tokens_limit)
    app = FastAPI(title="potstill serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.generation_lock = service.generation_lock

    # One generation at a time. Waiting requests queue on this asyncio lock rather than on the threading lock,
    # so a request whose client timed out while queued is dropped (logged 499) without costing a generation.
    queue = asyncio.Lock()

    def client_gone(request: Request, body_sha: str | None) -> JSONResponse:
        service.log(request.url.path, body_sha, 499, False)
        return JSONResponse({"error": {"message": "client closed the connection", "type": "aborted",
                                       "param": None, "code": None}}, status_code=499)

    def error_response(err: _ApiError) -> JSONResponse:
        return JSONResponse(err.payload(), status_code=err.status, headers=err.headers)

    async def handle(request: Request, kind: str) -> JSONResponse:
        raw = await request.body()
        body_sha, body = _body_sha256(raw)
        fault = False
        try:
            service.check_auth(request)
            if kind == "models":
                response = JSONResponse({"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": service.created, "owned_by": "potstill"}]})
            else:
                fail, delay = service.draw_faults()
                if delay and faults.delay_s > 0:
                    await asyncio.sleep(faults.delay_s)
                if fail:
                    fault = True
                    raise service.fault_error()
                if body is _NOT_JSON:
                    raise _ApiError(400, "the request body is not valid JSON")
                params = service.parse(kind, body)
                async with queue:  # requests wait here, where a client that gave up can still be noticed
                    if await request.is_disconnected():
                        return client_gone(request, body_sha)
                    try:
                        gen = await run_in_threadpool(service.run, params)
                    except _ApiError:
                        raise
                    except Exception as err:  # a bug or an out-of-memory: report it, keep serving
                        logger.exception("generation failed")
                        raise _ApiError(500, f"generation failed: {type(err).__name__}",
                                        kind="server_error") from err
                if await request.is_disconnected():
                    return client_gone(request, body_sha)
                response = JSONResponse(service.format(kind, gen, params["top_logprobs"] is not None))
        except _ApiError as err:
            response = error_response(err)
        service.log(request.url.path, body_sha, response.status_code, fault)
        return response

    @app.get("/v1/models")
    async def models(request: Request):
        return await handle(request, "models")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        service.log(request.url.path, None, exc.status_code, False)
        err = _ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else None)
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        service.log(request.url.path, None, 400, False)
        return error_response(_ApiError(400, f"malformed request: {exc.errors()}"))

    return app


class LocalServer:
    """Serve `app` with uvicorn from a background thread: `with LocalServer(app) as server: server.base_url`.

    The socket is bound in the constructor (port 0 picks a free port), so `base_url` ("http://HOST:PORT/v1") is
    known at once; a port in use is a `UserError`. `start()` returns once uvicorn accepts connections; `stop()`
    shuts it down. `serve_forever()` runs in the calling thread instead (the CLI; Ctrl-C stops it).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
        # it every reply waits ~40 ms for a delayed ACK.
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as err:
            self._sock.close()
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --host / --port") \
                from err
        self.host, self.port = host, self._sock.getsockname()[1]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self.base_url = f"http://{shown}:{self.port}/v1"
        self.app = app
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                     access_log=False, lifespan="off"))
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self, timeout: float = 30.0) -> LocalServer:
        self._thread = threading.Thread(target=self.serve_forever, name="potstill-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.base_url} did not start")
            time.sleep(0.01)
        return self

    def wait(self) -> None:
        """Block until the server thread ends (in short joins, so Ctrl-C gets through)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self._sock.close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalServer({self.base_url!r})"


def load_model(path: str, *, device: str | None = None):
    """(model, tokenizer) from a HF folder, or `builtin:smollm2` (`potstill.assets.smollm2_path`).

    float32, in eval mode, on `device` (default: CUDA when available, else CPU). A missing folder is a
    `UserError`; nothing is downloaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path == BUILTIN_SMOLLM2:
        from potstill.assets import smollm2_path

        folder = smollm2_path()
    else:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            what = "has no config.json" if folder.is_dir() else "does not exist"
            raise UserError(f"model {path}: the folder {what}; expected a Hugging Face model folder (config.json, "
                            f"weights, tokenizer) or {BUILTIN_SMOLLM2}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"model {path}: cannot load a causal LM and its tokenizer from {folder} ({err})") from err
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer
