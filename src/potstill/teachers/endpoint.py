"""A teacher behind any OpenAI-compatible HTTP server (OpenAI, vLLM, llama.cpp, TGI, `potstill serve`).

`EndpointTeacher` sends `/chat/completions` and `/completions` requests and returns `Completion`s (text, finish
reason, per-token log-probs when asked for). Everything needed for long, unattended data generation is here:

- **Response cache** (`potstill.teachers.response_cache.ResponseCache`, one SQLite file, one row per request
  keyed by `request_key(kind, body)`): a request whose key is cached never touches the network, and a re-run
  resumes where a killed one stopped.
- **Retries** on HTTP 429, 500, 502, 503, 504, timeouts and connection errors, with capped exponential
  back-off and full jitter: after failed attempt a = 0, 1, ... the wait is
  `uniform(0, min(backoff_max, backoff_base * 2**a))` (the "Full Jitter" scheme of AWS's "Exponential Backoff
  And Jitter" article, confirmed in the search corpus), unless the reply has a `Retry-After` header in seconds,
  which is then waited exactly (capped at `MAX_RETRY_AFTER`). Other 4xx replies fail at once. After
  `max_retries` retries the request fails with `EndpointError`.
- **Concurrency and rate**: at most `concurrency` requests in flight (all threads together), and optionally a
  token bucket of `requests_per_second` shared by all threads; every attempt, retries included, takes a token.
- **API key**: `api_key`, else the environment variable `api_key_env` (default OPENAI_API_KEY; unset = no key,
  fine for a local server). It lives only in the httpx client's Authorization header: it is never logged,
  cached, put in an exception or a repr, and any server text quoted in an `EndpointError` has it masked.

Log-probs: `top_logprobs=k > 0` asks chat servers for `logprobs: true, top_logprobs: k` and completion servers
for the legacy `logprobs: k`. `TokenLogprob.top` maps each returned token string to its log-prob; two token ids
that decode to the same string (e.g. lone UTF-8 bytes shown as U+FFFD) keep the first, most likely, value.
A legacy response's missing log-prob (null, as for an echoed first token) becomes NaN.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from potstill.errors import UserError
from potstill.teachers.response_cache import ResponseCache, request_key

logger = logging.getLogger("potstill.endpoint")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: A `Retry-After` longer than this (seconds) is cut to it.
MAX_RETRY_AFTER = 600.0
#: OpenAI's limit on top_logprobs (chat) and, on vLLM and potstill serve, on legacy completion logprobs.
MAX_TOP_LOGPROBS = 20
_ERROR_TEXT_CHARS = 500


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-prob, and the server's top log-probs at that position."""

    token: str
    logprob: float
    top: dict[str, float]


@dataclass(frozen=True)
class Completion:
    """One answer. `cached` is True when it came from the response cache; `key` is its cache key."""

    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    model: str
    cached: bool
    key: str
    usage: dict[str, int]


class EndpointError(RuntimeError):
    """A request that failed for good: a non-retryable status, or still failing after every retry.

    `status` is the last HTTP status (None for a timeout or connection error). The message quotes the server's
    error text (with the API key masked), never a header.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TokenBucket:
    """A token bucket: `rate` tokens per second, at most `burst` saved up; `acquire()` blocks for one token.

    Thread-safe. A caller reserves its token under the lock (the balance may go negative) and then sleeps
    outside it for `-balance / rate` seconds, so waiting callers are served in arrival order at exactly `rate`.
    `clock` and `sleep` are injectable for tests.
    """

    def __init__(self, rate: float, burst: float = 1.0, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate > 0:
            raise UserError(f"requests_per_second must be > 0, got {rate}")
        if not burst >= 1:
            raise UserError(f"burst must be >= 1, got {burst}")
        self.rate, self.burst = float(rate), float(burst)
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()

    def acquire(self) -> float:
        """Take one token, sleeping until it is available; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: fall back to the jittered back-off
    return min(seconds, MAX_RETRY_AFTER) if math.isfinite(seconds) and seconds >= 0 else None


