"""`potstill advise`: which teacher size and which student init for a student of N parameters.

Paper: Zhang et al., "Towards the Law of Capacity Gap in Distilling Language Models" (MiniMA, 2023). Across scales
the best teacher was about 2.5 × the student's size (the student ≈ 40 % of the teacher); a much larger teacher
teaches worse, a barely larger one has little to teach. Their student starts as the teacher structurally pruned
(mask-gradient importance; `student.init: pruned`) and is then distilled. The advisor states the law's teacher
size for N (`CAPACITY_RATIO` × N), where the given teacher stands against it (in range: `IN_RANGE`, 1.6-4 ×), and
the init: the best one among logged `potstill search` trials of this teacher with students within ±30 % of N
(`SIZE_TOLERANCE`), else the paper's prune-then-distil. With at least 5 such logged trials it also fits the
AutoDistiller-style recommender (`potstill.search.recommender`) and shows its best untried configuration with its
leave-one-out error.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from potstill.errors import UserError

CAPACITY_RATIO = 2.5
IN_RANGE = (1.6, 4.0)
SIZE_TOLERANCE = 0.3
MIN_RECOMMENDER_TRIALS = 5


def parse_count(text: str) -> int:
    """`15.6M`, `1.2B`, `300k`, `22700000` → a parameter count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*", str(text))
    if not match:
        raise UserError(f"--student-params {text!r}: expected a count such as 15.6M, 1.2B or 22700000")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[match.group(2).lower()]
    count = int(float(match.group(1)) * scale)
    if count < 1:
        raise UserError(f"--student-params {text!r}: must be at least 1")
    return count


def human(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return f"{count:.0f}"


def teacher_params(path: str) -> int:
    """Parameters of the model at `path` (built from its config on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from potstill.students.loading import resolve_model_path

    folder = resolve_model_path(path, field="--teacher")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"--teacher {path}: not a Hugging Face model folder ({exc})") from None
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    return int(sum(p.numel() for p in model.parameters()))


def law_lines(teacher: int, student: int) -> list[str]:
    ratio = teacher / student
    best = CAPACITY_RATIO * student
    lines = [f"teacher {human(teacher)} is {ratio:.1f}× the student ({human(student)}); the capacity-gap law "
             f"(MiniMA) puts the best teacher at ~{CAPACITY_RATIO}× the student: ~{human(best)}."]
    if ratio > IN_RANGE[1]:
        lines.append(f"the gap is wide: distil from a teacher of ~{human(best)} (e.g. this one pruned or distilled "
                     f"to that size first), or aim for a student of ~{human(teacher / CAPACITY_RATIO)}.")
    elif ratio < IN_RANGE[0]:
        lines.append(f"the student is close to the teacher's size: a teacher of ~{human(best)} would have more to "
                     f"teach, or choose a student of ~{human(teacher / CAPACITY_RATIO)}.")
    else:
        lines.append(f"this teacher is within the law's range ({IN_RANGE[0]}-{IN_RANGE[1]}× the student).")
    return lines


def _same_teacher(log: dict[str, Any], teacher: str) -> bool:
    from potstill.students.loading import resolve_model_path

    def norm(p: str) -> str:
        try:
            return str(Path(resolve_model_path(p, field="teacher")).resolve())
        except UserError:
            return p

    return norm(str(log.get("teacher", ""))) == norm(teacher)


def log_lines(logs: list[dict[str, Any]], teacher: str, student: int) -> list[str]:
    """The init advice from logged trials of this teacher near this size; the recommender when enough."""
    mine = [log for log in logs if _same_teacher(log, teacher) and log.get("proxy") == "train"]
    near = [(log, t) for log in mine for t in log["trials"] if t.get("state") == "complete" and t.get("params")
            and abs(t["params"] - student) <= SIZE_TOLERANCE * student and math.isfinite(t["quality"])]
    if not near:
        return [f"no logged search trial of this teacher within ±{SIZE_TOLERANCE:.0%} of {human(student)} "
                f"({len(logs)} search log(s) read): start from init pruned (MiniMA's prune-then-distil), or "
                f"layers_from_teacher when only the depth shrinks; `potstill search` can compare them."]
    by_init: dict[str, tuple[float, dict[str, Any], dict[str, Any]]] = {}
    for log, t in near:
        sign = 1.0 if log.get("direction", "maximize") == "maximize" else -1.0
        init = t["values"].get("init", "?")
        if init not in by_init or sign * t["quality"] > sign * by_init[init][0]:
            by_init[init] = (t["quality"], t, log)
    ranked = sorted(by_init.items(), key=lambda kv: -kv[1][0] if kv[1][2].get("direction") == "maximize"
                    else kv[1][0])
    init, (quality, trial, log) = ranked[0]
    others = ", ".join(f"{i} {q:.4f}" for i, (q, _, _) in ranked[1:])
    lines = [f"student init: {init} ({trial['label']}) scored best among {len(near)} logged trials within "
             f"±{SIZE_TOLERANCE:.0%} of this size: {log['metric']} {quality:.4f}"
             f"{'; best of the others: ' + others if others else ''} (log {log['file']})."]
    records = [t for log in mine for t in log["trials"] if t.get("state") == "complete"]
    metrics = {log["metric"] for log in mine}
    if len(records) >= MIN_RECOMMENDER_TRIALS and len(metrics) == 1:
        from potstill.search.recommender import Recommender

        model = Recommender.fit(records, maximize=mine[0].get("direction", "maximize") == "maximize")
        new = [r for r in model.rank(model.combinations()) if not r.tried]
        pick = (f"best untried configuration {new[0].config}, predicted {log['metric']} {new[0].predicted:.4f}"
                if new else "every combination of the logged values was tried")
        lines.append(f"recommender (ridge on {model.trials} logged trials; leave-one-out error {model.loo_mae:.4f} "
                     f"vs {model.baseline_mae:.4f} for the mean of the others): {pick}.")
    return lines


def advise_text(teacher: str, student: int, log_paths: list[Path]) -> str:
    from potstill.search.recommender import read_logs

    lines = law_lines(teacher_params(teacher), student)
    lines += log_lines(read_logs([p for p in log_paths if p.exists()]), teacher, student)
    return "\n".join(lines)
