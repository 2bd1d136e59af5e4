"""DMAE vs MAE-only on the digits (issue #4 §4, methods-b §10's CPU check): does aligning a small masked
autoencoder's features with a pre-trained MAE teacher's give better frozen features than MAE pre-training
alone, on an equal schedule?

The teacher (`potstill.examples.digits_vit:mae_teacher`, 4 layers × 64, 600 Adam steps on the digits train
split) is trained once and passed to every run as `teacher.weights`. Each run is `recipes/digits-dmae.yaml` in a
fresh `python -m potstill run` process: the same 2-layer × 32 student architecture, 400 steps of batch 64, 75%
of the 16 patches masked, the MAE loss with weight 1; `dmae` adds `dmae_align` (student block 1 ↔ teacher
block 2, projected, L1 on normalised features), `mae-only` has no objective. Seeds 0 1 2 vary the student's
initialisation, the data order and the masks. Reported per run and as mean ± std: linear-probe accuracy on
frozen mean-pooled features (fit on 1,000 training images, scored on the 360 test images), reconstruction MSE
on the test images, and the train seconds; plus the teacher's probe accuracy.

Usage: python benchmarks/dmae_study.py [--seeds 0 1 2] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--teacher-steps", type=int, default=600)
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from potstill.examples.digits_vit import mae_teacher

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="potstill-dmae-"))
    weights = work / "teacher.pt"
    torch.save(mae_teacher(steps=args.teacher_steps).state_dict(), weights)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    results: dict[str, list[dict]] = {"dmae": [], "mae-only": []}
    teacher_row = None
    for seed in args.seeds:
        for variant in results:
            name = f"{variant}-s{seed}"
            sets = [f"name={name}", f"output_dir={work / 'runs'}", f"seed={seed}", "teacher.kwargs.steps=0",
                    f"teacher.weights={weights}", f"student.kwargs.seed={seed + 1}", f"trainer.max_steps={args.steps}",
                    "eval.compare_before=false"]
            if variant == "mae-only":
                sets.append("objectives=[]")
            cmd = [sys.executable, "-m", "potstill", "run", str(REPO / "recipes" / "digits-dmae.yaml"), "--overwrite"]
            for item in sets:
                cmd += ["--set", item]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            summary = json.loads((work / "runs" / name / "summary.json").read_text())
            rows = {r["model"]: r for r in summary["table"]}
            teacher_row = rows["teacher"]
            after = rows["student (after)"]
            results[variant].append({"seed": seed, **{k: after[k] for k in ("probe_accuracy", "reconstruction_mse")},
                                     "seconds": summary["train_seconds"]})
            print(f"{variant:8s} seed {seed}: probe {100 * after['probe_accuracy']:.1f}%  reconstruction "
                  f"{after['reconstruction_mse']:.4f}  ({summary['train_seconds']:.0f} s)", flush=True)

    def stat(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
        values = [v * scale for v in values]
        spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.{digits}f}{spread}"

    print(f"\nteacher (4 × 64 MAE): probe {100 * teacher_row['probe_accuracy']:.1f}%")
    print("| student (2 × 32) | seeds | probe acc % | reconstruction MSE | train s |")
    print("|---|---|---|---|---|")
    for variant, rs in results.items():
        print(f"| {variant} | {len(rs)} | {stat([r['probe_accuracy'] for r in rs], 100)} | "
              f"{stat([r['reconstruction_mse'] for r in rs], 1, 4)} | {stat([r['seconds'] for r in rs], 1, 0)} |")
    gains = [a["probe_accuracy"] - b["probe_accuracy"] for a, b in zip(results["dmae"], results["mae-only"],
                                                                        strict=True)]
    print(f"\nDMAE − MAE-only probe accuracy per seed: {', '.join(f'{100 * g:+.1f}' for g in gains)} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
