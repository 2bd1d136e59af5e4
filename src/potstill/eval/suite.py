"""A general, offline evaluation suite for text-embedding models (MTEB's task types on held-out text).

`run_suite(encode)` scores an encoder (a function: list of texts → (N, D) array, raw or normalised) on the
tasks of `potstill.data.suite_tasks` (12 tasks, 6 types, 7 sources that no builtin training corpus draws
from; sources, sizes and licences are listed there, and each `SuiteTask` carries them) with the metrics of
`potstill.eval.suite_metrics`. The task data lives in `potstill.data` because `builtin:general` must
exclude it (and `potstill.eval` may import `potstill.data`, not the other way round).
`encoder_for(folder_or_model)` wraps a sentence-transformers folder or model; `cached_encoder` remembers
vectors across runs (a teacher scored and then used as the fidelity reference).

- Every distinct text is encoded once, whatever the number of tasks that use it.
- `SuiteResult.average` is MTEB's convention: the mean of the main scores over *tasks*.
  `SuiteResult.average_over_types` is the mean over task *types* (each type's tasks averaged first), which
  does not favour the types with more tasks. `per_type` holds each type's mean.
- Fidelity (with `teacher_encode`): on a mixed-domain set of about 350 suite texts (60 each of polarity
  snippets, newsgroup bodies, newsgroup subject lines, fortunes and analogy pairs, plus the 50 Lee
  documents), `cosine_to_teacher` (mean row-wise cosine; None when the widths differ) and
  `neighbour_recall@10` (the overlap of each text's 10 nearest neighbours under student and teacher).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potstill.data.suite_tasks import TASK_TYPES, TASKS, SuiteTask, task_texts
from potstill.errors import UserError, did_you_mean
from potstill.eval import suite_metrics as M

__all__ = ["TASKS", "TASK_TYPES", "SuiteResult", "SuiteTask", "cached_encoder", "encoder_for", "fidelity_texts",
           "run_suite", "score_teacher_and_student"]

Encode = Callable[[list[str]], np.ndarray]
ENCODE_CHUNK = 512
FIDELITY_PER_SOURCE = 60
NEIGHBOURS = 10


@dataclass
class SuiteResult:
    """Scores of one encoder. `per_task`: name → {type, metric, score, n, seconds, …other metrics}."""

    per_task: dict[str, dict[str, Any]]
    per_type: dict[str, float]
    average: float
    average_over_types: float
    fidelity: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"suite": "general", "average": self.average, "average_over_types": self.average_over_types,
                "average_is": "mean over tasks (MTEB)", "per_type": self.per_type, "per_task": self.per_task,
                "fidelity": self.fidelity, "seconds": round(self.seconds, 2)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def rows(self) -> list[dict[str, Any]]:
        """One row per task, then per type, then the averages and fidelity: for `potstill.report` tables."""
        out: list[dict[str, Any]] = [{"task": name, "type": r["type"], "metric": r["metric"], "score": r["score"],
                                      "n": r["n"]} for name, r in self.per_task.items()]
        out += [{"task": f"mean {t}", "type": t, "metric": "mean", "score": s} for t, s in self.per_type.items()]
        out += [{"task": "average (tasks)", "metric": "mean", "score": self.average},
                {"task": "average (types)", "metric": "mean", "score": self.average_over_types}]
        out += [{"task": "fidelity", "metric": k, "score": v} for k, v in self.fidelity.items()]
        return out

    def table(self) -> str:
        """A plain-text table: task, type, metric, score, n."""
        lines = [f"{'task':<30} {'type':<20} {'metric':<20} {'score':>7} {'n':>6}"]
        for row in self.rows():
            score = "-" if row["score"] is None else f"{row['score']:.4f}"
            n = row.get("n")
            lines.append(f"{row['task']:<30} {row.get('type', ''):<20} {row['metric']:<20} {score:>7} "
                         f"{'' if n is None else n:>6}")
        return "\n".join(lines)


def fidelity_texts() -> list[str]:
    """The mixed-domain fidelity set (seed 0): ~60 texts from each suite source with sentences, Lee's 50."""
    from potstill.assets import lee_corpus
    from potstill.data.suite_sources import analogy_pairs, newsgroup_posts, polarity_snippets
    from potstill.data.suite_tasks import fortune_sample

    rng = random.Random(0)

    def pick(items: list[str]) -> list[str]:
        return rng.sample(items, min(FIDELITY_PER_SOURCE, len(items)))

    posts = newsgroup_posts()
    pairs = [f"{a} {b}" for _, relation in sorted(analogy_pairs().items()) for a, b in relation]
    texts = (pick([t for t, _ in polarity_snippets()]) + pick([b for _, b, _ in posts])
             + pick(sorted({s for s, _, _ in posts})) + pick([t for t, _ in fortune_sample()]) + pick(pairs)
             + lee_corpus()[0])
    return list(dict.fromkeys(texts))