def _server_error_text(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict) and "message" in payload["error"]:
        text = str(payload["error"]["message"])
    elif isinstance(payload, dict) and isinstance(payload.get("error"), str):
        text = payload["error"]
    else:
        text = response.text
    text = " ".join(text.split())
    return text[:_ERROR_TEXT_CHARS] + ("..." if len(text) > _ERROR_TEXT_CHARS else "")


def _parse_chat_logprobs(logprobs: Any) -> list[TokenLogprob] | None:
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    out = []
    for item in logprobs["content"]:
        top: dict[str, float] = {}
        for alt in item.get("top_logprobs") or []:
            top.setdefault(alt["token"], float(alt["logprob"]))
        out.append(TokenLogprob(token=item["token"], logprob=float(item["logprob"]), top=top))
    return out


def _parse_legacy_logprobs(logprobs: Any) -> list[TokenLogprob] | None:
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("tokens"), list):
        return None
    tokens, values = logprobs["tokens"], logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        value = values[i] if i < len(values) else None
        alts = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(TokenLogprob(token=token, logprob=float("nan") if value is None else float(value),
                                top={str(t): float(v) for t, v in alts.items()}))
    return out


def parse_response(kind: str, response: dict, *, key: str, cached: bool) -> Completion:
    """A `Completion` from an OpenAI-format chat or (legacy) completion response; ValueError if malformed."""
    try:
        choice = response["choices"][0]
        if kind == "chat":
            text = choice["message"].get("content") or ""
            logprobs = _parse_chat_logprobs(choice.get("logprobs"))
        else:
            text = choice["text"]
            logprobs = _parse_legacy_logprobs(choice.get("logprobs"))
        usage = {k: int(v) for k, v in (response.get("usage") or {}).items() if isinstance(v, int)}
        return Completion(text=text, finish_reason=choice.get("finish_reason"), logprobs=logprobs,
                          model=str(response.get("model", "")), cached=cached, key=key, usage=usage)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"not an OpenAI {kind} response ({type(err).__name__}: {err})") from err


