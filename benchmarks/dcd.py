"""DCD on digit image–caption retrieval (issue #20): does a student trained on the teacher's hardest negatives
with DCD's entropy-weighted loss retrieve better than one trained on random negatives or on labels alone?

Data: MNIST-5k (4,000 train, 1,000 held-out test digits). Every image gets a style class (digit × stroke weight
× slant, 90 classes, `potstill.data.digit_styles`), and the text gallery is every style class in 3 caption
templates (270 captions, e.g. "a bold handwritten seven, leaning right."); image i is relevant to the 3
captions of its style class, so retrieval must get the digit and both style words right. Out of domain: the
same test digits rotated ±35° (`rotate_images`), their style classes measured on the rotated pixels.

Teacher: a LiT-style dual encoder (`potstill.teachers.lit`): locked ccexam MNIST CNN features (the 128-d
penultimate layer plus the last conv maps pooled to 3×3, 704-d, `potstill.teachers.style_tower`) → an MLP head
trained contrastively (τ 0.05, 800 steps) into all-MiniLM-L6-v2's space on the 4,000 training digits with their
style captions; score t = 20·cos (1/τ). Built once into --teacher when the folder is missing. (On the 128-d
penultimate features alone the head reached only 50 % held-out i2t R@1, below every student.)

Student (`potstill.students.image_text_scorer`): a dual encoder, a 2-block CNN on raw pixels → 384-d, and an
identity-initialised linear map of each caption's MiniLM embedding; s = 20·cos. Rows, each trained the same
way (Adam lr 1e-3, batch 64, --epochs, candidate lists re-drawn every epoch: each image's positive caption, one
of its 3 at random, plus K = 7 negatives):
- `DCD (mined)`: `dcd_loss` (α 0.2, T 1) on the 7 of N = 15 random negatives the teacher scores highest;
- `DCD (random)`: the same loss on 7 random negatives;
- `labels only (BCE)`: BCE with [1, 0, …, 0] on 7 random negatives, no teacher (α 0, uniform weights);
- `MSE+BCE uniform (mined)`: `dcd_loss(dynamic=False)` on mined negatives: score MSE KD without the dynamic
  weights.
Reported: image→text and text→image R@1 / R@5 (`potstill.eval.zero_shot.retrieval_recall`) on the held-out
and rotated test digits, mean ± std over the seeds (init and data order), and the spec's check: the teacher's
mean score of mined vs random negatives.

Usage: nice -n 5 python benchmarks/dcd.py [--teacher runs/dcd-teacher] [--seeds 0 1 2] [--epochs 20]
       python benchmarks/dcd.py --data-out runs/dcd-data      # the teacher and image sets of recipes/mnist-dcd.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ROWS = {  # name: (negatives, dcd_loss keyword arguments)
    "DCD (mined)": ("mined", {"alpha": 0.2, "dynamic": True}),
    "DCD (random)": ("random", {"alpha": 0.2, "dynamic": True}),
    "labels only (BCE)": ("random", {"alpha": 0.0, "dynamic": False}),
    "MSE+BCE uniform (mined)": ("mined", {"alpha": 0.2, "dynamic": False}),
}
SETS = ("held-out", "rotated")
METRICS = ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5")
CANDIDATES, KEEP, SCALE = 15, 7, 20.0


def load_teacher(folder: Path, images: torch.Tensor, classes: torch.Tensor, captions: list[str]) -> torch.nn.Module:
    """The LiT style-caption teacher in `folder`, trained and saved there first when missing."""
    from potstill.teachers.lit import build_lit_teacher, load_lit_teacher, save_lit_teacher, train_lit_head

    if (folder / "lit_teacher.json").is_file():
        return load_lit_teacher(str(folder))
    tower = "potstill.teachers.style_tower:mnist_cnn_style_features"
    teacher = build_lit_teacher(tower, "builtin:minilm", feature_dim=704, seed=0, logit_scale=SCALE)
    per_class = len(captions) // int(classes.max() + 1)
    grouped = [captions[i:i + per_class] for i in range(0, len(captions), per_class)]
    losses = train_lit_head(teacher, teacher.image_features(images), classes, grouped, steps=800, seed=0)
    save_lit_teacher(teacher, folder, image_tower=tower, text_tower="builtin:minilm",
                     extra={"trained_on": "mnist-5k train, digit style captions (potstill.data.digit_styles)",
                            "steps": 800, "final_loss": losses[-1]})
    return teacher.eval()


def prepare(teacher_dir: Path) -> dict:
    """Pixels, style classes, the teacher's unit image / caption embeddings for train, held-out and rotated."""
    from potstill.data.digit_styles import fit_style_bins, style_captions, style_classes
    from potstill.data.images import load_images
    from potstill.data.vision_language import rotate_images

    train, test = load_images("builtin:mnist-5k", split="train"), load_images("builtin:mnist-5k", split="test")
    bins = fit_style_bins(train.images, train.labels)
    pixels = {"train": train.images.float() / 255.0, "held-out": test.images.float() / 255.0}  # (N, 1, 28, 28)
    pixels["rotated"] = rotate_images(test.images)
    digits = {"train": train.labels, "held-out": test.labels, "rotated": test.labels}
    classes = {name: style_classes(pixels[name], digits[name], bins) for name in pixels}
    captions, caption_classes = style_captions()
    teacher = load_teacher(teacher_dir, pixels["train"], classes["train"], captions)
    with torch.no_grad():
        text = teacher.encode_texts(captions).float()
        images = {name: torch.cat([teacher.encode_images(x[i:i + 500]) for i in range(0, len(x), 500)])
                  for name, x in pixels.items()}
    return {"pixels": pixels, "classes": classes, "caption_classes": caption_classes, "text": text,
            "teacher_images": images, "scale": float(teacher.logit_scale)}


