"""The model card: `student/README.md`, what the Hugging Face Hub shows for a pushed student folder.

Front matter in the Hub's format (library, pipeline tag, tags, the teacher as `base_model` when it is a hub id), then
what was distilled from what, on which data and objectives, the results table of the run (teacher / student before
/ student after, the same numbers as `summary.json`), how to load the folder, and the recipe that reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.io import atomic_write_text
from potstill.report.html import format_value, table_columns

PIPELINE_TAGS = {"classification": "text-classification", "embedding": "sentence-similarity",
                 "causal_lm": "text-generation", "seq2seq": "text2text-generation", "ranking": "text-ranking"}


@dataclass(frozen=True)
class CardFacts:
    """What the card says about one run; `teacher` is a folder, `builtin:` name or hub id."""

    name: str
    task: str
    teacher: str
    student: str
    data: str
    objectives: str
    training: str
    recipe_yaml: str


def _library(student_dir: Path) -> str | None:
    if (student_dir / "modules.json").is_file():
        return "sentence-transformers"
    if (student_dir / "config.json").is_file():
        return "transformers"
    return None


def _is_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "builtin:")) and not Path(path).exists()


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = table_columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def _usage(library: str | None, task: str) -> str:
    if library == "sentence-transformers":
        return ("```python\nfrom sentence_transformers import SentenceTransformer\n\n"
                "model = SentenceTransformer(\"path/to/student\")\nvectors = model.encode([\"a sentence\"])\n```")
    if library == "transformers":
        auto = {"classification": "AutoModelForSequenceClassification", "causal_lm": "AutoModelForCausalLM",
                "seq2seq": "AutoModelForSeq2SeqLM"}.get(task, "AutoModel")
        return (f"```python\nfrom transformers import AutoTokenizer, {auto}\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"path/to/student\")\n"
                f"model = {auto}.from_pretrained(\"path/to/student\")\n```")
    return ("A plain PyTorch module: `potstill.students.save.load_factory_student(\"path/to/student\")` rebuilds it "
            "(its factory must be importable); `potstill export RUN` writes an ONNX copy that needs no Python code.")


def model_card(student_dir: Path, facts: CardFacts, table: list[dict[str, Any]]) -> str:
    """The card's Markdown text."""
    library = _library(student_dir)
    front = ["---", "tags:", "- potstill", "- knowledge-distillation"]
    if library:
        front.append(f"library_name: {library}")
    if facts.task in PIPELINE_TAGS:
        front.append(f"pipeline_tag: {PIPELINE_TAGS[facts.task]}")
    if _is_hub_id(facts.teacher):
        front.append(f"base_model: {facts.teacher}")
    front.append("---")
    body = [
        f"# {facts.name}",
        "",
        f"A student distilled with potstill, a knowledge-distillation toolkit ({facts.task} task).",
        "",
        f"- **Teacher:** `{facts.teacher}`",
        f"- **Student:** {facts.student}",
        f"- **Training data:** {facts.data}",
        f"- **Objectives:** {facts.objectives}",
        f"- **Training:** {facts.training}",
        "",
        "## Results",
        "",
        "Measured at the end of the run on the recipe's held-out data (`summary.json` holds the same numbers).",
        "",
        _markdown_table(table) if table else "No evaluation data was given (data.eval).",
        "",
        "## Use",
        "",
        _usage(library, facts.task),
        "",
        "## Reproduce",
        "",
        "`potstill run recipe.yaml` with this recipe:",
        "",
        "```yaml",
        facts.recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(front + body)


def write_model_card(student_dir: str | Path, facts: CardFacts, table: list[dict[str, Any]]) -> Path:
    """Write `student_dir/README.md` (atomically) and return its path."""
    path = Path(student_dir) / "README.md"
    atomic_write_text(path, model_card(Path(student_dir), facts, table))
    return path
