"""Image KD and SSLD on MNIST-5k (issue #20): does KD beat labels-only at 10 % of the labels, and does SSLD
(distillation alone on the teacher's most confident unlabelled digits, then a labelled fine-tune) beat both?

Teacher: ccexam's MNIST CNN (`potstill.assets_image:mnist_cnn`, 0.42 M parameters). Student: `small_cnn`
(width 8, depth 2, 9.1 k parameters). Data: builtin:mnist-5k, train split 4,000 digits, test split 1,000; the
labelled 10 % is a per-class draw of 400 (subset_seed = seed), the unlabelled pool is the other 3,600 (labels
dropped). Rows, all the packaged recipes run in this process with the seed changed (student init, data
order, labelled draw):
- `CE (10 % labels)`: recipes/mnist-kd.yaml with objectives=[] and the label weight 1 (cross-entropy on the 400
  labels);
- `plain KD (forward KL, T = 4) + CE`: recipes/mnist-kd.yaml with its objective swapped for Hinton's forward KL at
  T = 4 (T²-scaled) plus the labels at weight 1 (the packaged recipe until session 29);
- `KD (10 % labels, logit-standardised)`: recipes/mnist-kd.yaml (logit_std_kd at T = 2 on the 400 digits, no label
  term; why in benchmarks/kd_low_label.py and its docs/results.md section);
- `SSLD (JS on pool, then fine-tune)`: recipes/mnist-ssld.yaml with the paper's objective, js_divergence alone
  (on the 400 + up to 300 digits per teacher class from the pool, de-duplicated against the test digits), then
  recipes/mnist-ssld-finetune.yaml (labels only, lr / 10) from its student; the stage-1 accuracy is reported too;
- `SSLD ... logit-std KD` / `logit-std JS`: the same two stages with stage 1's objective set to mnist-kd's
  (logit_std_kd, T = 2, T²-scaled) or to logit_std_js (SSLD's JS on z-scored logits, same T): the same pool pick,
  the same fine-tune. Every SSLD row names its stage-1 objective, whatever the packaged recipe has.
Throughput of teacher and student is measured interleaved (batch 256, potstill.eval.compare_throughput) in the KD
runs (one torch thread: these CNNs are too small to gain from a second).
Reported: test accuracy and teacher agreement, mean ± std over the seeds; and the same on an out-of-distribution
set, builtin:opencv-digits' test split (1,000 digits of OpenCV's sample sheet: other writers, other scanning, 20-px
digits centred on 28 px; `apt-get install opencv-doc`), where the columns read "—" when it is not installed.

Usage: nice -n 5 python benchmarks/image_kd.py [--seeds 0 1 2] [--json out.json]
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

import yaml

REPO = Path(__file__).resolve().parents[1]
ROWS = ("CE (10 % labels)", "plain KD (forward KL, T = 4) + CE", "KD (10 % labels, logit-standardised)",
        "SSLD stage 1 (JS on labelled + pool)",
        "SSLD (JS on pool, then fine-tune)",
        "SSLD stage 1 (logit-std KD on labelled + pool)",
        "SSLD (logit-std KD on pool, then fine-tune)",
        "SSLD stage 1 (logit-std JS on labelled + pool)",
        "SSLD (logit-std JS on pool, then fine-tune)")

PLAIN_KD = {"name": "forward_kl", "params": {"temperature": 4.0, "scale_t2": True}}
LOGIT_STD_KD = {"name": "logit_std_kd", "params": {"temperature": 2.0, "scale_t2": True}}  # as recipes/mnist-kd
LOGIT_STD_JS = {"name": "logit_std_js", "params": {"temperature": 2.0, "scale_t2": True}}
SSLD_STAGE1 = {"js": {"name": "js_divergence"}, "lskd": LOGIT_STD_KD, "lsjs": LOGIT_STD_JS}  # stage 1's objective


def recipe(packaged: str, seed: int, work: Path, **changes: Any) -> dict:
    raw = yaml.safe_load((REPO / "src" / "potstill" / "recipes" / f"{packaged}.yaml").read_text())
    raw.update(name=f"{packaged}-s{seed}", output_dir=str(work), seed=seed)
    for source in ("train",):
        raw["data"][source]["subset_seed"] = seed
    if "ssld" in raw["data"]:
        raw["data"]["ssld"]["pool"]["subset_seed"] = seed
    if raw["student"]["init"] == "factory":
        raw["student"]["kwargs"]["seed"] = seed
    raw["trainer"]["num_threads"] = 1  # tiny CNNs: a second thread only adds synchronisation
    raw["eval"] = {"compare_before": False, "throughput": False, **raw.get("eval", {})}
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    return raw


def after(summary: dict) -> dict:
    return summary["table"][-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, default=None, help="also write the per-seed numbers here")
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from potstill.config import validate_recipe
    from potstill.data.images import load_images
    from potstill.errors import UserError
    from potstill.train.run import fit_recipe

    try:
        ood = load_images("builtin:opencv-digits", split="test", where="the OOD set")
    except UserError as err:
        print(f"no OOD columns: {err}", flush=True)
        ood = None

    def run_recipe(recipe: Any) -> dict:
        task, _, summary = fit_recipe(recipe)  # no HTML report
        if ood is not None:  # the trained student and the teacher on the out-of-distribution digits
            student, teacher = task.logits(task.student, ood.images), task.logits(task.teacher, ood.images)
            summary["ood"] = {"accuracy": float((student.argmax(1) == ood.labels).float().mean()),
                              "agreement": float((student.argmax(1) == teacher.argmax(1)).float().mean()),
                              "teacher_accuracy": float((teacher.argmax(1) == ood.labels).float().mean())}
        return summary

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="potstill-image-kd-"))
    results: dict[str, list[dict]] = {row: [] for row in ROWS}
    speed: list[dict] = []
    teacher: dict = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        ce = run_recipe(validate_recipe(recipe("mnist-kd", seed, work, objectives=[], name=f"ce-s{seed}",
                                               **{"trainer.hard_label_weight": 1.0})))
        plain = run_recipe(validate_recipe(recipe("mnist-kd", seed, work, objectives=[PLAIN_KD],
                                                  name=f"plain-kd-s{seed}", **{"trainer.hard_label_weight": 1.0})))
        kd = run_recipe(validate_recipe(recipe("mnist-kd", seed, work, **{"eval.throughput": True})))
        ssld_runs: list[dict] = []
        for tag, objective in SSLD_STAGE1.items():
            stage1 = run_recipe(validate_recipe(recipe("mnist-ssld", seed, work, name=f"ssld-{tag}-s{seed}",
                                                       objectives=[objective])))
            student = str(work / f"ssld-{tag}-s{seed}" / "student")
            ssld_runs += [stage1, run_recipe(validate_recipe(recipe(
                "mnist-ssld-finetune", seed, work, name=f"ssld-{tag}-finetune-s{seed}",
                student={"init": "pretrained", "path": student})))]
        kept = json.loads((work / f"ssld-js-s{seed}" / "ssld_selection.json").read_text())["kept"]
        for row, summary in zip(ROWS, (ce, plain, kd, *ssld_runs), strict=True):
            results[row].append({"seed": seed, **{k: after(summary)[k] for k in ("accuracy", "agreement")},
                                 "train_seconds": summary["train_seconds"], "ood": summary.get("ood")})
        teacher = kd["table"][0]
        speed.append({"teacher": teacher["images_per_s"], "student": after(kd)["images_per_s"],
                      "teacher_params": teacher["params"], "student_params": after(kd)["params"]})
        ssld_cells = "  ".join(f"{tag} {after(one)['accuracy']:.4f}/{after(two)['accuracy']:.4f}"
                               for tag, one, two in zip(SSLD_STAGE1, ssld_runs[::2], ssld_runs[1::2], strict=True))
        print(f"seed {seed}: CE {after(ce)['accuracy']:.4f}  plain KD {after(plain)['accuracy']:.4f}  KD "
              f"{after(kd)['accuracy']:.4f}  SSLD stage 1/fine-tuned: {ssld_cells}  (pool kept {kept})", flush=True)

    def mean_std(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {std:.4f}"

    print(f"\nteacher: accuracy {teacher['accuracy']:.4f}, {speed[0]['teacher_params']:,} params; student "
          f"{speed[0]['student_params']:,} params")
    ratios = [s["student"] / s["teacher"] for s in speed]
    print(f"throughput (images/s, batch 256, interleaved): teacher {statistics.mean(s['teacher'] for s in speed):,.0f}"
          f", student {statistics.mean(s['student'] for s in speed):,.0f}, speed-up {mean_std(ratios)}×")
    def ood_cell(runs: list[dict], key: str) -> str:
        return mean_std([r["ood"][key] for r in runs]) if all(r["ood"] for r in runs) else "—"

    if ood is not None and results[ROWS[0]][0]["ood"]:
        print(f"teacher on the OOD digits: accuracy {results[ROWS[0]][0]['ood']['teacher_accuracy']:.4f}")
    print(f"\n| row ({len(args.seeds)} seeds) | test accuracy | agreement with teacher | OOD accuracy | OOD agreement "
          "| train s |")
    print("|---|---|---|---|---|---|")
    for row, runs in results.items():
        print(f"| {row} | {mean_std([r['accuracy'] for r in runs])} | {mean_std([r['agreement'] for r in runs])} | "
              f"{ood_cell(runs, 'accuracy')} | {ood_cell(runs, 'agreement')} | "
              f"{statistics.mean(r['train_seconds'] for r in runs):.1f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "speed": speed, "teacher": teacher}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
