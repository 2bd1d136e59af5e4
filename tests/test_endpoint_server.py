"""The endpoint teacher against potstill's real local server: faults, rate limits, a killed run, key hygiene."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import REPO
from test_causal_lm import llama, make_tokenizer
from test_endpoint import mock_teacher

from potstill.serve import FaultSettings, LocalServer, create_app
from potstill.teachers import Completion, EndpointError, EndpointTeacher, ResponseCache
from potstill.teachers.response_cache import canonical_json, request_key

N = 200  # prompts per run

# -- against the real local server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm():
    tok = make_tokenizer()
    return llama(len(tok), layers=1, init=0.3).eval(), tok


@contextmanager
def serving(lm, **kwargs):
    model, tok = lm
    app = create_app(model, tok, model_name="tiny", **kwargs)
    with LocalServer(app) as server:
        yield server, app


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def successes(log: list[dict]) -> Counter:
    return Counter(r["body_sha256"] for r in log if r["status"] == 200)


def prompts(n: int = N) -> list[str]:
    return [f"prompt number {i}" for i in range(n)]


def test_flaky_server_every_prompt_answered_once_and_a_rerun_sends_nothing(lm, tmp_path):
    log, cache = tmp_path / "requests.jsonl", tmp_path / "cache.sqlite"
    with serving(lm, faults=FaultSettings(fail_rate=0.3, fail_status=500, seed=1), request_log=log) as (server, _):
        with EndpointTeacher(server.base_url, "tiny", api_key_env=None, cache=cache, concurrency=4,
                             max_retries=30, backoff_base=0.002, backoff_max=0.01) as teacher:
            results = teacher.complete_many(prompts(), max_tokens=2, top_logprobs=2)
            first = dict(teacher.stats)
        assert all(isinstance(r, Completion) and not r.cached for r in results)
        assert all(r.logprobs and r.logprobs[0].top for r in results)
        entries = read_log(log)
        faults = sum(r["fault"] for r in entries)
        assert 0.2 * len(entries) < faults < 0.4 * len(entries)  # about 30 % of all attempts
        assert first["retries"] == faults and first["requests"] == len(entries) and first["failures"] == 0
        counts = successes(entries)
        assert len(counts) == N and set(counts.values()) == {1}  # no body answered twice
        with ResponseCache(cache) as rows:
            assert len(rows) == N

        with EndpointTeacher(server.base_url, "tiny", api_key_env=None, cache=cache) as rerun:
            again = rerun.complete_many(prompts(), max_tokens=2, top_logprobs=2)
            assert rerun.stats == {"requests": 0, "retries": 0, "cache_hits": N, "failures": 0}
        assert [r.text for r in again] == [r.text for r in results] and all(r.cached for r in again)
        assert len(read_log(log)) == len(entries)


def test_rate_limited_server_retry_after_is_honoured(lm, tmp_path):
    log, cache = tmp_path / "requests.jsonl", tmp_path / "cache.sqlite"
    waits: list[float] = []

    def sleep(seconds):
        waits.append(seconds)
        time.sleep(seconds)

    faults = FaultSettings(fail_rate=0.3, fail_status=429, retry_after=0.01, seed=2)
    with serving(lm, faults=faults, request_log=log) as (server, _):
        with EndpointTeacher(server.base_url, "tiny", api_key_env=None, cache=cache, concurrency=4,
                             max_retries=30, backoff_base=5.0, sleep=sleep) as teacher:
            results = teacher.chat_many([[{"role": "user", "content": p}] for p in prompts()], max_tokens=2)
    assert all(isinstance(r, Completion) for r in results)
    entries = read_log(log)
    assert sum(r["status"] == 429 for r in entries) == len(waits) > 0
    assert set(waits) == {0.01}  # the header's wait, not the (much longer) jittered back-off
    counts = successes(entries)
    assert len(counts) == N and set(counts.values()) == {1}
    with ResponseCache(cache) as rows:
        assert len(rows) == N


KILLABLE = """
import sys
from potstill.teachers.endpoint import EndpointTeacher
with EndpointTeacher(sys.argv[1], "tiny", api_key_env=None, cache=sys.argv[2], concurrency=4) as teacher:
    teacher.complete_many([f"prompt number {i}" for i in range(int(sys.argv[3]))], max_tokens=2)
