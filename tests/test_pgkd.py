"""PGKD loop: report, hard negatives, prompt assembly, parsing, and the loop itself with a scripted teacher."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
from fastapi import Request

from potstill.data.pgkd import (
    PGKDLoop,
    Predictions,
    deduplicate,
    guidance_prompt,
    hard_negatives,
    macro_f1,
    parse_examples,
    per_class_report,
    weakest_classes,
)

CLASSES = [f"c{i}" for i in range(8)]
WORDS = {c: [f"{c}w{j}" for j in range(6)] for c in CLASSES}
NOISE = [f"n{j}" for j in range(30)]


def sentence(label: str, rng: np.random.Generator, vocab: list[str] | None = None) -> str:
    words = list(rng.choice(vocab or WORDS[label], size=2)) + list(rng.choice(NOISE, size=4))
    rng.shuffle(words)
    return " ".join(words)


def seed_data(rng: np.random.Generator) -> list[dict]:
    """5 examples a class; classes c5..c7 see only 1 of their 6 keywords, so they are weak on validation."""
    rows = []
    for c in CLASSES:
        vocab = WORDS[c][:1] if c in ("c5", "c6", "c7") else WORDS[c]
        rows += [{"text": sentence(c, rng, vocab), "label": c} for _ in range(5)]
    return rows


@dataclass
class Answer:
    text: str


class ScriptedTeacher:
    """Answers a PGKD prompt with well-formed examples of exactly the classes it asks for (plus one malformed line
    and one unknown label, which the parser must skip)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.rng = np.random.default_rng(7)

    def chat_many(self, conversations, **params):
        out = []
        for messages in conversations:
            prompt = messages[-1]["content"]
            self.prompts.append(prompt)
            count = int(re.search(r"Write (\d+) new", prompt).group(1))
            targets = re.search(r"for the labels (.+?), ones that", prompt).group(1).split(", ")
            lines = [json.dumps({"text": sentence(targets[i % len(targets)], self.rng),
                                 "label": targets[i % len(targets)]}) for i in range(count)]
            lines += ["not json {", json.dumps({"text": "x", "label": "nope"})]
            out.append(Answer("\n".join(lines)))
        return out


def train_bow(records: list[dict]):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = CountVectorizer(token_pattern=r"\S+")
    x = vectorizer.fit_transform([r["text"] for r in records])
    model = LogisticRegression(max_iter=500).fit(x, [r["label"] for r in records])
    return vectorizer, model


def predict_bow(model, texts: list[str]) -> Predictions:
    vectorizer, clf = model
    probs = clf.predict_proba(vectorizer.transform(texts))
    return Predictions(labels=list(clf.classes_[probs.argmax(1)]), confidence=list(probs.max(1)))


