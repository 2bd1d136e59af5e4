"""The capacity gap (issue #19): one student distilled from teachers 1-8x its size. Is quality monotone in the
teacher's size?

MiniMA (Zhang et al. 2023, "Towards the Law of Capacity Gap in Distilling Language Models") finds the best
teacher about 2.5x the student for LLMs; older work on image KD (Mirzadeh et al. 2020, teacher assistants) saw
students get worse from much larger teachers. This sweep measures it on Fashion-MNIST with potstill's image task.

Student: `small_cnn(width 8, depth 2)`. Teachers: `small_cnn` of depth 2 and the widths whose parameter counts are
closest to 1x, 2x, 4x and 8x the student's, each trained here with labels only (seed 0) on the same training
images. Then, per teacher and seed, the student is distilled with forward KL at T = 4 (T²-scaled) plus the labels
(plain KD, as `recipes/mnist-kd.yaml` had it before session 29); a labels-only student is the baseline. Data:
builtin:fashion-mnist (Debian package dataset-fashion-mnist), a per-class 10 % of the training split (6,000 images)
for every run, and a per-class 20 % of the test split (2,000 images) for evaluation. One torch thread per run.

Usage: nice -n 5 python benchmarks/capacity_gap.py [--seeds 0 1 2] [--ratios 1 2 4 8] [--epochs 15] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from potstill.config import validate_recipe  # noqa: E402
from potstill.eval.speed import count_parameters  # noqa: E402
from potstill.students.cnn import small_cnn  # noqa: E402
from potstill.train import run_recipe  # noqa: E402

STUDENT_WIDTH = 8


def params(width: int) -> int:
    return count_parameters(small_cnn(width=width, depth=2))


def teacher_widths(ratios: list[float]) -> dict[float, int]:
    """For each ratio, the width whose parameter count is closest to ratio × the student's."""
    base = params(STUDENT_WIDTH)
    counts = {w: params(w) for w in range(STUDENT_WIDTH, 65)}
    return {r: min(counts, key=lambda w: abs(counts[w] / base - r)) for r in ratios}


def recipe(name: str, work: Path, *, seed: int, epochs: int, student: dict, teacher: dict,
           kd: bool) -> dict[str, Any]:
    return {
        "name": name, "output_dir": str(work), "task": "image_classification", "seed": seed,
        "teacher": teacher, "student": student,
        "data": {"train": {"path": "builtin:fashion-mnist", "split": "train", "fraction": 0.1, "subset_seed": 0},
                 "eval": {"path": "builtin:fashion-mnist", "split": "test", "fraction": 0.2, "subset_seed": 0}},
        "objectives": [{"name": "forward_kl", "params": {"temperature": 4.0, "scale_t2": True}}] if kd else [],
        "trainer": {"epochs": epochs, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.0, "warmup_ratio": 0.05,
                    "hard_label_weight": 1.0, "log_every": 1000, "num_threads": 1},
        "eval": {"every": 0, "compare_before": False, "throughput": False},
    }


def factory_student(width: int, seed: int) -> dict[str, Any]:
    return {"init": "factory", "factory": "potstill.students.cnn:small_cnn",
            "kwargs": {"width": width, "depth": 2, "seed": seed}}


def accuracy(summary: dict) -> float:
    return float(summary["table"][-1]["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="capacity-gap-"))
    placeholder = {"factory": "potstill.students.cnn:small_cnn", "kwargs": {"width": STUDENT_WIDTH, "depth": 2}}
    result: dict[str, Any] = {"student_params": params(STUDENT_WIDTH), "teachers": {}, "students": {}}

    for ratio, width in teacher_widths(args.ratios).items():
        name = f"teacher-w{width}"
        summary = run_recipe(validate_recipe(recipe(name, work, seed=0, epochs=args.epochs,
                                                    student=factory_student(width, 0), teacher=placeholder,
                                                    kd=False)))
        result["teachers"][ratio] = {"width": width, "params": params(width), "accuracy": accuracy(summary),
                                     "folder": str(work / name / "student")}
        print(f"teacher {ratio:g}x (width {width}, {params(width):,} params): accuracy {accuracy(summary):.4f}",
              flush=True)

    rows: dict[str, list[float]] = {"labels only": []}
    for seed in args.seeds:
        summary = run_recipe(validate_recipe(recipe(f"ce-s{seed}", work, seed=seed, epochs=args.epochs,
                                                    student=factory_student(STUDENT_WIDTH, seed),
                                                    teacher=placeholder, kd=False)))
        rows["labels only"].append(accuracy(summary))
        for ratio, teacher in result["teachers"].items():
            saved = {"factory": "potstill.students.save:load_factory_student", "kwargs": {"path": teacher["folder"]}}
            summary = run_recipe(validate_recipe(recipe(f"kd-{ratio:g}x-s{seed}", work, seed=seed,
                                                        epochs=args.epochs,
                                                        student=factory_student(STUDENT_WIDTH, seed),
                                                        teacher=saved, kd=True)))
            rows.setdefault(f"KD from {ratio:g}x", []).append(accuracy(summary))
        print(f"seed {seed} done", flush=True)
    result["students"] = rows

    print(f"\nstudent: small_cnn width {STUDENT_WIDTH}, {params(STUDENT_WIDTH):,} parameters; "
          f"seeds {args.seeds}, {args.epochs} epochs")
    print("| row | teacher params | teacher accuracy | student accuracy (mean ± std) |\n|---|---|---|---|")
    for key, values in rows.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        teacher = next((t for r, t in result["teachers"].items() if key == f"KD from {r:g}x"), None)
        t_params = f"{teacher['params']:,}" if teacher else "—"
        t_acc = f"{teacher['accuracy']:.4f}" if teacher else "—"
        print(f"| {key} | {t_params} | {t_acc} | {statistics.mean(values):.4f} ± {spread:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
