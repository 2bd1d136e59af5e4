"""PGKD: performance-guided knowledge distillation for text classification (Di Palo et al. 2024).

An outer loop around ordinary student training, with a text-only teacher (an LLM behind an endpoint) that
writes new labelled training examples where the student is weak:

    train the student on D
    repeat for cycle c = 1 … max_cycles:
        validate: per-class precision / recall / F1 and the confusions
        hard negatives: misclassified validation items, most confident mistakes first
        prompt the teacher with the task, the labels, the validation report, the hard negatives (true vs
        predicted label) and a few training examples of each weak class; ask for `per_cycle` new examples of
        the `weak_classes` classes with the lowest F1
        parse and validate the answer (JSON lines {"text", "label"} with a known label), drop duplicates of D
        D ← D ∪ new; train again
        stop when validation macro-F1 has not improved by `min_delta` for `patience` cycles

The paper's student loss is plain cross-entropy; the loop does not care how `train` trains. Choices made here
(the paper gives no code, and its prompt is only described): the report is the per-class table as text, hard
negatives are ranked by the student's confidence in its wrong label, the weak classes are those with the lowest
validation F1, and the student kept is the one of the best cycle.

`PGKDLoop` keeps its state (cycle, history, best score, patience count) in `state_dict`, and `run` writes it
after every cycle through `save_state`, so a killed loop resumes; with an EndpointTeacher's response cache a
resumed cycle does not pay for its teacher requests again.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def per_class_report(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any]) -> dict[Any, dict]:
    """{label: {precision, recall, f1, support}} over `labels` (a class never predicted has precision 0)."""
    y_true, y_pred = list(y_true), list(y_pred)
    report = {}
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(y_true, y_pred, strict=True))
        predicted = sum(p == label for p in y_pred)
        support = sum(t == label for t in y_true)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return report


def macro_f1(report: dict[Any, dict]) -> float:
    scored = [row["f1"] for row in report.values() if row["support"]]
    return float(np.mean(scored)) if scored else 0.0


def hard_negatives(texts: Sequence[str], y_true: Sequence[Any], y_pred: Sequence[Any],
                   confidence: Sequence[float], k: int) -> list[dict]:
    """The `k` misclassified items the student was most sure of: [{text, label, predicted, confidence}]."""
    wrong = [i for i, (t, p) in enumerate(zip(y_true, y_pred, strict=True)) if t != p]
    wrong.sort(key=lambda i: (-float(confidence[i]), i))
    return [{"text": texts[i], "label": y_true[i], "predicted": y_pred[i], "confidence": float(confidence[i])}
            for i in wrong[:k]]


def weakest_classes(report: dict[Any, dict], n: int) -> list[Any]:
    """The `n` classes with the lowest F1 (ties: lower recall first, then label order)."""
    order = sorted(report, key=lambda label: (report[label]["f1"], report[label]["recall"], str(label)))
    return order[:n]


def format_report(report: dict[Any, dict]) -> str:
    lines = ["label | precision | recall | f1 | support"]
    lines += [f"{label} | {row['precision']:.2f} | {row['recall']:.2f} | {row['f1']:.2f} | {row['support']}"
              for label, row in report.items()]
    return "\n".join(lines)


def guidance_prompt(task: str, labels: Sequence[Any], report: dict[Any, dict], negatives: Sequence[dict],
                    examples: dict[Any, list[str]], targets: Sequence[Any], count: int) -> list[dict]:
    """The chat messages asking the teacher for `count` new examples of the `targets` classes."""
    parts = [f"Task: {task}", "Labels: " + ", ".join(map(str, labels)),
             "The student classifier's validation results:", format_report(report)]
    if negatives:
        parts.append("Validation examples it got wrong (true label / predicted label):")
        parts += [f"- [{n['label']} / {n['predicted']}] {n['text']}" for n in negatives]
    for label in targets:
        if examples.get(label):
            parts.append(f"Training examples of {label}:")
            parts += [f"- {text}" for text in examples[label]]
    parts.append(f"Write {count} new, varied training examples for the labels {', '.join(map(str, targets))}, "
                 f"ones that would fix the mistakes above. Answer with one JSON object per line, "
                 f'{{"text": "...", "label": "..."}}, and nothing else.')
    return [{"role": "user", "content": "\n".join(parts)}]


_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


def parse_examples(text: str, labels: Sequence[Any]) -> list[dict]:
    """The valid {text, label} objects in a teacher's answer (one JSON object per line, or objects anywhere in
    the text); a label is matched to `labels` case-insensitively; anything else is skipped."""
    by_name = {str(label).strip().lower(): label for label in labels}
    found = []
    for match in _JSON_OBJECT.finditer(text):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            continue
        label = by_name.get(str(obj.get("label", "")).strip().lower())
        if label is not None:
            found.append({"text": obj["text"].strip(), "label": label})
    return found


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def deduplicate(new: Sequence[dict], existing: Sequence[dict]) -> list[dict]:
    """`new` without items whose text (case and spacing ignored) is in `existing` or earlier in `new`."""
    seen = {_key(r["text"]) for r in existing}
    kept = []
    for row in new:
        key = _key(row["text"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


@dataclass(frozen=True)
class Predictions:
    """The student's validation predictions: labels and its confidence in each."""

    labels: list[Any]
    confidence: list[float]


