"""EndpointTeacher: retries, back-off, rate limit, cache and resume, against httpx mocks and a real local server."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time

import httpx
import pytest

from potstill.errors import UserError
from potstill.teachers import EndpointError, EndpointTeacher, ResponseCache
from potstill.teachers.endpoint import TokenBucket
from potstill.teachers.response_cache import request_key

pytestmark = pytest.mark.usefixtures("one_thread")
URL = "http://teacher.test/v1"


def chat_reply(text: str = "hello", **extra) -> dict:
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         **extra}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class Scripted:
    """A MockTransport handler replaying scripted replies (an httpx.Response, a dict for 200, or an exception)."""

    def __init__(self, *script) -> None:
        self.script, self.requests = list(script), []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
            step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        if isinstance(step, dict):
            return httpx.Response(200, json=step)
        return step


def mock_teacher(handler, **kwargs) -> tuple[EndpointTeacher, list[float]]:
    sleeps: list[float] = []
    kwargs.setdefault("api_key_env", None)
    teacher = EndpointTeacher(URL, "m", transport=httpx.MockTransport(handler), sleep=sleeps.append, **kwargs)
    return teacher, sleeps


def error(status: int, message: str = "boom", **headers) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "x"}}, headers=headers)


# -- keys, arguments, parsing -----------------------------------------------------------------------------------

def test_request_key_is_the_sha256_of_the_canonical_body():
    body = {"model": "m", "messages": [{"role": "user", "content": "hé"}], "temperature": 0.0, "max_tokens": 4}
    expected = hashlib.sha256(json.dumps({"kind": "chat", **body}, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False).encode()).hexdigest()
    assert request_key("chat", body) == expected
    assert request_key("chat", dict(reversed(list(body.items())))) == expected
    assert request_key("completion", body) != expected
    assert request_key("chat", {**body, "temperature": 0.5}) != expected
    with pytest.raises(ValueError):
        request_key("embedding", body)


def test_every_sampling_parameter_is_sent_and_keyed():
    handler = Scripted(chat_reply())
    teacher, _ = mock_teacher(handler)
    with teacher:
        done = teacher.chat([{"role": "user", "content": "q"}], max_tokens=7, temperature=0.7, top_p=0.9,
                            top_logprobs=3, seed=5, stop=["\n"])
    sent = json.loads(handler.requests[0].content)
    assert sent == {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 7,
                    "temperature": 0.7, "top_p": 0.9, "seed": 5, "stop": ["\n"], "logprobs": True, "top_logprobs": 3}
    assert handler.requests[0].url == URL + "/chat/completions" and done.key == request_key("chat", sent)
    handler = Scripted({"model": "m", "choices": [{"text": "t", "finish_reason": "length"}]})
    teacher, _ = mock_teacher(handler)
    with teacher:
        teacher.complete("p", max_tokens=2, top_logprobs=4)
    sent = json.loads(handler.requests[0].content)
    assert handler.requests[0].url == URL + "/completions"
    assert sent == {"model": "m", "prompt": "p", "max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "logprobs": 4}


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"base_url": ""}, "base_url"), ({"base_url": "ftp://host/v1"}, "base_url"),
    ({"base_url": "host:8000"}, "base_url"),
    ({"model": ""}, "model"), ({"concurrency": 0}, "concurrency"), ({"timeout": 0}, "timeout"),
    ({"max_retries": -1}, "max_retries"), ({"requests_per_second": 0}, "requests_per_second"),
    ({"backoff_base": -1}, "backoff_base"),
])
def test_bad_arguments_are_user_errors_naming_the_argument(kwargs, name):
    args = {"base_url": URL, "model": "m", **kwargs}
    with pytest.raises(UserError, match=name):
        EndpointTeacher(args.pop("base_url"), args.pop("model"), api_key_env=None, **args)


def test_bad_request_parameters_are_user_errors():
    teacher, _ = mock_teacher(Scripted(chat_reply()))
    with teacher:
        for kwargs, name in (({"top_logprobs": 21}, "top_logprobs"), ({"max_tokens": 0}, "max_tokens"),
                             ({"temperature": -1.0}, "temperature"), ({"stop": "x"}, "stop")):
            with pytest.raises(UserError, match=name):
                teacher.chat([{"role": "user", "content": "q"}], **kwargs)
        with pytest.raises(UserError, match="messages"):
            teacher.chat_many([[]])


def test_chat_and_legacy_logprobs_are_parsed():
    content = [{"token": "a", "logprob": -0.1, "top_logprobs": [{"token": "a", "logprob": -0.1},
                                                               {"token": "b", "logprob": -2.5},
                                                               {"token": "b", "logprob": -3.0}]},
               {"token": "c", "logprob": -0.7, "top_logprobs": []}]
    teacher, _ = mock_teacher(Scripted(chat_reply("ac", logprobs={"content": content})))
    with teacher:
        done = teacher.chat([{"role": "user", "content": "q"}], top_logprobs=3)
    assert done.text == "ac" and done.finish_reason == "stop" and done.model == "m" and not done.cached
    assert [(t.token, t.logprob, t.top) for t in done.logprobs] == [("a", -0.1, {"a": -0.1, "b": -2.5}),
                                                                    ("c", -0.7, {})]
    assert done.usage == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    legacy = {"tokens": [" x", "y"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{" x": -1.0, "z": -1.5}, None]}
    teacher, _ = mock_teacher(Scripted({"model": "m", "choices": [{"text": " xy", "finish_reason": "length",
                                                                   "logprobs": legacy}]}))
    with teacher:
        done = teacher.complete("p", top_logprobs=2)
    assert [(t.token, t.logprob, t.top) for t in done.logprobs] == [(" x", -1.0, {" x": -1.0, "z": -1.5}),
                                                                    ("y", -2.0, {})]
    teacher, _ = mock_teacher(Scripted(chat_reply()))
    with teacher:
        assert teacher.chat([{"role": "user", "content": "q"}]).logprobs is None


# -- retries and back-off ---------------------------------------------------------------------------------------

def test_429_and_503_are_retried_with_retry_after_and_jittered_backoff():
    handler = Scripted(error(429, **{"Retry-After": "7"}), error(503), chat_reply("done"))
    teacher, sleeps = mock_teacher(handler, backoff_base=0.5, backoff_max=30)
    with teacher:
        done = teacher.chat([{"role": "user", "content": "q"}])
    assert done.text == "done" and len(handler.requests) == 3
    assert sleeps[0] == 7.0 and 0.0 <= sleeps[1] <= 0.5 * 2**1
    assert teacher.stats == {"requests": 3, "retries": 2, "cache_hits": 0, "failures": 0}


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_each_retryable_status_is_retried(status):
    handler = Scripted(error(status), chat_reply())
    teacher, sleeps = mock_teacher(handler)
    with teacher:
        assert teacher.chat([{"role": "user", "content": "q"}]).text == "hello"
    assert len(handler.requests) == 2 and len(sleeps) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_fail_at_once(status):
    handler = Scripted(error(status, "the server says no"), chat_reply())
    teacher, sleeps = mock_teacher(handler)
    with teacher, pytest.raises(EndpointError, match=f"HTTP {status}: the server says no") as err:
        teacher.chat([{"role": "user", "content": "q"}])
    assert err.value.status == status and len(handler.requests) == 1 and sleeps == []
    assert teacher.stats["failures"] == 1 and teacher.stats["retries"] == 0


def test_timeouts_and_connection_errors_are_retried():
    handler = Scripted(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("cut"),
                       chat_reply())
    teacher, sleeps = mock_teacher(handler)
    with teacher:
        assert teacher.chat([{"role": "user", "content": "q"}]).text == "hello"
    assert len(handler.requests) == 4 and len(sleeps) == 3


def test_backoff_waits_are_jittered_within_the_capped_exponential_bound():
    handler = Scripted(error(500, "still down"))
    teacher, sleeps = mock_teacher(handler, max_retries=40, backoff_base=0.25, backoff_max=4.0)
    with teacher, pytest.raises(EndpointError, match="after 41 attempts: HTTP 500: still down") as err:
        teacher.complete("p")
    assert err.value.status == 500 and len(handler.requests) == 41 and len(sleeps) == 40
    bounds = [min(4.0, 0.25 * 2**a) for a in range(40)]
    assert all(0.0 <= s <= b for s, b in zip(sleeps, bounds, strict=True))
    assert len(set(sleeps)) == 40  # drawn, not fixed
    assert sum(sleeps[6:]) / len(sleeps[6:]) == pytest.approx(2.0, abs=0.6)  # uniform(0, 4) once capped
    assert teacher.stats == {"requests": 41, "retries": 40, "cache_hits": 0, "failures": 1}


def test_a_malformed_success_is_an_error_and_not_cached(tmp_path):
    teacher, _ = mock_teacher(Scripted({"unexpected": True}), cache=tmp_path / "c.sqlite")
    with teacher, pytest.raises(EndpointError, match="not an OpenAI chat response"):
        teacher.chat([{"role": "user", "content": "q"}])
    with ResponseCache(tmp_path / "c.sqlite") as rows:
        assert len(rows) == 0


# -- rate limit and concurrency ---------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_token_bucket_spaces_requests_at_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(4.0, clock=clock, sleep=clock.sleep)
    times = []
    for _ in range(5):
        bucket.acquire()
        times.append(clock.now - 100.0)
    assert times == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    clock.now += 10.0  # idle time refills at most `burst` tokens
    assert bucket.acquire() == 0.0 and bucket.acquire() == pytest.approx(0.25)
    burst = TokenBucket(2.0, burst=3, clock=clock, sleep=clock.sleep)
    assert [burst.acquire() for _ in range(4)] == pytest.approx([0.0, 0.0, 0.0, 0.5])


def test_token_bucket_is_shared_by_threads():
    bucket = TokenBucket(50.0)
    start = time.monotonic()
    threads = [threading.Thread(target=lambda: [bucket.acquire() for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start >= 19 / 50 - 0.02  # 20 tokens, the first free


def test_requests_per_second_throttles_every_attempt():
    clock = FakeClock()
    handler = Scripted(error(503), chat_reply())
    sleeps: list[float] = []

    def sleep(seconds):
        sleeps.append(seconds)
        clock.sleep(seconds)

    teacher = EndpointTeacher(URL, "m", api_key_env=None, transport=httpx.MockTransport(handler),
                              requests_per_second=2.0, backoff_base=0.0, sleep=sleep, clock=clock)
    with teacher:
        teacher.chat([{"role": "user", "content": "q"}])
        teacher.chat([{"role": "user", "content": "r"}])
    assert len(handler.requests) == 3 and clock.now - 100.0 == pytest.approx(1.0)


def test_chat_many_keeps_order_limits_concurrency_and_sends_duplicates_once():
    state = {"now": 0, "peak": 0, "bodies": []}
    lock = threading.Lock()

    def handler(request):
        body = json.loads(request.content)
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            state["bodies"].append(body["messages"][0]["content"])
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        return httpx.Response(200, json=chat_reply("answer " + body["messages"][0]["content"]))

    prompts = [str(i % 15) for i in range(30)]
    seen: list[int] = []
    teacher, _ = mock_teacher(handler, concurrency=3)
    with teacher:
        results = teacher.chat_many([[{"role": "user", "content": p}] for p in prompts],
                                    on_done=lambda i, r: seen.append(i), max_tokens=3)
    assert [r.text for r in results] == [f"answer {p}" for p in prompts]
    assert sorted(state["bodies"]) == sorted(set(prompts)) and 2 <= state["peak"] <= 3
    assert sorted(seen) == list(range(30)) and teacher.stats["requests"] == 15


def test_many_returns_errors_in_place():
    def handler(request):
        prompt = json.loads(request.content)["prompt"]
        return error(400, "bad prompt") if prompt == "bad" else httpx.Response(
            200, json={"model": "m", "choices": [{"text": prompt.upper(), "finish_reason": "stop"}]})

    teacher, _ = mock_teacher(handler)
    with teacher:
        results = teacher.complete_many(["a", "bad", "c"])
    assert isinstance(results[1], EndpointError) and results[1].status == 400
    assert [r.text for r in (results[0], results[2])] == ["A", "C"]
    assert teacher.stats["failures"] == 1


# -- the cache --------------------------------------------------------------------------------------------------

def test_cache_answers_without_the_network_and_stores_bodies_only(tmp_path):
    path = tmp_path / "cache.sqlite"
    handler = Scripted(chat_reply("first"))
    teacher, _ = mock_teacher(handler, cache=path, api_key="sk-cache-secret")
    with teacher:
        fresh = teacher.chat([{"role": "user", "content": "q"}], max_tokens=5)
    assert not fresh.cached

    def offline(request):
        raise AssertionError("the network was used")

    teacher, _ = mock_teacher(offline, cache=path)
    with teacher:
        again = teacher.chat([{"role": "user", "content": "q"}], max_tokens=5)
        assert teacher.stats == {"requests": 0, "retries": 0, "cache_hits": 1, "failures": 0}
        with pytest.raises(AssertionError, match="network"):
            teacher.chat([{"role": "user", "content": "q"}], max_tokens=6)  # other parameters: another key
    assert again.cached and again.text == "first" and again.key == fresh.key
    with sqlite3.connect(path) as db:
        (request, response), = db.execute("SELECT request, response FROM responses").fetchall()
    assert json.loads(request)["messages"] == [{"role": "user", "content": "q"}] and json.loads(response)["choices"]
    assert "secret" not in request and "Authorization" not in request


def test_response_cache_is_persistent_first_write_wins_and_thread_safe(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    with ResponseCache(path) as cache:
        cache.put("k", {"prompt": "p"}, {"v": 1})
        cache.put("k", {"prompt": "p"}, {"v": 2})
        assert cache.get("k") == {"v": 1} and cache.get("missing") is None

        def writer(t):
            for i in range(25):
                cache.put(f"{t}-{i}", {"i": i}, {"t": t})
        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with ResponseCache(path) as reopened:
        assert len(reopened) == 201 and reopened.keys() == {"k"} | {f"{t}-{i}" for t in range(8) for i in range(25)}
        assert reopened.get("3-7") == {"t": 3}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(UserError, match="folder"):
        ResponseCache(tmp_path)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(UserError, match="SQLite"):
        ResponseCache(tmp_path / "junk.sqlite")
