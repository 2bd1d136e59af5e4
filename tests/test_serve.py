"""`potstill serve`: a tiny Llama behind the OpenAI HTTP API, on a real socket (no downloads)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from test_causal_lm import llama, make_tokenizer

from potstill.cli import main
from potstill.errors import UserError
from potstill.serve import FaultSettings, LocalServer, create_app, load_model
from potstill.teachers.response_cache import canonical_json

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = 2


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return llama(len(tok), layers=2, init=0.3).eval()


@contextmanager
def serving(model, tok, **kwargs):
    app = create_app(model, tok, model_name="tiny", **kwargs)
    with LocalServer(app) as server:
        yield server, app


@pytest.fixture(scope="module")
def server(model, tok):
    with serving(model, tok, max_tokens_limit=64) as (srv, _):
        yield srv


_CLIENT = httpx.Client(timeout=30)  # one client: httpx.post would build a new client (and SSL context) per call


def post(server, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return _CLIENT.post(server.base_url + path, content=body, **kwargs)
    return _CLIENT.post(server.base_url + path, json=body, **kwargs)


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def reference_greedy(model, ids: list[int], steps: int) -> list[tuple[int, torch.Tensor]]:
    """Greedy decoding by full forwards (no KV cache): (chosen id, full log_softmax) per step, EOS excluded."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            token = int(lp.argmax())
            if token == EOS:
                break
            out.append((token, lp))
            ids.append(token)
    return out


def test_models_and_chat_round_trip(server, tok):
    listed = _CLIENT.get(server.base_url + "/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["tiny"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two"}]
    reply = post(server, "/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 6,
                                               "temperature": 0})
    assert reply.status_code == 200
    data = reply.json()
    assert data["object"] == "chat.completion" and data["model"] == "tiny" and data["id"].startswith("chatcmpl-")
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    usage = data["usage"]
    assert usage["prompt_tokens"] == len(prompt) and 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Content given as text parts is the same prompt.
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    again = post(server, "/chat/completions", {"messages": parts, "max_tokens": 6, "temperature": 0}).json()
    assert again["choices"][0]["message"] == choice["message"]


