"""`potstill search RECIPE --teachers A B C`: which teacher to distil an embedding recipe from.

DistillNearest / DistillWeighted (Borup, Phoo & Hariharan 2023; the scores and weights are
`potstill.teachers.zoo`'s) measured on the recipe's own target data: each candidate teacher (a model folder,
`builtin:<name>` or a Hugging Face id) embeds the recipe's labelled probe texts (`eval.probe_train`) with the
recipe's pooling and max length, and is scored by how well those embeddings fit the labels (`probe`: the
cross-validated accuracy of a logistic-regression head; `h_score`: the closed-form H-score). The best source is
DistillNearest's pick; softmax(score / T) gives DistillWeighted's weights.

Outputs, in the choice folder (default `<output_dir>/<name>-teachers`):
- `teachers.json`: every candidate's score and weight, the metric, the pick;
- `<name>-nearest.yaml`: the recipe with `teacher.path` set to the pick, ready for `potstill run`;
- `<name>-weighted.yaml`: DistillWeighted, the recipe with the pick as `teacher.path` (the student's init,
  tokenizer and evaluation) and every candidate in `teacher.sources` with its weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potstill.errors import UserError


@dataclass
class TeacherChoiceSettings:
    recipe_path: Path
    teachers: list[str]
    out_dir: Path
    metric: str = "probe"
    temperature: float = 0.1
    limit: int | None = None
    user_sets: list[str] = field(default_factory=list)


def _labelled_texts(recipe: Any, limit: int | None) -> tuple[list[str], list[Any]]:
    """The recipe's labelled target texts: `eval.probe_train` (text and label columns)."""
    from potstill.data.loaders import load_source

    if recipe.task != "embedding":
        raise UserError(f"--teachers: field task is {recipe.task!r}; teacher choice scores embedding recipes")
    source = recipe.eval.probe_train
    if source is None:
        raise UserError("--teachers needs labelled target texts: set eval.probe_train (text and label columns)")
    records = load_source(source.path, columns=source.columns or None, required=("text", "label"),
                          split=source.split, limit=limit or source.limit, field="eval.probe_train")
    return [r["text"] for r in records], [r["label"] for r in records]


def choose_teacher(settings: TeacherChoiceSettings, *, progress: Any = None) -> dict[str, Any]:
    """Score every candidate teacher on the recipe's labelled texts; write `teachers.json` and the recipe with
    the pick as its teacher; return what `teachers.json` holds."""
    from potstill.config import dump_recipe, load_recipe
    from potstill.io import atomic_write_json, atomic_write_text
    from potstill.tasks.embedding_sources import encoder_embeddings
    from potstill.teachers.zoo import h_score, nearest, probe_score, similarity_weights

    if len(settings.teachers) < 2:
        raise UserError("--teachers: give at least two candidate teachers to choose from")
    if settings.metric not in ("probe", "h_score"):
        raise UserError(f"--metric must be probe or h_score, got {settings.metric!r}")
    recipe = load_recipe(settings.recipe_path, settings.user_sets)
    texts, labels = _labelled_texts(recipe, settings.limit)
    rows = []
    for path in settings.teachers:
        features = encoder_embeddings(path, texts, pooling=recipe.pooling, max_length=recipe.data.max_length,
                                      batch_size=recipe.eval.batch_size, field="--teachers")
        score = (probe_score(features, labels, seed=recipe.seed) if settings.metric == "probe"
                 else h_score(features, labels))
        rows.append({"teacher": path, "dim": int(features.shape[1]), "score": score})
        if progress is not None:
            progress(rows[-1])
    weights = similarity_weights([r["score"] for r in rows], temperature=settings.temperature).tolist()
    for row, weight in zip(rows, weights, strict=True):
        row["weight"] = weight
    pick = rows[nearest([r["score"] for r in rows])]["teacher"]
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = settings.out_dir / f"{recipe.name}-nearest.yaml"
    chosen = load_recipe(settings.recipe_path, [*settings.user_sets, f"teacher.path={pick}"])
    atomic_write_text(recipe_path, f"# potstill search --teachers: DistillNearest picked {pick} "
                                   f"({settings.metric} on eval.probe_train, {len(texts)} texts)\n"
                                   f"{dump_recipe(chosen)}")
    weighted_path = settings.out_dir / f"{recipe.name}-weighted.yaml"
    sources = json.dumps([{"path": r["teacher"], "weight": r["weight"]} for r in rows])
    weighted = load_recipe(settings.recipe_path, [*settings.user_sets, f"teacher.path={pick}",
                                                  f"teacher.sources={sources}"])
    atomic_write_text(weighted_path, f"# potstill search --teachers: DistillWeighted, every candidate weighted by "
                                     f"softmax({settings.metric} / {settings.temperature}); the pick {pick} gives the "
                                     f"student's init\n{dump_recipe(weighted)}")
    result = {"recipe": str(settings.recipe_path), "metric": settings.metric, "temperature": settings.temperature,
              "labelled_texts": len(texts), "teachers": rows, "nearest": pick, "nearest_recipe": str(recipe_path),
              "weighted_recipe": str(weighted_path)}
    atomic_write_json(settings.out_dir / "teachers.json", result)
    return result