def draw_lists(negatives: str, teacher_scores: torch.Tensor, relevant: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    from potstill.data.hard_negatives import candidate_lists, mine_hard_negatives, random_negatives, sample_positives

    positives = sample_positives(relevant, generator=generator)
    if negatives == "mined":
        chosen = mine_hard_negatives(teacher_scores, relevant, candidates=CANDIDATES, keep=KEEP, generator=generator)
    else:
        chosen = random_negatives(relevant, keep=KEEP, generator=generator)
    return candidate_lists(positives, chosen)


def train_student(pixels: torch.Tensor, text: torch.Tensor, teacher_scores: torch.Tensor, relevant: torch.Tensor,
                  *, negatives: str, loss_kwargs: dict, seed: int, epochs: int, batch_size: int = 64,
                  lr: float = 1e-3, scale: float = SCALE) -> torch.nn.Module:
    """A fresh `image_text_scorer` trained with `dcd_loss(**loss_kwargs)` on candidate lists re-drawn each epoch."""
    from potstill.losses.dcd import dcd_loss
    from potstill.students.image_text_scorer import image_text_scorer

    model = image_text_scorer(embed_dim=text.shape[1], text_dim=text.shape[1], scale=scale, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        lists = draw_lists(negatives, teacher_scores, relevant, generator)
        order = torch.randperm(len(pixels), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            s = model.score(pixels[rows], text, lists[rows])
            t = teacher_scores[rows].gather(1, lists[rows])
            loss = dcd_loss(s, t, **loss_kwargs)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def recall(image_features: torch.Tensor, text_features: torch.Tensor, classes: torch.Tensor,
           caption_classes: torch.Tensor) -> dict[str, float]:
    from potstill.data.digit_styles import style_relevance
    from potstill.eval.zero_shot import retrieval_recall

    return retrieval_recall(image_features, text_features, style_relevance(classes, caption_classes))


def student_recall(model, assets: dict) -> dict[str, dict[str, float]]:
    with torch.no_grad():
        text = model.encode_texts(assets["text"])
        return {name: recall(model.encode_images(assets["pixels"][name]), text, assets["classes"][name],
                             assets["caption_classes"]) for name in SETS}


def negative_scores(assets: dict, seed: int = 0) -> dict[str, float]:
    """The teacher's mean score (and its mean rank among the image's 270 captions) of mined vs random negatives."""
    from potstill.data.digit_styles import style_relevance

    scores = assets["scale"] * assets["teacher_images"]["train"] @ assets["text"].T
    relevant = style_relevance(assets["classes"]["train"], assets["caption_classes"])
    out = {}
    for kind in ("mined", "random"):
        lists = draw_lists(kind, scores, relevant, torch.Generator().manual_seed(seed))[:, 1:]
        out[f"{kind}_score"] = float(scores.gather(1, lists).mean())
    out["positive_score"] = float(scores[relevant].mean())
    return out


def write_style_sets(assets: dict, folder: Path) -> None:
    """train.npz, test.npz and rotated.npz (uint8 images `x`, style-class labels `y`) for recipes/mnist-dcd.yaml."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for name, file in (("train", "train"), ("held-out", "test"), ("rotated", "rotated")):
        pixels = (assets["pixels"][name] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        np.savez(folder / f"{file}.npz", x=pixels, y=assets["classes"][name].numpy())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, default=REPO / "runs" / "dcd-teacher")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--json", type=Path, default=None, help="also write the per-seed numbers here")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="print the table of these --json files")
    p.add_argument("--data-out", type=Path, default=None,
                   help="write the style-labelled image sets of recipes/mnist-dcd.yaml here, build the teacher, stop")
    args = p.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "src"))
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        merged = {row: [run for part in parts for run in part["rows"].get(row, [])] for row in parts[0]["rows"]}
        print_table(parts[0]["teacher"], parts[0]["negatives"], merged)
        return 0
    started = time.time()
    assets = prepare(args.teacher)
    if args.data_out is not None:
        write_style_sets(assets, args.data_out)
        print(f"{args.data_out}: train.npz, test.npz, rotated.npz; teacher in {args.teacher}")
        return 0
    from potstill.data.digit_styles import style_relevance

    teacher_scores = assets["scale"] * assets["teacher_images"]["train"] @ assets["text"].T
    relevant = style_relevance(assets["classes"]["train"], assets["caption_classes"])
    teacher_row = {name: recall(assets["teacher_images"][name], assets["text"], assets["classes"][name],
                                assets["caption_classes"]) for name in SETS}
    negatives = negative_scores(assets)
    print(f"teacher: {teacher_row}\nnegatives: {negatives}  ({time.time() - started:.0f} s)", flush=True)
    results: dict[str, list] = {row: [] for row in args.rows}
    for seed in args.seeds:
        for row in args.rows:
            t0 = time.time()
            kind, kwargs = ROWS[row]
            model = train_student(assets["pixels"]["train"], assets["text"], teacher_scores, relevant,
                                  negatives=kind, loss_kwargs=kwargs, seed=seed, epochs=args.epochs,
                                  scale=assets["scale"])
            results[row].append(student_recall(model, assets))
            print(f"seed {seed} {row}: {results[row][-1]} ({time.time() - t0:.0f} s)", flush=True)

    print(f"\nseeds {args.seeds}, {args.epochs} epochs, {time.time() - started:.0f} s in all")
    print_table(teacher_row, negatives, results)
    if args.json:
        args.json.write_text(json.dumps({"teacher": teacher_row, "negatives": negatives, "rows": results}, indent=2))
    return 0


def print_table(teacher_row: dict, negatives: dict, results: dict[str, list]) -> None:
    def ms(values: list[float]) -> str:
        mean = 100 * statistics.mean(values)
        return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"

    print(f"teacher's mean score: positives {negatives['positive_score']:.2f}, mined negatives "
          f"{negatives['mined_score']:.2f}, random negatives {negatives['random_score']:.2f}")
    header = "| row | " + " | ".join(f"{s} {m}" for s in SETS for m in METRICS) + " |"
    print(header)
    print("|" + "---|" * (1 + len(SETS) * len(METRICS)))
    print("| teacher (LiT, style captions) | " + " | ".join(
        f"{100 * teacher_row[s][m]:.1f}" for s in SETS for m in METRICS) + " |")
    for row, runs in results.items():
        print(f"| {row} ({len(runs)} seeds) | " + " | ".join(ms([r[s][m] for r in runs]) for s in SETS for m in METRICS)
              + " |")


if __name__ == "__main__":
    raise SystemExit(main())