class PGKDLoop:
    """The PGKD outer loop. Defaults: 5 cycles at most, patience 2, 3 weakest classes, 24 new examples a cycle
    (asked as `requests_per_cycle` separate requests so that one bad answer costs little), 8 hard negatives,
    3 training examples of each weak class in the prompt.

    `train(records) -> model` trains a student on the records ({text, label}); `predict(model, texts) ->
    Predictions`; the teacher has `chat_many(conversations, **params)` (an EndpointTeacher)."""

    def __init__(self, task: str, labels: Sequence[Any], *, max_cycles: int = 5, patience: int = 2,
                 min_delta: float = 0.0, weak_classes: int = 3, per_cycle: int = 24, requests_per_cycle: int = 3,
                 hard_negative_count: int = 8, examples_per_class: int = 3, temperature: float = 0.7,
                 max_tokens: int = 1024, seed: int = 0) -> None:
        if max_cycles < 0 or patience < 1 or per_cycle < 1 or requests_per_cycle < 1:
            raise ValueError("max_cycles ≥ 0, patience ≥ 1, per_cycle ≥ 1 and requests_per_cycle ≥ 1")
        self.task, self.labels = task, list(labels)
        self.max_cycles, self.patience, self.min_delta = max_cycles, patience, min_delta
        self.weak_classes, self.per_cycle, self.requests_per_cycle = weak_classes, per_cycle, requests_per_cycle
        self.hard_negative_count, self.examples_per_class = hard_negative_count, examples_per_class
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed
        self.cycle = 0
        self.history: list[dict] = []
        self.added: list[dict] = []
        self.best_score = -1.0
        self.best_cycle = 0
        self.stale = 0
        self.done = False

    def state_dict(self) -> dict:
        return copy.deepcopy({"cycle": self.cycle, "history": self.history, "added": self.added,
                              "best_score": self.best_score, "best_cycle": self.best_cycle, "stale": self.stale,
                              "done": self.done})

    def load_state_dict(self, state: dict) -> None:
        for key in ("cycle", "history", "added", "best_score", "best_cycle", "stale", "done"):
            setattr(self, key, copy.deepcopy(state[key]))

    def validate(self, model: Any, predict: Callable, validation: Sequence[dict]) -> tuple[dict, Predictions]:
        texts = [r["text"] for r in validation]
        preds = predict(model, texts)
        return per_class_report([r["label"] for r in validation], preds.labels, self.labels), preds

    def request(self, report: dict, preds: Predictions, validation: Sequence[dict],
                train: Sequence[dict]) -> list[list[dict]]:
        """The teacher conversations of this cycle (deterministic given the state)."""
        negatives = hard_negatives([r["text"] for r in validation], [r["label"] for r in validation],
                                   preds.labels, preds.confidence, self.hard_negative_count)
        targets = weakest_classes(report, self.weak_classes)
        rng = np.random.default_rng([self.seed, self.cycle])
        examples = {}
        for label in targets:
            texts = [r["text"] for r in train if r["label"] == label]
            picked = rng.choice(len(texts), size=min(self.examples_per_class, len(texts)), replace=False)
            examples[label] = [texts[i] for i in sorted(picked)]
        counts = np.diff(np.linspace(0, self.per_cycle, self.requests_per_cycle + 1).round().astype(int))
        conversations = []
        for part, count in enumerate(counts):
            if count:
                messages = guidance_prompt(self.task, self.labels, report, negatives, examples, targets, int(count))
                messages[-1]["content"] += f"\n(batch {self.cycle}.{part + 1})"  # distinct requests, distinct answers
                conversations.append(messages)
        return conversations

    def run(self, train_records: Sequence[dict], validation: Sequence[dict], *, train: Callable[[list[dict]], Any],
            predict: Callable[[Any, list[str]], Predictions], teacher: Any,
            save_state: Callable[[dict], None] | None = None,
            log: Callable[[str], None] = lambda _msg: None) -> tuple[Any, list[dict]]:
        """Run (or resume) the loop; returns (best model, the training records it was trained on)."""
        data = list(train_records) + list(self.added)
        model = train(list(data))
        report, preds = self.validate(model, predict, validation)
        best_model, best_model_cycle = model, self.cycle
        if not self.history:
            self._record(report, 0, len(data))
            log(f"cycle 0: macro-F1 {self.history[-1]['macro_f1']:.3f} on {len(data)} examples")
        while not self.done and self.cycle < self.max_cycles:
            self.cycle += 1
            answers = teacher.chat_many(self.request(report, preds, validation, data),
                                        max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed)
            new = [row for answer in answers if not isinstance(answer, Exception)
                   for row in parse_examples(answer.text, self.labels)]
            new = deduplicate(new, data)
            self.added += new
            data += new
            model = train(list(data))
            report, preds = self.validate(model, predict, validation)
            improved = self._record(report, len(new), len(data),
                                    failures=sum(isinstance(a, Exception) for a in answers))
            if improved:
                best_model, best_model_cycle = model, self.cycle
            log(f"cycle {self.cycle}: +{len(new)} examples, macro-F1 {self.history[-1]['macro_f1']:.3f}"
                f"{' (best)' if improved else ''}")
            if self.stale >= self.patience:
                self.done = True
                log(f"stopping: no gain for {self.patience} cycle(s); best cycle {self.best_cycle}")
            if save_state is not None:
                save_state(self.state_dict())
        self.done = True
        if save_state is not None:
            save_state(self.state_dict())
        best_data = list(train_records) + self.added[:self._added_until(self.best_cycle)]
        if best_model_cycle != self.best_cycle:  # resumed after the best cycle: its model is not in memory
            best_model = train(list(best_data))
        return best_model, best_data

    def _added_until(self, cycle: int) -> int:
        return sum(h["added"] for h in self.history if 0 < h["cycle"] <= cycle)

    def _record(self, report: dict, added: int, size: int, *, failures: int = 0) -> bool:
        score = macro_f1(report)
        improved = score > self.best_score + self.min_delta
        if improved:
            self.best_score, self.best_cycle, self.stale = score, self.cycle, 0
        else:
            self.stale += 1
        self.history.append({"cycle": self.cycle, "macro_f1": score, "added": added, "train_size": size,
                             "failed_requests": failures,
                             "worst_f1": min(row["f1"] for row in report.values()),
                             "per_class_f1": {str(k): row["f1"] for k, row in report.items()}})
        return improved