def _score_task(kind: str, data: dict[str, Any], emb: Callable[[list[str]], np.ndarray]) -> dict[str, Any]:
    """All metrics of one task, its main score under "score" and its size under "n"."""
    if kind == "classification":
        acc = M.probe_accuracy(emb(data["train_texts"]), data["train_labels"], emb(data["test_texts"]),
                               data["test_labels"])
        return {"score": acc, "accuracy": acc, "n": len(data["train_texts"]) + len(data["test_texts"])}
    if kind == "clustering":
        v = M.v_measure(emb(data["texts"]), data["labels"])
        return {"score": v, "v_measure": v, "n": len(data["texts"])}
    if kind == "pair_classification":
        ap = M.cosine_ap(emb(data["texts1"]), emb(data["texts2"]), data["labels"])
        return {"score": ap, "cosine_ap": ap, "n": len(data["labels"])}
    if kind == "reranking":
        m = M.mean_average_precision(emb(data["queries"]), [emb(c) for c in data["candidates"]], data["relevant"])
        return {"score": m, "map": m, "n": len(data["queries"])}
    if kind == "retrieval":
        r = M.retrieval_scores(emb(data["queries"]), emb(data["corpus"]), data["relevant"], k=10)
        return {"score": r["ndcg@10"], **r, "n": len(data["queries"])}
    if kind == "sts":
        rho = M.sts_spearman(emb(data["texts1"]), emb(data["texts2"]), data["scores"])
        return {"score": rho, "spearman": rho, "n": len(data["scores"])}
    raise ValueError(f"unknown task type {kind!r}; known: {', '.join(TASK_TYPES)}")


def _encode_all(encode: Encode, texts: list[str], progress: bool, label: str) -> dict[str, np.ndarray]:
    """Each distinct text's vector, encoded in chunks of ENCODE_CHUNK."""
    from potstill.ui import task_progress

    distinct = list(dict.fromkeys(texts))
    vectors: list[np.ndarray] = []
    bar = task_progress(label, len(distinct)) if progress else contextlib.nullcontext(lambda n: None)
    with bar as advance:
        for start in range(0, len(distinct), ENCODE_CHUNK):
            vectors.append(np.asarray(encode(distinct[start:start + ENCODE_CHUNK]), dtype=np.float32))
            advance(len(vectors[-1]))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(distinct):
        raise UserError(f"encode returned shape {matrix.shape} for {len(distinct)} texts; expected "
                        f"({len(distinct)}, dims)")
    return dict(zip(distinct, matrix, strict=True))