def _check_number(name: str, value: Any, *, low: float, high: float | None = None, integer: bool = False,
                  low_inclusive: bool = True) -> None:
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok:
        raise UserError(f"{name}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not (value >= low if low_inclusive else value > low) or (high is not None and value > high):
        bounds = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise UserError(f"{name}: expected a value {bounds}, got {value!r}")


class EndpointTeacher:
    """Client for an OpenAI-compatible server; see the module docstring for caching, retries and limits.

    `base_url` includes the API prefix, e.g. "http://127.0.0.1:8000/v1" or "https://api.openai.com/v1";
    requests go to `{base_url}/chat/completions` and `{base_url}/completions`. `stats` counts HTTP `requests`
    sent (each attempt), `retries`, `cache_hits` and `failures` (requests that ended in `EndpointError`).
    `sleep`, `clock` and `rng` (the jitter's random source) are injectable for tests.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 api_key_env: str | None = "OPENAI_API_KEY", cache: str | Path | ResponseCache | None = None,
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 8, backoff_base: float = 0.5,
                 backoff_max: float = 30.0, requests_per_second: float | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        if not isinstance(base_url, str) or not base_url.strip():
            raise UserError("base_url: expected the server's URL, e.g. http://127.0.0.1:8000/v1; got an empty value")
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"base_url: expected a URL starting with http:// or https://, got {base_url!r}")
        if not isinstance(model, str) or not model.strip():
            raise UserError("model: expected the model name the server serves; got an empty value")
        _check_number("concurrency", concurrency, low=1, integer=True)
        _check_number("timeout", timeout, low=0, low_inclusive=False)
        _check_number("max_retries", max_retries, low=0, integer=True)
        _check_number("backoff_base", backoff_base, low=0)
        _check_number("backoff_max", backoff_max, low=0)
        if requests_per_second is not None:
            _check_number("requests_per_second", requests_per_second, low=0, low_inclusive=False)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency, self.max_retries = concurrency, max_retries
        self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
        self._sleep, self._rng = sleep, rng or random.Random()
        self._bucket = TokenBucket(requests_per_second, clock=clock, sleep=sleep) if requests_per_second else None
        self._slots = threading.BoundedSemaphore(concurrency)
        self._stats_lock = threading.Lock()
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "cache_hits": 0, "failures": 0}
        if isinstance(cache, ResponseCache):
            self.cache, self._owns_cache = cache, False
        else:
            self.cache, self._owns_cache = (ResponseCache(cache) if cache is not None else None), True
        key = api_key if api_key else (os.environ.get(api_key_env) if api_key_env else None)
        # Kept only to mask it in quoted server text; the header is the one place it is sent.
        self._secret = key or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout), transport=transport,
                                    limits=httpx.Limits(max_connections=concurrency,
                                                        max_keepalive_connections=concurrency))

    def __repr__(self) -> str:
        return f"EndpointTeacher(base_url={self.base_url!r}, model={self.model!r})"

    # -- request bodies ----------------------------------------------------------------------------------------

    def _sampling(self, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  top_logprobs: int = 0, seed: int | None = None, stop: list[str] | None = None) -> dict:
        _check_number("max_tokens", max_tokens, low=1, integer=True)
        _check_number("temperature", temperature, low=0)
        _check_number("top_p", top_p, low=0, high=1, low_inclusive=False)
        _check_number("top_logprobs", top_logprobs, low=0, high=MAX_TOP_LOGPROBS, integer=True)
        if seed is not None:
            _check_number("seed", seed, low=-(2**63), integer=True)
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
            raise UserError(f"stop: expected a list of non-empty strings, got {stop!r}")
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            params["seed"] = seed
        if stop:
            params["stop"] = list(stop)
        if top_logprobs:
            params["top_logprobs"] = top_logprobs
        return params

    def _chat_body(self, messages: list[dict], params: dict) -> dict:
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise UserError(f"messages: expected a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
        body = {"model": self.model, "messages": messages, **params}
        if "top_logprobs" in body:
            body["logprobs"] = True
        return body

    def _completion_body(self, prompt: str, params: dict) -> dict:
        if not isinstance(prompt, str):
            raise UserError(f"prompt: expected a string, got {type(prompt).__name__}")
        body = {"model": self.model, "prompt": prompt, **params}
        if "top_logprobs" in body:
            body["logprobs"] = body.pop("top_logprobs")
        return body

    # -- one request -------------------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _mask(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _backoff(self, attempt: int, response: httpx.Response | None) -> float:
        after = _retry_after(response) if response is not None else None
        if after is not None:
            return after
        return self._rng.uniform(0.0, min(self.backoff_max, self.backoff_base * 2.0 ** attempt))

    def _post(self, kind: str, body: dict) -> dict:
        """POST with retries; the parsed JSON of the first 2xx reply."""
        path = "/chat/completions" if kind == "chat" else "/completions"
        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            if self._bucket is not None:
                self._bucket.acquire()
            response: httpx.Response | None = None
            with self._slots:
                self._count("requests")
                try:
                    response = self._client.post(url, json=body)
                    problem = None
                except httpx.TransportError as err:  # timeouts, refused / reset connections, protocol errors
                    problem = f"{type(err).__name__}"
            if response is not None:
                if response.is_success:
                    try:
                        return response.json()
                    except ValueError as err:
                        raise EndpointError(f"POST {path}: HTTP {response.status_code} but the body is not JSON",
                                            response.status_code) from err
                detail = f"HTTP {response.status_code}: {self._mask(_server_error_text(response))}"
                if response.status_code not in RETRY_STATUSES:
                    raise EndpointError(f"POST {path} failed: {detail}", response.status_code)
                problem = detail
            if attempt == self.max_retries:
                raise EndpointError(f"POST {path} failed after {attempt + 1} attempts: {problem}",
                                    None if response is None else response.status_code)
            wait = self._backoff(attempt, response)
            logger.warning("POST %s: %s (attempt %d of %d); retrying in %.2f s", path,
                           problem.split(":")[0] if response is not None else problem, attempt + 1,
                           self.max_retries + 1, wait)
            self._count("retries")
            self._sleep(wait)
        raise AssertionError("unreachable")

    def _fetch(self, kind: str, body: dict, key: str) -> Completion:
        if self.cache is not None:
            stored = self.cache.get(key)
            if stored is not None:
                self._count("cache_hits")
                return parse_response(kind, stored, key=key, cached=True)
        try:
            response = self._post(kind, body)
            try:
                completion = parse_response(kind, response, key=key, cached=False)
            except ValueError as err:
                raise EndpointError(f"{kind} response from {self.base_url}: {err}", 200) from err
        except EndpointError:
            self._count("failures")
            raise
        if self.cache is not None:
            self.cache.put(key, body, response)
        return completion

    def _fetch_or_error(self, kind: str, body: dict, key: str) -> Completion | EndpointError:
        try:
            return self._fetch(kind, body, key)
        except EndpointError as err:
            return err

    # -- public API --------------------------------------------------------------------------------------------

    def chat(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_logprobs: int = 0, seed: int | None = None, stop: list[str] | None = None) -> Completion:
        """One chat completion (`POST {base_url}/chat/completions`); raises `EndpointError` when it fails."""
        params = self._sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_logprobs=top_logprobs, seed=seed, stop=stop)
        body = self._chat_body(messages, params)
        return self._fetch("chat", body, request_key("chat", body))

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_logprobs: int = 0, seed: int | None = None, stop: list[str] | None = None) -> Completion:
        """One text completion (`POST {base_url}/completions`); raises `EndpointError` when it fails."""
        params = self._sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_logprobs=top_logprobs, seed=seed, stop=stop)
        body = self._completion_body(prompt, params)
        return self._fetch("completion", body, request_key("completion", body))

    def chat_many(self, conversations: list[list[dict]], *,
                  on_done: Callable[[int, Completion | EndpointError], None] | None = None,
                  **params: Any) -> list[Completion | EndpointError]:
        """`chat` for each conversation, `concurrency` at a time; results (or errors) in input order.

        Identical requests are sent once and share their result. `on_done(index, result)` is called in the
        calling thread once per input, as results arrive (after the response is cached).
        """
        sampling = self._sampling(**params)
        return self._many("chat", [self._chat_body(m, sampling) for m in conversations], on_done)

    def complete_many(self, prompts: list[str], *,
                      on_done: Callable[[int, Completion | EndpointError], None] | None = None,
                      **params: Any) -> list[Completion | EndpointError]:
        """`complete` for each prompt, `concurrency` at a time; see `chat_many`."""
        sampling = self._sampling(**params)
        return self._many("completion", [self._completion_body(p, sampling) for p in prompts], on_done)

    def _many(self, kind: str, bodies: list[dict],
              on_done: Callable[[int, Completion | EndpointError], None] | None) -> list[Completion | EndpointError]:
        by_key: dict[str, list[int]] = {}
        for i, body in enumerate(bodies):
            by_key.setdefault(request_key(kind, body), []).append(i)
        results: list[Completion | EndpointError | None] = [None] * len(bodies)
        if not by_key:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(by_key)),
                                thread_name_prefix="potstill-endpoint") as pool:
            futures = {pool.submit(self._fetch_or_error, kind, bodies[idx[0]], key): idx
                       for key, idx in by_key.items()}
            try:
                for future in as_completed(futures):
                    result = future.result()
                    for i in futures[future]:
                        results[i] = result
                        if on_done is not None:
                            on_done(i, result)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Close the HTTP connections and the cache (when this teacher opened it)."""
        self._client.close()
        if self.cache is not None and self._owns_cache:
            self.cache.close()

    def __enter__(self) -> EndpointTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
