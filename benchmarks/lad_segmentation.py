"""LAD (label-assisted distillation) on synthetic shapes segmentation, side by side (issue #20 §5, methods-b §17).

Data: `potstill.data.shapes` — 3 classes (background, square, disc), 32×32 noisy textured images; a training
split, a held-out split (same distribution) and a shifted held-out split (`shapes.shifted`: 1.5× noise, smaller
shapes), all drawn from the run's seed. Per seed, each model trained with Adam for the same number of epochs:

- image-only teacher: `segmentation_net(1, 3, teacher_width)`, CE;
- LAD teacher (`LabelAssistedTeacher`, same width) with `lad_teacher_loss`, two noise draws N₁, N₂ (p = `--p`)
  per batch, with λ = 0 (no consistency term: two CE paths only) and with λ = `--consistency`;
- student (`segmentation_net(1, 3, student_width)`) from labels only (CE);
- student distilled from the image-only teacher (`lad_student_loss`, teacher logits on the image);
- student distilled from the LAD teacher with consistency (`lad_student_loss`, teacher fed a fresh N(y) of the
  training mask every batch — the label is available to the teacher during KD).

Evaluation: mIoU over the three classes (intersection and union summed over the whole split). Models that read
a label are evaluated with `--draws` independent noise draws of the held-out mask (p = `--p`): the table gives
the mean over draws, the standard deviation across draws, and how often a pixel's predicted class changes
between two draws (mean over consecutive pairs of draws). A LAD teacher's score therefore uses the (noised)
held-out label: it is privileged, not a deployable segmenter; the students see images only.

The training loop is a small one here (`potstill.teachers.lad.fit_segmenter`, which also builds the teachers of
`python -m potstill.teachers.lad`), not potstill's Distiller: this script trains five models side by side, and
the teachers' dual-path loss trains the teacher itself, which no objective does. The same students through
`potstill run`: `recipes/shapes-lad.yaml` (task segmentation).

The paper's teacher half is unreleased: the noising operator, consistency distance, teacher architecture and
all defaults are this project's choices (see `potstill.losses.lad`).

Usage: python benchmarks/lad_segmentation.py [--seeds 0 1 2] [--train 800] [--epochs 12] [--p 0.5]
       [--mode pixel|block] [--consistency 1.0] [--distance symmetric_kl|mse] [--out lad.json]
       python benchmarks/lad_segmentation.py --merge seed0.json seed1.json seed2.json   # one table
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from potstill.data.shapes import ShapesConfig, make_shapes, shifted
from potstill.eval.segmentation import mean_iou as segmentation_mean_iou
from potstill.losses.lad import lad_student_loss, noise_labels
from potstill.teachers.lad import fit_segmenter, segmentation_net, train_lad_teacher

NUM_CLASSES = 3


def mean_iou(pred: Tensor, target: Tensor, num_classes: int = NUM_CLASSES) -> float:
    return segmentation_mean_iou(pred, target, num_classes)


def train(model: nn.Module, step_loss: Callable[[Tensor, Tensor, torch.Generator], Tensor], images: Tensor,
          masks: Tensor, args: argparse.Namespace, seed: int) -> float:
    """Adam over `args.epochs` shuffled passes (`potstill.teachers.lad.fit_segmenter`); returns the seconds spent."""
    return fit_segmenter(model, step_loss, images, masks, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                         seed=seed)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, labels: Tensor | None = None) -> Tensor:
    outs = []
    for i in range(0, len(images), 256):
        x = images[i:i + 256]
        logits = model(x) if labels is None else model(x, labels[i:i + 256])
        outs.append(logits.argmax(1))
    return torch.cat(outs)


def score_label_model(model: nn.Module, images: Tensor, masks: Tensor, args: argparse.Namespace,
                      seed: int) -> dict[str, float]:
    """mIoU of a label-reading teacher over `args.draws` noise draws of the held-out mask."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    preds = [predict(model, images, noise_labels(masks, NUM_CLASSES, args.p, args.mode, args.block, gen))
             for _ in range(args.draws)]
    scores = [mean_iou(p, masks) for p in preds]
    flips = [float((a != b).float().mean()) for a, b in zip(preds, preds[1:], strict=False)]
    return {"miou": statistics.mean(scores), "draw_std": statistics.pstdev(scores),
            "flip_rate": statistics.mean(flips) if flips else 0.0}


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    cfg = ShapesConfig(noise=args.noise)
    x_tr, y_tr = make_shapes(args.train, seed, cfg)
    splits = {"test": make_shapes(args.test, 1_000 + seed, cfg),
              "shifted": make_shapes(args.test, 2_000 + seed, shifted(cfg))}
    out: dict[str, dict[str, float]] = {}

    def noised(y: Tensor, gen: torch.Generator) -> Tensor:
        return noise_labels(y, NUM_CLASSES, args.p, args.mode, args.block, gen)

    settings = {"width": args.teacher_width, "seed": seed, "epochs": args.epochs, "batch_size": args.batch,
                "lr": args.lr}
    image_teacher, secs = train_lad_teacher("image-only", x_tr, y_tr, **settings)
    out["image-only teacher"] = {"secs": secs} | {
        f"{name}_miou": mean_iou(predict(image_teacher, x), y) for name, (x, y) in splits.items()}

    lad_teachers = {}
    for weight in (0.0, args.consistency):
        teacher, secs = train_lad_teacher("label-assisted", x_tr, y_tr, p=args.p, mode=args.mode, block=args.block,
                                          consistency=weight, distance=args.distance, **settings)
        row: dict[str, float] = {"secs": secs}
        for name, (x, y) in splits.items():
            row |= {f"{name}_{k}": v for k, v in score_label_model(teacher, x, y, args, seed).items()}
        out[f"LAD teacher p={args.p} λ={weight:g}"] = row
        lad_teachers[weight] = teacher

    ce = nn.CrossEntropyLoss()

    def student_row(label: str, step: Callable[[nn.Module], Callable[[Tensor, Tensor, torch.Generator], Tensor]]
                    ) -> None:
        student = segmentation_net(1, NUM_CLASSES, args.student_width, 100 + seed)
        secs = train(student, step(student), x_tr, y_tr, args, seed)
        out[label] = {"secs": secs} | {
            f"{name}_miou": mean_iou(predict(student, x), y) for name, (x, y) in splits.items()}

    student_row("student, labels only", lambda s: lambda x, y, g: ce(s(x), y))

    def kd_from_image(s: nn.Module) -> Callable[[Tensor, Tensor, torch.Generator], Tensor]:
        def step(x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
            with torch.no_grad():
                t = image_teacher(x)
            return lad_student_loss(s(x), t, y, args.alpha, args.temperature)
        return step

    lad_teacher = lad_teachers[args.consistency]

    def kd_from_lad(s: nn.Module) -> Callable[[Tensor, Tensor, torch.Generator], Tensor]:
        def step(x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
            with torch.no_grad():
                t = lad_teacher(x, noised(y, g))
            return lad_student_loss(s(x), t, y, args.alpha, args.temperature)
        return step

    student_row("student ← image-only teacher", kd_from_image)
    student_row(f"student ← LAD teacher λ={args.consistency:g}", kd_from_lad)
    return out


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for model in per_seed[0]:
        table[model] = {}
        for key in per_seed[0][model]:
            values = [run[model][key] for run in per_seed]
            table[model][key] = (statistics.mean(values), statistics.pstdev(values))
    return table


def print_table(table: dict[str, dict[str, tuple[float, float]]], seeds: int) -> None:
    cols = ["test_miou", "test_draw_std", "test_flip_rate", "shifted_miou", "shifted_draw_std", "shifted_flip_rate",
            "secs"]
    print(f"| model ({seeds} seeds, mean ± sd over seeds) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for model, row in table.items():
        cells = []
        for c in cols:
            if c not in row:
                cells.append("—")
            elif c == "secs":
                cells.append(f"{row[c][0]:.0f}")
            elif "miou" not in c:  # spreads across draws are small: one more digit
                cells.append(f"{row[c][0]:.4f} ± {row[c][1]:.4f}")
            else:
                cells.append(f"{row[c][0]:.3f} ± {row[c][1]:.3f}")
        print(f"| {model} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--noise", type=float, default=ShapesConfig.noise)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--teacher-width", type=int, default=16)
    parser.add_argument("--student-width", type=int, default=6)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--mode", choices=["pixel", "block"], default="pixel")
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--consistency", type=float, default=1.0)
    parser.add_argument("--distance", choices=["symmetric_kl", "mse"], default="symmetric_kl")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="print the table of earlier runs' --out files (e.g. one process per seed) and exit")
    args = parser.parse_args(argv)
    if args.merge:
        runs = []
        for path in args.merge:
            with open(path, encoding="utf-8") as f:
                runs += json.load(f)["per_seed"]
        print_table(summarise(runs), len(runs))
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(seed, args))
        print(f"seed {seed} done at {time.perf_counter() - start:.0f} s", flush=True)
    table = summarise(per_seed)
    print_table(table, len(args.seeds))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "per_seed": per_seed}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
