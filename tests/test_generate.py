"""`potstill generate` / generate_dataset: rows, rationales, filters, provenance, failures (scripted teacher)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from potstill.errors import UserError
from potstill.generate import (
    GenerationSettings,
    answers_match,
    conversation,
    generate_dataset,
    load_prompts,
    public_url,
    sidecar,
    split_rationale,
)


@dataclass
class Reply:
    text: str
    key: str
    cached: bool = False
    model: str = "served-model"
    finish_reason: str | None = "stop"
    logprobs: list | None = None


@dataclass
class ScriptedTeacher:
    """Answers `what is A plus B?` with a rationale; prompts containing `fail` fail, `wrong` get a wrong answer,
    `ramble` get no answer line."""

    base_url: str = "http://user:secret@127.0.0.1:9999/v1?token=x"
    model: str = "teacher-model"
    stats: dict = field(default_factory=lambda: {"requests": 0, "retries": 0})
    seen: list = field(default_factory=list)

    def chat_many(self, conversations, *, on_done=None, **params):
        results = []
        for i, messages in enumerate(conversations):
            self.seen.append((messages, params))
            text = messages[-1]["content"]
            self.stats["requests"] += 1
            if "fail" in text:
                result = RuntimeError("HTTP 500 after 8 retries")
            elif "ramble" in text:
                result = Reply("I am not sure.", key=f"k{i}")
            else:
                a, b = (int(w) for w in text.split("?")[0].split() if w.isdigit())
                answer = a + b + (1 if "wrong" in text else 0)
                result = Reply(f"{a} plus {b}: add the units, then the tens.\nAnswer: {answer:,}", key=f"k{i}")
            if on_done:
                on_done(i, result)
            results.append(result)
        return results


def prompts(tmp_path):
    rows = [{"prompt": "what is 1200 plus 34?", "answer": "1234", "id": 1},
            {"prompt": "what is 2 plus 2? wrong", "answer": 4, "id": 2},
            {"prompt": "what is 3 plus 5? ramble", "answer": 8, "id": 3},
            {"prompt": "what is 1 plus 1? fail", "answer": 2, "id": 4}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rationale_parsing_and_answer_matching():
    assert split_rationale("Step one.\nStep two.\nAnswer: 42") == ("Step one.\nStep two.", "42")
    assert split_rationale("First.\n**Final answer:** `yes`") == ("First.", "yes")
    assert split_rationale("Answer: 3 is wrong\nso\nAnswer: 4") == ("Answer: 3 is wrong\nso", "4")
    assert split_rationale("Answer: 4") is None  # no rationale
    assert split_rationale("just talk") is None
    assert answers_match("1,234.", 1234) and answers_match(" Paris ", "paris") and answers_match("0.50", "0.5")
    assert not answers_match("12", "13") and not answers_match("Lyon", "Paris")
    assert public_url("http://user:pw@host:8000/v1?key=abc") == "http://host:8000/v1"


def test_conversation_adds_system_and_instruction():
    plain = conversation("hi", GenerationSettings(system="be brief"))
    assert plain == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    cot = conversation("2+2?", GenerationSettings(rationale=True))
    assert cot[-1]["content"].startswith("2+2?\n\n") and "Answer:" in cot[-1]["content"]
    chat = [{"role": "user", "content": "x"}]
    assert conversation(chat, GenerationSettings(system="s"))[0] == {"role": "system", "content": "s"}


def test_rationale_dataset_with_match_filter(tmp_path):
    teacher = ScriptedTeacher()
    out = tmp_path / "data.jsonl"
    progress = []
    report = generate_dataset(load_prompts(prompts(tmp_path), "prompt"), teacher, out,
                              settings=GenerationSettings(rationale=True, max_tokens=64, seed=3), filter="match",
                              reference_column="answer", on_progress=lambda d, t: progress.append((d, t)))
    assert (report.prompts, report.answered, report.kept, report.rejected, len(report.failed)) == (4, 3, 1, 2, 1)
    assert progress[-1] == (4, 4)
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["input"] == "what is 1200 plus 34?" and row["label"] == "1,234" and row["answer"] == "1234"
    assert row["rationale"].startswith("1200 plus 34") and row["id"] == 1
    prov = row["provenance"]
    assert prov["teacher"] == {"base_url": "http://127.0.0.1:9999/v1", "model": "teacher-model"}
    assert prov["settings"]["seed"] == 3 and prov["settings"]["rationale"] is True
    assert prov["served_model"] == "served-model" and prov["request_key"] == "k0" and prov["cached"] is False
    rejected = [json.loads(line) for line in sidecar(out, "rejected.jsonl").read_text().splitlines()]
    assert [r["record"] for r in rejected] == [2, 3]
    assert "does not match" in rejected[0]["reason"] and "Answer:" in rejected[1]["reason"]
    manifest = json.loads(sidecar(out, "manifest.json").read_text())
    assert manifest["failed"] == [{"record": 4, "error": "HTTP 500 after 8 retries"}] and manifest["kept"] == 1
    assert "secret" not in out.read_text() + sidecar(out, "manifest.json").read_text()
    assert teacher.seen[0][1]["max_tokens"] == 64 and teacher.seen[0][1]["seed"] == 3


def test_plain_mode_verifier_and_errors(tmp_path):
    out = tmp_path / "plain.jsonl"
    records = load_prompts(prompts(tmp_path), "prompt")
    report = generate_dataset(records, ScriptedTeacher(), out, filter="verifier",
                              verifier=lambda record, answer: record["id"] != 3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.kept == 2 and [r["prompt"] for r in rows] == [records[0]["prompt"], records[1]["prompt"]]
    assert rows[0]["completion"].endswith("Answer: 1,234")
    with pytest.raises(UserError, match="reference column"):
        generate_dataset(records, ScriptedTeacher(), out, filter="match")
    with pytest.raises(UserError, match="'nope' is missing"):
        generate_dataset(records, ScriptedTeacher(), out, reference_column="nope")
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert load_prompts(txt, "prompt") == [{"prompt": "one"}, {"prompt": "two"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": ""}\n')
    with pytest.raises(UserError, match="line 1"):
        load_prompts(bad, "prompt")
    bad.write_text('{"prompt": "fine"}\n{"prompt": 5}\n')
    with pytest.raises(UserError, match="record 2: column 'prompt' must be"):
        load_prompts(bad, "prompt")


# -- the command line against a real local server ---------------------------------------------------------------

@pytest.fixture(scope="module")
def lm():
    from test_causal_lm import llama, make_tokenizer

    tok = make_tokenizer()
    return llama(len(tok), layers=1, init=0.3).eval(), tok


def served_successes(log_path) -> list[str]:
    return [r["body_sha256"] for r in map(json.loads, log_path.read_text().splitlines()) if r["status"] == 200]


@pytest.mark.usefixtures("one_thread")
def test_cli_generate_with_a_flaky_server_resumes_without_asking_twice(tmp_path, lm, capsys):
    from potstill.cli import main
    from potstill.serve import FaultSettings, LocalServer, create_app

    prompts_path = tmp_path / "prompts.txt"
    prompts_path.write_text("".join(f"tell me about item {i}\n" for i in range(40)))
    out, log = tmp_path / "gen" / "data.jsonl", tmp_path / "requests.jsonl"
    model, tok = lm
    args = ["generate", str(prompts_path), "--out", str(out), "--model", "tiny", "--max-tokens", "3",
            "--top-logprobs", "2", "--seed", "1", "--concurrency", "4"]
    app = create_app(model, tok, model_name="tiny", request_log=log,
                     faults=FaultSettings(fail_rate=0.5, fail_status=500, seed=2))
    with LocalServer(app) as server:
        # no retries: about half the prompts fail, the command says so and exits 1
        assert main([*args, "--base-url", server.base_url, "--max-retries", "0"]) == 1
        manifest = json.loads((tmp_path / "gen" / "data.manifest.json").read_text())
        first = served_successes(log)
        assert 0 < len(manifest["failed"]) < 40 and manifest["answered"] == len(first)
        assert "run the same command again" in " ".join(capsys.readouterr().err.split())
        # the re-run asks only for the failed prompts
        assert main([*args, "--base-url", server.base_url]) == 0
    manifest = json.loads((tmp_path / "gen" / "data.manifest.json").read_text())
    done = served_successes(log)
    assert len(done) == len(set(done)) == 40
    assert manifest["answered"] == 40 and manifest["from_cache"] == len(first) and manifest["failed"] == []
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) + manifest["rejected"] == 40
    for row in rows:
        assert row["prompt"].startswith("tell me about item") and row["provenance"]["served_model"] == "tiny"
        assert len(row["logprobs"]) >= 1 and len(row["logprobs"][0]["top"]) == 2
    assert (tmp_path / "gen" / "data.cache.sqlite").exists()


def test_cli_generate_user_errors_exit_2(tmp_path, capsys):
    from potstill.cli import main

    assert main(["generate", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                 "--base-url", "http://127.0.0.1:1/v1", "--model", "m"]) == 2
    assert "does not exist" in capsys.readouterr().err
    prompts_path = tmp_path / "p.txt"
    prompts_path.write_text("hello\n")
    assert main(["generate", str(prompts_path), "--out", str(tmp_path / "o.jsonl"), "--base-url", "ftp://x",
                 "--model", "m"]) == 2
    assert main(["generate", str(prompts_path), "--out", str(tmp_path / "o.jsonl"), "--base-url",
                 "http://127.0.0.1:1/v1", "--model", "m", "--filter", "match"]) == 2