def test_report_hard_negatives_and_weakest():
    report = per_class_report(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert report["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["b"]["precision"] == pytest.approx(2 / 3) and report["b"]["recall"] == 1.0
    assert report["c"]["support"] == 0
    assert macro_f1(report) == pytest.approx((2 / 3 + 0.8) / 2)  # classes without support are not averaged
    negatives = hard_negatives(["t0", "t1", "t2", "t3"], ["a", "a", "b", "b"], ["b", "a", "a", "b"],
                               [0.6, 0.9, 0.95, 0.99], k=5)
    assert [n["text"] for n in negatives] == ["t2", "t0"]  # only mistakes, most confident first
    assert weakest_classes(report, 1) == ["c"]


def test_prompt_and_parser():
    report = per_class_report(["a", "b"], ["a", "a"], ["a", "b"])
    messages = guidance_prompt("news topics", ["a", "b"], report, [{"text": "bad", "label": "b", "predicted": "a"}],
                               {"b": ["an example of b"]}, ["b"], 4)
    text = messages[0]["content"]
    assert "Labels: a, b" in text and "[b / a] bad" in text and "an example of b" in text and "Write 4 new" in text
    answer = ('sure!\n{"text": "one", "label": "B"}\n{"text": "two", "label": "zzz"}\n{broken\n'
              '{"text": "", "label": "a"}')
    assert parse_examples(answer, ["a", "b"]) == [{"text": "one", "label": "b"}]
    new = [{"text": "One  ", "label": "b"}, {"text": "new", "label": "a"}, {"text": "NEW", "label": "a"}]
    assert deduplicate(new, [{"text": "one", "label": "b"}]) == [{"text": "new", "label": "a"}]


def test_loop_raises_worst_class_f1_and_stops_by_patience(tmp_path):
    rng = np.random.default_rng(0)
    train = seed_data(rng)
    validation = [{"text": sentence(c, rng), "label": c} for c in CLASSES for _ in range(12)]
    teacher = ScriptedTeacher()
    states = []
    loop = PGKDLoop("keyword topics", CLASSES, max_cycles=8, patience=2, weak_classes=3, per_cycle=36,
                    requests_per_cycle=2)
    model, data = loop.run(train, validation, train=train_bow, predict=predict_bow, teacher=teacher,
                           save_state=states.append)
    first, best = loop.history[0], max(loop.history, key=lambda h: h["macro_f1"])
    assert first["worst_f1"] < 0.6
    assert best["worst_f1"] > first["worst_f1"] + 0.2
    assert best["macro_f1"] > first["macro_f1"]
    assert loop.done and loop.cycle < 8  # stopped by patience, not by the cycle limit
    assert loop.history[-1]["cycle"] - loop.best_cycle == 2
    assert len(data) == len(train) + sum(h["added"] for h in loop.history if h["cycle"] <= loop.best_cycle)
    assert len(teacher.prompts) == 2 * loop.cycle
    assert "c5" in teacher.prompts[0] and "Training examples of c5" in teacher.prompts[0]
    assert predict_bow(model, [r["text"] for r in validation]).labels  # the best cycle's model is returned
    # resume from the state after cycle 1: the loop continues at cycle 2 and ends in the same place
    resumed = PGKDLoop("keyword topics", CLASSES, max_cycles=8, patience=2, weak_classes=3, per_cycle=36,
                       requests_per_cycle=2)
    resumed.load_state_dict(json.loads(json.dumps(states[0])))
    assert resumed.cycle == 1
    resumed.run(train, validation, train=train_bow, predict=predict_bow, teacher=ScriptedTeacher())
    assert resumed.done and [h["cycle"] for h in resumed.history] == list(range(resumed.cycle + 1))


# -- `potstill pgkd` on a text-classification recipe, with a scripted teacher LLM behind a real HTTP server ------

TOPIC_WORDS = {"sport": ["goal", "match", "team", "striker", "cup", "league"],
               "business": ["shares", "profit", "bank", "market", "company", "investors"],
               "weather": ["rain", "storm", "sunny", "wind", "forecast", "snow"]}


def topic_sentence(label: str, rng: np.random.Generator) -> str:
    return "the " + " and the ".join(rng.choice(TOPIC_WORDS[label], size=2)) + " today"


def scripted_llm_app(requests: list[str], max_tokens: list[int] | None = None):
    from fastapi import FastAPI

    app = FastAPI()
    rng = np.random.default_rng(3)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        requests.append(prompt)
        if max_tokens is not None:
            max_tokens.append(body["max_tokens"])
        count = int(re.search(r"Write (\d+) new", prompt).group(1))
        targets = re.search(r"for the labels (.+?), ones that", prompt).group(1).split(", ")
        text = "\n".join(json.dumps({"text": topic_sentence(targets[i % len(targets)], rng),
                                     "label": targets[i % len(targets)]}) for i in range(count))
        return {"model": "scripted", "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}], "usage": {}}

    return app


@pytest.mark.usefixtures("one_thread")
def test_cli_pgkd_runs_cycles_writes_state_and_resumes(tmp_path, capsys):
    import yaml
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from potstill.assets import minilm_path
    from potstill.cli import main
    from potstill.serve import LocalServer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    labels = sorted(TOPIC_WORDS)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3, id2label=dict(enumerate(labels)),
                        label2id={name: i for i, name in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rng = np.random.default_rng(0)
    for name, n in (("train", 4), ("val", 6)):
        rows = [{"text": topic_sentence(label, rng), "label": label} for label in labels for _ in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "pgkd.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "pgkd", "output_dir": str(tmp_path / "runs"), "task": "classification",
        "teacher": {"path": str(tmp_path / "base")}, "student": {"init": "layers_from_teacher", "layers": [0]},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "val.jsonl"), "max_length": 16},
        "trainer": {"max_steps": 6, "batch_size": 6, "lr": 3e-3, "hard_label_weight": 1.0},
        "eval": {"throughput": False, "compare_before": False}}))
    requests: list[str] = []
    asked: list[int] = []
    with LocalServer(scripted_llm_app(requests, asked)) as server:
        args = ["pgkd", str(recipe), "--base-url", server.base_url, "--model", "scripted", "--task",
                "news topic of a short sentence", "--per-cycle", "6", "--weak-classes", "2", "--max-tokens", "300",
                "--timeout", "30", "--concurrency", "2"]  # issue #18 trap 5: a slow local teacher needs these
        assert main([*args, "--cycles", "1"]) == 0
        assert asked == [300] * len(requests)
        state = json.loads((tmp_path / "runs" / "pgkd" / "pgkd" / "state.json").read_text())
        assert state["cycle"] == 1 and state["done"] and [h["cycle"] for h in state["history"]] == [0, 1]
        assert 0 < state["history"][1]["added"] <= 6 and len(requests) == 3
        assert "Labels: business, sport, weather" in requests[0]
        assert (tmp_path / "runs" / "pgkd" / "cycle-1" / "student" / "config.json").exists()
        assert main(args) == 2  # an earlier loop is there: --resume or remove it
        assert "--resume" in " ".join(capsys.readouterr().err.split())
    summary = json.loads((tmp_path / "runs" / "pgkd" / "pgkd" / "summary.json").read_text())
    assert summary["best_cycle"] in (0, 1) and summary["history"] == state["history"]
    lines = (tmp_path / "runs" / "pgkd" / "pgkd" / "train-cycle1.jsonl").read_text().splitlines()
    assert len(lines) == 12 + state["history"][1]["added"]