"""


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_killed_run_resumes_without_asking_twice(lm, tmp_path):
    log, path = tmp_path / "requests.jsonl", tmp_path / "cache.sqlite"
    cache = ResponseCache(path)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    with serving(lm, faults=FaultSettings(delay_rate=1.0, delay_s=0.05), request_log=log) as (server, app):
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE, server.base_url, str(path), str(N)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: len(cache) >= 30 or proc.poll() is not None, 120, "30 cached rows")
            # Pause generation, let every reply already sent reach the cache, then kill mid-run.
            with app.state.generation_lock:
                time.sleep(0.2)
                wait_for(lambda: sum(successes(read_log(log)).values()) == len(cache), 10, "cache == log")
                assert proc.poll() is None, proc.stderr.read().decode()
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                time.sleep(0.3)  # the server sees the dropped connections before the waiting requests finish
            killed_at = len(cache)
            assert 30 <= killed_at < N
            wait_for(lambda: sum(r["status"] == 499 for r in read_log(log)) >= 1, 10, "abandoned requests")
            time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with EndpointTeacher(server.base_url, "tiny", api_key_env=None, cache=path, concurrency=4) as teacher:
            results = teacher.complete_many(prompts(), max_tokens=2)
            assert teacher.stats["cache_hits"] == killed_at and teacher.stats["requests"] == N - killed_at
    assert all(isinstance(r, Completion) for r in results) and len(cache) == N
    counts = successes(read_log(log))
    assert sum(counts.values()) == N and len(counts) == N
    cache.close()


def test_the_api_key_never_leaks(lm, tmp_path, monkeypatch, caplog, capsys):
    key = "sk-test-" + uuid.uuid4().hex
    monkeypatch.setenv("POTSTILL_TEST_KEY", key)
    caplog.set_level(logging.DEBUG)
    log, path = tmp_path / "requests.jsonl", tmp_path / "cache.sqlite"

    def files_hold_key() -> list[str]:
        return [str(p) for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]

    faults = FaultSettings(fail_rate=0.3, seed=3)
    with serving(lm, faults=faults, request_log=log, api_key=key) as (server, _):
        teacher = EndpointTeacher(server.base_url, "tiny", api_key_env="POTSTILL_TEST_KEY", cache=path,
                                  backoff_base=0.001, backoff_max=0.005)
        with teacher:
            results = teacher.chat_many([[{"role": "user", "content": f"q{i}"}] for i in range(12)], max_tokens=3)
            assert all(isinstance(r, Completion) for r in results) and teacher.stats["retries"] > 0
            with pytest.raises(EndpointError) as bad:
                teacher.chat([{"role": "user"}])  # the server answers 400
            assert bad.value.status == 400
            assert (path.parent / (path.name + "-wal")).exists()
            assert files_hold_key() == []  # cache, -wal, -shm and request log while open
            shown = [repr(teacher), str(bad.value), repr(bad.value), repr(teacher.cache)]
        with EndpointTeacher(server.base_url, "tiny", api_key_env=None) as keyless, \
                pytest.raises(EndpointError) as refused:
            keyless.complete("x")
        assert refused.value.status == 401
    assert files_hold_key() == []
    captured = capsys.readouterr()
    records = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records)
    assert "retrying" in caplog.text
    for text in (*shown, str(refused.value), captured.out, captured.err, caplog.text, records):
        assert key not in text
    assert repr(teacher) == f"EndpointTeacher(base_url={server.base_url!r}, model='tiny')"


def test_server_text_quoting_the_key_is_masked():
    key = "sk-echo-" + uuid.uuid4().hex

    def echo(request):
        return httpx.Response(400, json={"error": {"message": f"bad key header {request.headers['authorization']}"}})

    teacher, _ = mock_teacher(echo, api_key=key)
    with teacher, pytest.raises(EndpointError) as err:
        teacher.complete("p")
    assert key not in str(err.value) and "Bearer ***" in str(err.value)


def test_the_client_key_and_the_server_log_hash_use_the_same_canonical_body(lm, tmp_path):
    log = tmp_path / "requests.jsonl"
    with serving(lm, request_log=log) as (server, _):
        with EndpointTeacher(server.base_url, "tiny", api_key_env=None) as teacher:
            done = teacher.complete("the cat", max_tokens=2, seed=4, stop=["zz"])
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "seed": 4,
            "stop": ["zz"]}
    assert done.key == request_key("completion", body) and done.model == "tiny" and done.usage["completion_tokens"]
    assert read_log(log)[0]["body_sha256"] == hashlib.sha256(canonical_json(body)).hexdigest()
