"""Why KD does not beat labels-only at 10 % of MNIST-5k's labels, and what changes that (issue #20).

The packaged recipe (src/potstill/recipes/mnist-kd.yaml: ccexam's MNIST CNN → small_cnn width 8, 400 labelled
digits, 2-px shifts, 60 epochs) is run with its objectives and label weight set per row (every row names both):
- `ce`: labels only (objectives = [], label weight 1);
- `kd-t4`: forward KL at T = 4, T²-scaled, plus the labels at weight 1 (the packaged recipe until session 29);
- `kd-t20`: forward KL at T = 20 (Hinton's MNIST temperature);
- `ls-t<T>`: logit-standardised KD (potstill.losses.logit_standardization, Sun et al. 2024) at base temperature T;
- `kd09-t20` / `ls09-t<T>`: KD weight 0.9, label weight 0.1 (instead of 1 + 1); `ls90-t2`: KD weight 9, label
  weight 0.1; `*-only-*`: no label term;
- `*-mix`: the same with mixup (transforms.mixup_alpha = 1): the teacher scores each blended digit, the label
  loss is λ·CE(y) + (1 − λ)·CE(y_partner) — the transfer set grows beyond the 400 digits, no pool digit used.
Protocols:
- `test` (default): train on the 400, score the 1,000 test digits and the OpenCV OOD digits, at `--epochs`;
- `val`: pick the epochs per row on a validation split carved from the 400 (per class 10 of ~40 digits: train on
  300, score 100) over `--epoch-grid`, then train on the 400 at the picked epochs and score test / OOD. The test
  digits never choose anything.
Every run appends one JSON line to `--out` (row, seed, protocol, epochs, accuracies); `--table` prints mean ± std
per (row, protocol) from that file.

Usage: nice -n 10 python benchmarks/kd_low_label.py --rows ce kd-t4 ls-t2 --seeds 0 1 [--protocol val]
       python benchmarks/kd_low_label.py --table --out kd_low_label.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))

from image_kd import recipe  # noqa: E402

KD_T4 = {"name": "forward_kl", "params": {"temperature": 4.0, "scale_t2": True}}
KD_T20 = {"name": "forward_kl", "params": {"temperature": 20.0, "scale_t2": True}}


def logit_std(temperature: float, weight: float = 1.0) -> dict:
    return {"name": "logit_std_kd", "params": {"temperature": temperature, "scale_t2": True}, "weight": weight}


def row(*objectives: dict, labels: float = 1.0) -> dict[str, Any]:
    """Changes to the packaged recipe: these objectives and this label (cross-entropy) weight."""
    return {"objectives": list(objectives), "trainer.hard_label_weight": labels}


ROWS: dict[str, dict[str, Any]] = {
    "ce": row(),
    "kd-t4": row(KD_T4),
    "kd-t20": row(KD_T20),
    "ls-t1": row(logit_std(1.0)),
    "ls-t2": row(logit_std(2.0)),
    "ls-t4": row(logit_std(4.0)),
    "kd09-t20": row({**KD_T20, "weight": 0.9}, labels=0.1),
    "ls09-t1": row(logit_std(1.0, 0.9), labels=0.1),
    "ls09-t2": row(logit_std(2.0, 0.9), labels=0.1),
    "ls09-t4": row(logit_std(4.0, 0.9), labels=0.1),
    "ls90-t2": row(logit_std(2.0, 9.0), labels=0.1),
    "ls-only-t1": row(logit_std(1.0), labels=0.0),
    "ls-only-t2": row(logit_std(2.0), labels=0.0),
    "ls-only-t4": row(logit_std(4.0), labels=0.0),
    "kd-only-t20": row(KD_T20, labels=0.0),
}
for _name in list(ROWS):
    ROWS[f"{_name}-mix"] = {**ROWS[_name], "mixup": 1.0}


def build(row: str, seed: int, work: Path, epochs: float, train: dict | None, evaluation: dict | None) -> Any:
    from potstill.config import validate_recipe

    changes = dict(ROWS[row])
    mixup = changes.pop("mixup", 0.0)
    raw = recipe("mnist-kd", seed, work, **changes)
    raw["name"] = f"{row}-s{seed}-e{epochs:g}-{time.time_ns()}"
    raw["trainer"]["epochs"] = epochs
    raw["data"]["transforms"]["mixup_alpha"] = mixup
    if train is not None:
        raw["data"]["train"] = train
    if evaluation is not None:
        raw["data"]["eval"] = evaluation
    return validate_recipe(raw)


def validation_split(seed: int, work: Path) -> tuple[dict, dict]:
    """npz files of the seed's 400 labelled digits split per class into ~300 train / ~100 validation."""
    import numpy as np
    import torch

    from potstill.data.images import load_images, subset_indices

    train = load_images("builtin:mnist-5k", split="train", where="data.train")
    labelled = train.take(subset_indices(train.labels, 0.1, seed=seed))
    val_rows = subset_indices(labelled.labels, 0.25, seed=1000 + seed)
    fit_rows = sorted(set(range(len(labelled))) - set(val_rows))
    paths = []
    for part, rows in (("fit", fit_rows), ("val", val_rows)):
        chosen = labelled.take(torch.as_tensor(rows))
        path = work / f"split-s{seed}-{part}.npz"
        np.savez(path, x=chosen.images.numpy(), y=chosen.labels.numpy())
        paths.append({"path": str(path)})
    return paths[0], paths[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=["ce", "kd-t4"], choices=sorted(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=float, default=60.0, help="protocol test: epochs of every row")
    p.add_argument("--protocol", choices=("test", "val"), default="test")
    p.add_argument("--epoch-grid", type=float, nargs="+", default=[30.0, 60.0, 120.0])
    p.add_argument("--out", type=Path, default=Path("kd_low_label.jsonl"))
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    p.add_argument("--teacher-stats", action="store_true", help="only print the teacher's logit scale on the "
                   "seeds' 400 labelled digits")
    args = p.parse_args()
    if args.table:
        print_table(args.out)
        return 0
    import torch

    if args.teacher_stats:
        teacher_stats(args.seeds)
        return 0

    from potstill.data.images import load_images
    from potstill.train.run import fit_recipe

    torch.set_num_threads(1)
    ood = load_images("builtin:opencv-digits", split="test", where="the OOD set")
    work = Path(tempfile.mkdtemp(prefix="potstill-kd-low-label-"))

    def scored(row: str, seed: int, epochs: float) -> dict:
        task, _, summary = fit_recipe(build(row, seed, work, epochs, None, None))
        student = task.logits(task.student, ood.images)
        test_logits = task.logits(task.student, task.eval_set.images)
        return {"accuracy": summary["table"][-1]["accuracy"], "train_seconds": summary["train_seconds"],
                "ood_accuracy": float((student.argmax(1) == ood.labels).float().mean()),
                "test_logit_std": float(test_logits.std(-1).mean()), "ood_logit_std": float(student.std(-1).mean())}

    for seed in args.seeds:
        for row in args.rows:
            record: dict[str, Any] = {"row": row, "seed": seed, "protocol": args.protocol}
            if args.protocol == "val":
                fit, val = validation_split(seed, work)
                val_acc = {}
                for epochs in args.epoch_grid:
                    _, _, summary = fit_recipe(build(row, seed, work, epochs, fit, val))
                    val_acc[epochs] = summary["table"][-1]["accuracy"]
                best = max(args.epoch_grid, key=lambda e: (val_acc[e], -e))  # ties: the shorter run
                record.update(val_accuracy={f"{e:g}": a for e, a in val_acc.items()}, epochs=best)
            else:
                record["epochs"] = args.epochs
            record.update(scored(row, seed, record["epochs"]))
            print(json.dumps(record), flush=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
    print_table(args.out)
    return 0


def teacher_stats(seeds: list[int]) -> None:
    """Spread and top-2 gap of the teacher's logits, and the entropy / top-class probability of its softmax at
    several temperatures, raw and logit-standardised, on each seed's 400 labelled digits."""
    import torch

    from potstill.assets_image import mnist_cnn
    from potstill.data import image_transforms as tf
    from potstill.data.images import load_images, subset_indices
    from potstill.losses import standardize_logits

    teacher, train = mnist_cnn(), load_images("builtin:mnist-5k", split="train", where="data.train")
    print("| seed | logits | T | entropy (nats, max 2.303) | mean top-class p | mean 2nd p |")
    print("|---|---|---|---|---|---|")
    for seed in seeds:
        labelled = train.take(subset_indices(train.labels, 0.1, seed=seed))
        with torch.inference_mode():
            logits = teacher(tf.to_unit(labelled.images)).float()
        top2 = logits.topk(2, -1).values
        print(f"seed {seed}: teacher accuracy {(logits.argmax(1) == labelled.labels).float().mean():.4f}, logit std "
              f"per digit {logits.std(-1).mean():.2f}, top-2 gap mean {(top2[:, 0] - top2[:, 1]).mean():.2f}")
        for name, z in (("raw", logits), ("standardised", standardize_logits(logits))):
            for temperature in (1.0, 4.0, 20.0) if name == "raw" else (1.0, 2.0, 4.0):
                probs = (z / temperature).softmax(-1)
                entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
                top = probs.topk(2, -1).values.mean(0)
                print(f"| {seed} | {name} | {temperature:g} | {entropy:.3f} | {top[0]:.4f} | {top[1]:.4f} |")


def print_table(path: Path) -> None:
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (run["row"], run["protocol"], run["epochs"] if run["protocol"] == "test" else "val")
        groups.setdefault(key, []).append(run)

    def cell(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {std:.4f}"

    print("| row | protocol | epochs | seeds | test accuracy | OOD accuracy | per seed (test) | student logit std |")
    print("|---|---|---|---|---|---|---|---|")
    for (row, protocol, epochs), members in groups.items():
        members = sorted(members, key=lambda r: r["seed"])
        picked = "/".join(f"{r['epochs']:g}" for r in members)
        per_seed = " / ".join(f"{r['accuracy']:.3f}" for r in members)
        stds = [r["test_logit_std"] for r in members if "test_logit_std" in r]
        logit_std = f"{statistics.mean(stds):.1f}" if stds else "—"
        print(f"| {row} | {protocol} | {picked if protocol == 'val' else f'{epochs:g}'} | "
              f"{','.join(str(r['seed']) for r in members)} | {cell([r['accuracy'] for r in members])} | "
              f"{cell([r['ood_accuracy'] for r in members])} | "
              f"{per_seed} | {logit_std} |")


if __name__ == "__main__":
    raise SystemExit(main())
