"""Claim check (issue #16 §3): SinKD, KD + Sinkhorn vs KD alone, on a classification distillation.

SinKD (Cui et al., LREC-COLING 2024) adds a batch-wise Sinkhorn distance between the student's and the teacher's
softened class distributions to the usual KD loss and reports gains over KD on GLUE. Every run here is a
potstill classification run (`potstill.train.run.run_recipe`) on the built-in digits data with `factory` models:

- teacher: `potstill.examples.digits:trained_teacher` (MLP 64-256-256-10 trained on the digits train split);
- student: `potstill.examples.digits:mlp` (one hidden layer, `--hidden` wide, init seed = the run's seed);
- data: the first `--records` records of the digits train split (distillation data), scored on the test split.

Objectives, with the official code's weights (2018cx/SinKD `glue_train.py`: α = 0.8, T = 2, Sinkhorn scale
c = 1e-3 on Σ_ij Π⊙W, ε = 0.1, 20 iterations, Sinkhorn's own T = 2):

- `kd`: 0.2·CE(gold) + 0.8·T²·KL(p_t^T ‖ p_s^T) (potstill `forward_kl`, temperature 2, scale_t2);
- `kd+sinkhorn`: the same + potstill `sinkhorn` with weight 1e-3 × batch size (potstill's "mean" reduction
  divides the official sum Σ_ij Π⊙W by the B rows of the batch, so this weight gives the official scale);
- `kd+sinkhorn×10`, `kd+sinkhorn×100`: the Sinkhorn weight 10 and 100 times larger, to see whether the term
  moves anything;
- `sinkhorn only`: the Sinkhorn term alone (weight 1, no KD, no gold labels).

Metrics: test accuracy and agreement with the teacher's argmax (the run's summary table); mean ± sample std over
`--seeds`; the paired difference to `kd` (same seed, same data order) is shown with its own mean ± std; and the
weighted Sinkhorn term's share of the training loss over the run's logged steps (`obj/sinkhorn` in metrics.jsonl).

Usage: python benchmarks/claim_sinkd.py [--quick] [--seeds 0 1 2] [--records 128 1257] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from potstill.config.loading import validate_recipe
from potstill.io import atomic_write_json
from potstill.train.run import run_recipe

BATCH = 32
ROWS = {
    "kd": 0.0,
    "kd+sinkhorn": 1e-3 * BATCH,
    "kd+sinkhorn×10": 1e-2 * BATCH,
    "kd+sinkhorn×100": 1e-1 * BATCH,
    "sinkhorn only": 1.0,  # no KD and no gold labels: what the batch-wise term teaches by itself
}


def recipe(row: str, seed: int, records: int, steps: int, hidden: int, out: str,
           teacher_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The potstill recipe (a dict) of one run: objectives of `row`, `records` training records, `seed`."""
    with_kd = row != "sinkhorn only"
    objectives: list[dict[str, Any]] = [
        {"name": "forward_kl", "weight": 0.8, "params": {"temperature": 2.0, "scale_t2": True}}] if with_kd else []
    if ROWS[row]:
        objectives.append({"name": "sinkhorn", "weight": ROWS[row],
                           "params": {"temperature": 2.0, "epsilon": 0.1, "iterations": 20}})
    return {
        "name": f"sinkd-{row.replace('×', 'x').replace('+', '-').replace(' ', '-')}-n{records}-s{seed}",
        "task": "classification",
        "seed": seed,
        "output_dir": out,
        "teacher": {"factory": "potstill.examples.digits:trained_teacher", "kwargs": teacher_kwargs or {}},
        "student": {"init": "factory", "factory": "potstill.examples.digits:mlp",
                    "kwargs": {"hidden": hidden, "seed": seed}},
        "data": {"train": {"path": "builtin:digits", "split": "train", "limit": records},
                 "eval": {"path": "builtin:digits", "split": "test"}},
        "objectives": objectives,
        "trainer": {"max_steps": steps, "batch_size": BATCH, "lr": 1e-2, "weight_decay": 0.0,
                    "hard_label_weight": 0.2 if with_kd else 0.0, "log_every": max(1, steps // 20), "num_threads": 1},
        "eval": {"compare_before": False, "throughput": False},
    }


def student_row(summary: dict[str, Any], sinkhorn_weight: float) -> dict[str, float]:
    """Test accuracy, agreement and teacher accuracy from a run's summary; the Sinkhorn term's mean share of the
    logged training loss from its metrics.jsonl."""
    table = summary["table"]
    after = next(r for r in table if r["model"].startswith("student"))
    teacher = next(r for r in table if r["model"] == "teacher")
    shares = []
    for line in (Path(summary["student_dir"]).parent / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "obj/sinkhorn" in record and record["loss"] > 0:
            shares.append(sinkhorn_weight * record["obj/sinkhorn"] / record["loss"])
    return {"accuracy": after["accuracy"], "agreement": after["agreement"], "teacher": teacher["accuracy"],
            "share": statistics.fmean(shares) if shares else 0.0}


def mean_std(values: list[float], signed: bool = False) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{'+' if signed else ''}.4f} ± {sd:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: kd and kd+sinkhorn, 1 seed, 64 records, 20 steps, a small teacher (2 epochs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--records", type=int, nargs="+", default=[128, 1257])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON (reproduce.py)")
    args = p.parse_args(argv)
    teacher_kwargs: dict[str, Any] = {}
    rows = list(ROWS)
    if args.quick:
        rows = rows[:2]
        args.seeds, args.records, args.steps = [0], [64], 20
        teacher_kwargs = {"hidden": 64, "epochs": 2}
    torch.set_num_threads(1)
    started = time.perf_counter()
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    teacher_accuracy = float("nan")
    with tempfile.TemporaryDirectory() as out:
        for records in args.records:
            for row in rows:
                for seed in args.seeds:
                    summary = run_recipe(validate_recipe(
                        recipe(row, seed, records, args.steps, args.hidden, out, teacher_kwargs)), overwrite=True)
                    result = student_row(summary, ROWS[row])
                    teacher_accuracy = result["teacher"]
                    results.setdefault((records, row), []).append(result)
    width = teacher_kwargs.get("hidden", 256)
    print(f"\nSinKD on digits: teacher MLP 64-{width}-{width}-10 (test accuracy {teacher_accuracy:.4f}), student MLP "
          f"64-{args.hidden}-10, {args.steps} steps × {BATCH}, seeds {args.seeds}")
    print(f"{'records':>7} {'objectives':16} {'test accuracy':>17} {'Δ acc vs kd':>17} {'agreement':>17} "
          f"{'Δ agree vs kd':>17} {'Sinkhorn share':>14}")
    for records in args.records:
        base = results[(records, "kd")]
        for row in rows:
            runs = results[(records, row)]
            acc = [r["accuracy"] for r in runs]
            agree = [r["agreement"] for r in runs]
            d_acc = [r["accuracy"] - b["accuracy"] for r, b in zip(runs, base, strict=True)]
            d_agree = [r["agreement"] - b["agreement"] for r, b in zip(runs, base, strict=True)]
            print(f"{records:7d} {row:16} {mean_std(acc):>17} {mean_std(d_acc, True):>17} {mean_std(agree):>17} "
                  f"{mean_std(d_agree, True):>17} {statistics.fmean(r['share'] for r in runs):14.2%}")
    if args.json:
        atomic_write_json(args.json, {
            "seeds": args.seeds, "teacher_accuracy": teacher_accuracy,
            "rows": {str(records): {row: {k: statistics.fmean(r[k] for r in results[(records, row)])
                                          for k in ("accuracy", "agreement", "share")} for row in rows}
                     for records in args.records},
        })
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