def run_suite(encode: Encode, *, teacher_encode: Encode | None = None, tasks: list[str] | None = None,
              progress: bool = True) -> SuiteResult:
    """Score `encode` on the suite's tasks (default: all), with fidelity to `teacher_encode` when given."""
    names = list(TASKS) if tasks is None else list(tasks)
    for name in names:
        if name not in TASKS:
            raise UserError(f"unknown suite task {name!r}{did_you_mean(name, list(TASKS))}; tasks: "
                            f"{', '.join(TASKS)}")
    if not names:
        raise UserError("tasks: choose at least one suite task")
    start = time.perf_counter()
    datas = {name: TASKS[name].load() for name in names}
    fid_texts = fidelity_texts() if teacher_encode is not None else []
    texts = [t for d in datas.values() for t in task_texts(d)] + fid_texts
    vectors = _encode_all(encode, texts, progress, "suite: encoding")

    def emb(batch: list[str]) -> np.ndarray:
        return np.stack([vectors[t] for t in batch])

    per_task: dict[str, dict[str, Any]] = {}
    for name in names:
        task = TASKS[name]
        tick = time.perf_counter()
        scores = _score_task(task.type, datas[name], emb)
        per_task[name] = {"type": task.type, "metric": task.main_metric, **scores,
                          "seconds": round(time.perf_counter() - tick, 3)}
    by_type: dict[str, list[float]] = defaultdict(list)
    for r in per_task.values():
        by_type[r["type"]].append(r["score"])
    per_type = {t: float(np.mean(by_type[t])) for t in TASK_TYPES if t in by_type}
    fidelity: dict[str, float | None] = {"cosine_to_teacher": None, f"neighbour_recall@{NEIGHBOURS}": None}
    if teacher_encode is not None:
        from potstill.eval.metrics import mean_cosine, neighbour_recall_at_k

        teacher = _encode_all(teacher_encode, fid_texts, progress, "suite: teacher (fidelity)")
        s, t = emb(fid_texts), np.stack([teacher[x] for x in fid_texts])
        fidelity["cosine_to_teacher"] = mean_cosine(s, t) if s.shape[1] == t.shape[1] else None
        fidelity[f"neighbour_recall@{NEIGHBOURS}"] = neighbour_recall_at_k(s, t, k=NEIGHBOURS)
    return SuiteResult(per_task=per_task, per_type=per_type,
                       average=float(np.mean([r["score"] for r in per_task.values()])),
                       average_over_types=float(np.mean(list(per_type.values()))), fidelity=fidelity,
                       seconds=time.perf_counter() - start)


def score_teacher_and_student(teacher: Any, student: Any, *, tasks: list[str] | None = None
                              ) -> dict[str, SuiteResult]:
    """The teacher and a student (sentence-transformers folders or models, each at its own max_seq_length) on
    the suite, the teacher also the student's fidelity reference; the teacher's vectors are encoded once."""
    teacher_encode = cached_encoder(encoder_for(teacher))
    return {"teacher": run_suite(teacher_encode, teacher_encode=teacher_encode, tasks=tasks),
            "student": run_suite(encoder_for(student), teacher_encode=teacher_encode, tasks=tasks)}


def encoder_for(model: Any, batch_size: int = 64) -> Encode:
    """`encode` for a sentence-transformers folder (or `builtin:minilm`) or a loaded SentenceTransformer.

    A potstill static student saved as a sentence-transformers folder loads the same way. Vectors are
    returned as float32 numpy arrays, as the model outputs them (normalised if it ends with Normalize).
    """
    if isinstance(model, (str, Path)):
        path = str(model)
        if path == "builtin:minilm":
            from potstill.assets import minilm_path

            path = str(minilm_path())
        if not Path(path).is_dir():
            raise UserError(f"{path}: expected a sentence-transformers model folder")
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path)
    if not hasattr(model, "encode"):
        raise UserError(f"expected a sentence-transformers folder or model, got {type(model).__name__}")

    def encode(texts: list[str]) -> np.ndarray:
        out = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    return encode


def cached_encoder(encode: Encode) -> Encode:
    """`encode` that remembers every text's vector, so that a text is encoded once across several suite runs
    (e.g. the teacher scored on the suite and then used as the reference for a student's fidelity)."""
    memory: dict[str, np.ndarray] = {}

    def cached(texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in memory]
        if missing:
            memory.update(zip(missing, np.asarray(encode(missing), dtype=np.float32), strict=True))
        return np.stack([memory[t] for t in texts])

    return cached