def test_greedy_completion_matches_the_model_and_logprobs_are_exact(server, model, tok):
    body = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 8, "temperature": 0, "logprobs": 5}
    first, second = post(server, "/completions", body).json(), post(server, "/completions", body).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["choices"][0]["logprobs"]["token_logprobs"] == second["choices"][0]["logprobs"]["token_logprobs"]
    ref = reference_greedy(model, tok("the cat sat")["input_ids"], 8)
    assert len(ref) >= 3, "the tiny model should not stop at once"
    lp = first["choices"][0]["logprobs"]
    assert first["choices"][0]["text"] == tok.decode([t for t, _ in ref], skip_special_tokens=True)
    assert lp["tokens"] == [tok.decode([t]) for t, _ in ref]
    assert lp["text_offset"] == [sum(len(s) for s in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    for (token, full), value, top in zip(ref, lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert value == pytest.approx(float(full[token]), abs=1e-4)
        assert torch.logsumexp(full, 0) == pytest.approx(0.0, abs=1e-5)
        assert 1 <= len(top) <= 5 and max(top.values()) == pytest.approx(value, abs=1e-6)
        assert torch.logsumexp(torch.tensor(list(top.values())), 0) <= 1e-6


def test_chat_top_logprobs_are_sorted_valid_and_match_a_direct_forward(server, model, tok):
    messages = [{"role": "user", "content": "a dog ran"}]
    data = post(server, "/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0,
                                              "logprobs": True, "top_logprobs": 20}).json()
    content = data["choices"][0]["logprobs"]["content"]
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    ref = reference_greedy(model, prompt, 6)
    assert len(content) == len(ref) >= 1
    for entry, (token, full) in zip(content, ref, strict=True):
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert len(values) == 20 and values == sorted(values, reverse=True)
        assert torch.logsumexp(torch.tensor(values), 0) <= 1e-6  # top-20 mass of a distribution: at most 1
        assert values == pytest.approx(full.topk(20).values.tolist(), abs=1e-4)
        assert entry["token"] == tok.decode([token]) and entry["logprob"] == pytest.approx(float(full[token]), abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
    # logprobs: true without top_logprobs gives the chosen tokens only.
    plain = post(server, "/chat/completions", {"messages": messages, "max_tokens": 3, "temperature": 0,
                                               "logprobs": True}).json()
    assert all(e["top_logprobs"] == [] for e in plain["choices"][0]["logprobs"]["content"])


def test_seed_makes_sampling_repeatable_and_tiny_top_p_is_greedy(server):
    def sample(seed, **extra):
        body = {"prompt": "my friend", "max_tokens": 10, "temperature": 1.0, "seed": seed, "logprobs": 1, **extra}
        choice = post(server, "/completions", body).json()["choices"][0]
        return choice["text"], choice["logprobs"]["token_logprobs"]

    assert sample(3) == sample(3)
    assert len({sample(seed)[0] for seed in range(4)}) >= 2
    greedy = post(server, "/completions", {"prompt": "my friend", "max_tokens": 10, "temperature": 0}).json()
    assert sample(5, top_p=1e-6)[0] == greedy["choices"][0]["text"]


def test_stop_strings_cut_the_text(server):
    base = {"prompt": "rain fell on", "max_tokens": 12, "temperature": 0}
    full = post(server, "/completions", base).json()["choices"][0]["text"]
    assert len(full) >= 4, full
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[: full.index(stop)]
    choice = post(server, "/completions", {**base, "stop": [stop, "never-seen"], "logprobs": 0}).json()["choices"][0]
    assert choice["text"] == expected and choice["finish_reason"] == "stop"
    assert "".join(choice["logprobs"]["tokens"]).startswith(expected)
    assert post(server, "/completions", {**base, "stop": stop}).json()["choices"][0]["text"] == expected
    unstopped = post(server, "/completions", {**base, "stop": ["never-seen"]}).json()["choices"][0]
    assert unstopped["text"] == full
    chat = {"messages": [{"role": "user", "content": "the bird"}], "max_tokens": 12, "temperature": 0}
    chat_full = post(server, "/chat/completions", chat).json()["choices"][0]["message"]["content"]
    assert len(chat_full) >= 4, chat_full
    chat_stop = chat_full[len(chat_full) // 2:][:2]
    cut = post(server, "/chat/completions", {**chat, "stop": [chat_stop]}).json()["choices"][0]
    assert cut["message"]["content"] == chat_full[: chat_full.index(chat_stop)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/completions", b"{not json", 400, None),
    ("/completions", {"prompt": 5}, 400, "prompt"),
    ("/completions", {"prompt": "x", "stream": True}, 400, "stream"),
    ("/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/completions", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/chat/completions", {"prompt": "x"}, 400, "messages"),
    ("/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                           "top_logprobs": 21}, 400, "top_logprobs"),
    ("/completions", {"prompt": "the cat sat on the mat " * 30}, 400, "prompt"),  # longer than the context
    ("/nowhere", {}, 404, None),
])
def test_malformed_requests_get_openai_errors(server, path, body, status, param):
    reply = post(server, path, body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    assert error["param"] == param


def test_a_tokenizer_without_chat_template_gets_role_lines(model):
    plain = make_tokenizer(chat=False)
    with serving(model, plain) as (server, _):
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two plus two"}]
        usage = post(server, "/chat/completions", {"messages": messages, "max_tokens": 2}).json()["usage"]
    assert usage["prompt_tokens"] == len(plain("system: be brief\nuser: two plus two\nassistant:")["input_ids"])


def test_max_tokens_is_capped(model, tok):
    with serving(model, tok, max_tokens_limit=3) as (server, _):
        usage = post(server, "/completions", {"prompt": "the", "max_tokens": 1000, "temperature": 0}).json()["usage"]
    assert usage["completion_tokens"] <= 3


def test_api_key_is_required_when_set(model, tok, tmp_path):
    key = "sk-serve-test-0123456789"
    log = tmp_path / "requests.jsonl"
    with serving(model, tok, api_key=key, request_log=log) as (server, _):
        body = {"prompt": "the", "max_tokens": 2}
        assert post(server, "/completions", body).status_code == 401
        wrong = post(server, "/completions", body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert _CLIENT.get(server.base_url + "/models").status_code == 401
        assert post(server, "/completions", body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert [r["status"] for r in read_log(log)] == [401, 401, 401, 200]
    assert key not in log.read_text()


def fault_run(model, tok, log: Path, faults: FaultSettings, n: int) -> list[httpx.Response]:
    with serving(model, tok, faults=faults, request_log=log) as (server, _):
        return [post(server, "/completions", {"prompt": f"prompt {i}", "max_tokens": 1}) for i in range(n)]


def test_fault_mode_fails_the_seeded_fraction_and_logs_it(model, tok, tmp_path):
    faults = FaultSettings(fail_rate=0.3, fail_status=500, seed=11)
    replies = fault_run(model, tok, tmp_path / "a.jsonl", faults, 60)
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 500}
    assert 6 <= statuses.count(500) <= 30  # Binomial(60, 0.3): mean 18, sd 3.5
    assert replies[statuses.index(500)].json()["error"]["type"] == "server_error"
    log = read_log(tmp_path / "a.jsonl")
    assert [r["status"] for r in log] == statuses and [r["fault"] for r in log] == [s == 500 for s in statuses]
    expected = [hashlib.sha256(canonical_json({"prompt": f"prompt {i}", "max_tokens": 1})).hexdigest()
                for i in range(60)]
    assert [r["body_sha256"] for r in log] == expected and all(r["path"] == "/v1/completions" for r in log)
    # The same seed gives the same faults; 429 replies carry Retry-After when configured.
    again = fault_run(model, tok, tmp_path / "b.jsonl", faults, 60)
    assert [r.status_code for r in again] == statuses
    limited = fault_run(model, tok, tmp_path / "c.jsonl",
                        FaultSettings(fail_rate=1.0, fail_status=429, retry_after=2.5), 2)
    assert [r.status_code for r in limited] == [429, 429] and limited[0].headers["retry-after"] == "2.5"


def test_delay_faults_and_a_departed_client_is_logged_as_499(model, tok, tmp_path):
    log = tmp_path / "requests.jsonl"
    with serving(model, tok, faults=FaultSettings(delay_rate=1.0, delay_s=0.3), request_log=log) as (server, app):
        start = time.monotonic()
        assert post(server, "/completions", {"prompt": "the", "max_tokens": 1}).status_code == 200
        assert time.monotonic() - start >= 0.3
        with app.state.generation_lock:  # pause generation; the client gives up meanwhile
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.base_url + "/completions", json={"prompt": "a", "max_tokens": 1}, timeout=0.6)
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while len(read_log(log)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert [r["status"] for r in read_log(log)] == [200, 499]


def test_requests_whose_client_left_while_queued_cost_no_generation(model, tok, tmp_path):
    log = tmp_path / "requests.jsonl"
    with serving(model, tok, request_log=log) as (server, app):
        service = app.state.service
        calls = []
        run = service.run
        service.run = lambda params: calls.append(1) or run(params)
        timeouts = []

        def give_up(i: int) -> None:
            try:
                httpx.post(server.base_url + "/completions", json={"prompt": f"p{i}", "max_tokens": 1}, timeout=0.5)
            except httpx.ReadTimeout:
                timeouts.append(i)

        with app.state.generation_lock:  # the first request reaches generation; the next three queue behind it
            threads = [threading.Thread(target=give_up, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
                time.sleep(0.05)
            for t in threads:
                t.join()
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while len(read_log(log)) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert sorted(timeouts) == [0, 1, 2, 3] and [r["status"] for r in read_log(log)] == [499] * 4
    assert len(calls) == 1  # only the request already generating when its client left was generated


def test_fault_settings_and_load_model_check_their_inputs(model, tok, tmp_path):
    with pytest.raises(UserError, match="fail_rate"):
        FaultSettings(fail_rate=1.5)
    with pytest.raises(UserError, match="fail_status"):
        FaultSettings(fail_status=200)
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    loaded, loaded_tok = load_model(str(tmp_path / "tiny"))
    assert not loaded.training and loaded_tok("the cat")["input_ids"] == tok("the cat")["input_ids"]
    with torch.no_grad():
        ids = torch.tensor([tok("the cat")["input_ids"]])
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_cli_serve_rejects_a_missing_model_folder(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing-model")]) == 2
    assert "missing-model" in capsys.readouterr().err


def test_cli_serve_prints_its_url_and_answers(model, tok, tmp_path, monkeypatch, capsys):
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("SERVE_TEST_KEY", "k-123")
    answers = []

    def one_request_then_stop(self):  # stands in for "serve until Ctrl-C"
        answers.append(httpx.get(self.base_url + "/models", headers={"Authorization": "Bearer k-123"}, timeout=30))

    monkeypatch.setattr(LocalServer, "wait", one_request_then_stop)
    code = main(["serve", str(tmp_path / "tiny"), "--port", "0", "--api-key-env", "SERVE_TEST_KEY",
                 "--request-log", str(tmp_path / "log.jsonl"), "--fail-rate", "0.5", "--max-tokens-limit", "8"])
    assert code == 0
    url = capsys.readouterr().out.strip().splitlines()[-1]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1") and url == str(answers[0].url)[:-len("/models")]
    assert answers[0].json()["data"][0]["id"] == "tiny"
    assert [r["status"] for r in read_log(tmp_path / "log.jsonl")] == [200]
    monkeypatch.delenv("SERVE_TEST_KEY")
    assert main(["serve", str(tmp_path / "tiny"), "--api-key-env", "SERVE_TEST_KEY"]) == 2
    assert "SERVE_TEST_KEY" in capsys.readouterr().err


def test_local_server_leaves_the_callers_logging_handlers_open():
    """uvicorn's default log config runs logging.config.dictConfig, which closes every handler of the process
    (absl's, for one, then closes its stream: pytest's capture file, in the full suite)."""
    import logging

    from fastapi import FastAPI

    from potstill.serve.app import LocalServer

    class Recording(logging.Handler):
        closed = False

        def emit(self, record: logging.LogRecord) -> None:
            pass

        def close(self) -> None:
            self.closed = True
            super().close()

    handler = Recording()
    logging.getLogger("a.caller").addHandler(handler)
    try:
        with LocalServer(FastAPI()):
            pass
        assert not handler.closed
    finally:
        logging.getLogger("a.caller").removeHandler(handler)
