"""VL2V-ADiP and the large-VLM OOD losses on digits (issue #20): does distilling a CLIP-style teacher's image and
text embeddings make a vision student more robust to a digit style shift than training on labels or on the
teacher's logits?

Teacher: the offline LiT teacher (`potstill.teachers.lit`: the locked ccexam MNIST CNN → a trained head into
all-MiniLM-L6-v2's caption space; built into --teacher when missing). Its image vectors on the training digits
are computed once; its class text is the prompt ensemble of the 4 `builtin:digits` templates (and, for the
enriched rows, of every template × the 3 attribute descriptions of `CLASS_DESCRIPTIONS`).
Student (every row): ccexam's USPS CNN (pretrained on USPS digits, 16×16 — another source and style, the
stand-in for the paper's ImageNet backbone) up to its 128-d features, fed each MNIST digit's centre 20×20 crop
resized to 16×16, then one linear map (to 10 classes for CE, to the teacher's 384-d space for the others).
Rows, all on the same labelled MNIST-5k train digits (4,000), Adam lr 1e-3, batch 64, no augmentation:
- `CE`: backbone + linear classifier, cross-entropy on the labels, `--epochs`;
- `KD (logits)`: backbone + W, zero-shot logits s·⟨ℓ2n(Wφ(x)), t_c⟩ (s = 100), T²·KL to the teacher's at T = 2
  plus CE on the labels (Hinton's KD), `--epochs`;
- `VL2V-ADiP`: stage 1 trains W alone (backbone frozen, `--align-epochs`), stage 2 freezes W and trains the
  backbone (`--epochs`), both with −λ·cos(p, e_img) − (1−λ)·cos(p, e_txt(y)), λ = 0.5 (`potstill.losses.vl2v_adip`);
- `VL2V-ADiP + SWA`: the same run, its stage-2 weights averaged after every step from `--swa-start` (0.5) of
  stage 2 on (`potstill.train.weight_average`, dense SWA as in SWAD, which the paper trains with; SWAD's choice of
  the window by validation loss is not reproduced), batch-norm statistics then recomputed for the averaged weights
  by one pass over the training images (`--swa-bn average` keeps the averaged statistics instead);
- `VLM-OOD losses`: backbone + W trained with the paper's sum L-cls + L-vlalign + L-mse + L-im-cst, τ = 0.07,
  misaligned rows filtered (`potstill.losses.vlm_ood`), `--epochs`; `VLM-OOD + enriched text`: the same with the
  enriched class text (the student then also predicts with it);
- `teacher`: the LiT teacher's zero-shot accuracy (plain and enriched class text).
Evaluation on MNIST-5k test (1,000 digits): in domain, rotated ±35° (`rotate_images`) and thickened strokes (3×3
grey dilation, `thicken_images`), and OpenCV's digits (`builtin:opencv-digits` test, 1,000 digits of other writers
and scanning, the issue's natural style shift; Debian opencv-doc), accuracy of argmax over the classes (the
zero-shot rows with the class text).
Mean ± std over the seeds (student head init, data order).

`--dataset fashion`: the same rows on Fashion-MNIST (Debian's dataset-fashion-mnist), with a shift defined here.
Teacher: a LiT teacher whose locked image tower is a small CNN (`small_cnn` width 16, depth 3) trained here on
all 60,000 Fashion-MNIST training images (CE, 6 epochs) under random rotations (±40°) and zoom-outs (to
50–100 %): the stand-in for a CLIP teacher whose web-scale data covered the shift (trained without them it scores
25 % on the rotated test, and there is no robustness to pass on). Its head is aligned to the Fashion caption
templates on randomly turned and zoomed-out views of 20,000 of those images (a head fitted on upright views
alone leaves the zero-shot teacher at 26 % rotated though its tower is robust). Both are built once into
--teacher (default runs/lit-fashion-teacher). Students: the same USPS CNN backbone fed the whole 28×28 frame
resized to 16×16, trained on the first 4,000 training images, upright and full size. Test: the first 1,000
Fashion-MNIST test images in domain, rotated ±35° (`rotate_images`) and zoomed out to 60 % (`shrink_images`:
the item seen from farther away).

Usage: nice -n 5 python benchmarks/vl2v_adip.py [--dataset digits|fashion] [--teacher FOLDER] [--seeds 0 1 2]
       [--swa-start 0.5] [--swa-bn recompute|average] [--epochs 10] [--rows CE 'KD (logits)' ...]
       [--kd-temperature 2] [--kd-ce-weight 1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _digit_views import batched, centre_view, train_rows  # noqa: E402

SWAD = "VL2V-ADiP + SWA"
ROWS = ("CE", "KD (logits)", "VL2V-ADiP", SWAD, "VLM-OOD losses", "VLM-OOD + enriched text")
DEFAULT_TEACHER = {"digits": REPO / "runs" / "lit-teacher", "fashion": REPO / "runs" / "lit-fashion-teacher"}
FASHION_TOWER = {"width": 16, "depth": 3}


def student_pixels(images: torch.Tensor, dataset: str = "digits") -> torch.Tensor:
    """The USPS CNN's 16×16 view of 28×28 images: a digit's centre 20×20 crop, or the whole frame of a Fashion
    item (area resize)."""
    if dataset == "digits":
        return centre_view(images, 16)
    from potstill.data.image_transforms import to_unit

    return nn.functional.interpolate(to_unit(images), size=(16, 16), mode="area")


def class_text(teacher, descriptions: bool, dataset: str = "digits") -> torch.Tensor:
    from potstill.data.vision_language import BUILTIN_CLASS_NAMES, class_captions, class_descriptions
    from potstill.eval.zero_shot import prompt_ensemble

    names, templates = BUILTIN_CLASS_NAMES[dataset]
    extra = class_descriptions(f"builtin:{dataset}", 10) if descriptions else None
    captions = class_captions(list(names), list(templates), extra)
    flat = teacher.encode_texts([c for cls in captions for c in cls]).float()
    return prompt_ensemble(flat.view(10, -1, flat.shape[-1]))


class RandomTurnAndZoom(nn.Module):
    """In training mode, each image rotated by a uniform angle in ±`degrees` and zoomed out to a uniform scale in
    [`min_scale`, 1] about its centre (zero border); the identity in eval mode."""

    def __init__(self, degrees: float = 40.0, min_scale: float = 0.5) -> None:
        super().__init__()
        self.radians, self.min_scale = math.radians(degrees), min_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from potstill.data.vision_language import turn_and_zoom

        if not self.training:
            return x
        angle = (torch.rand(x.shape[0]) * 2 - 1) * self.radians
        return turn_and_zoom(x, angle, self.min_scale + torch.rand(x.shape[0]) * (1 - self.min_scale))


def build_fashion_teacher(folder: Path) -> None:
    """Train the Fashion CNN tower on the 60,000 training images, then the LiT head on 20,000 of them, both on
    views turned and zoomed out at random; save both."""
    from potstill.data.images import load_images
    from potstill.data.vision_language import FASHION_NAMES, FASHION_TEMPLATES, class_captions
    from potstill.students.cnn import small_cnn
    from potstill.teachers.lit import build_lit_teacher, save_lit_teacher, train_lit_head

    train_set = load_images("builtin:fashion-mnist", split="train")
    pixels, labels = train_set.images.float() / 255.0, train_set.labels
    cnn = small_cnn(**FASHION_TOWER)
    t0 = time.time()
    torch.manual_seed(0)
    train_rows(nn.Sequential(RandomTurnAndZoom(), cnn), lambda o, r: nn.functional.cross_entropy(o, labels[r]),
               pixels, epochs=6, seed=0, batch=128, lr=2e-3, cosine=True)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(cnn.state_dict(), folder / "tower.pt")
    print(f"  fashion tower: 60,000 images, 6 epochs, {time.time() - t0:.0f} s", flush=True)
    tower, kwargs = "potstill.students.cnn:small_cnn_features", {"weights": str(folder / "tower.pt"), **FASHION_TOWER}
    feature_dim = FASHION_TOWER["width"] * 2 ** (FASHION_TOWER["depth"] - 1) * (28 >> FASHION_TOWER["depth"]) ** 2
    teacher = build_lit_teacher(tower, "builtin:minilm", feature_dim=feature_dim, image_tower_kwargs=kwargs)
    views = RandomTurnAndZoom().train()
    torch.manual_seed(1)
    features = batched(teacher.image_features, views(pixels[:20000]))
    losses = train_lit_head(teacher, features, labels[:20000],
                            class_captions(list(FASHION_NAMES), list(FASHION_TEMPLATES)), steps=800)
    save_lit_teacher(teacher, folder, image_tower=tower, text_tower="builtin:minilm", image_tower_kwargs=kwargs,
                     extra={"trained_on": "fashion-mnist train, turned and zoomed out at random (tower: "
                                           "60,000 images; head: the first 20,000)",
                            "final_loss": losses[-1]})


def load_data(dataset: str, teacher) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the students' data, the teacher's view of each test set) for `dataset`."""
    from potstill.data.images import load_images
    from potstill.data.vision_language import rotate_images, shrink_images, thicken_images

    if dataset == "digits":
        train_set = load_images("builtin:mnist-5k", split="train")
        test_set = load_images("builtin:mnist-5k", split="test")
        opencv = load_images("builtin:opencv-digits", split="test")
        raw_test = {"mnist": test_set.images.float() / 255.0, "rotated": rotate_images(test_set.images),
                    "thick": thicken_images(test_set.images), "opencv": opencv.images.float() / 255.0}
        labels = {"mnist": test_set.labels, "rotated": test_set.labels, "thick": test_set.labels,
                  "opencv": opencv.labels}
        train_images, train_labels = train_set.images, train_set.labels
    else:
        train_set = load_images("builtin:fashion-mnist", split="train")
        test_set = load_images("builtin:fashion-mnist", split="test")
        images, test_labels = test_set.images[:1000], test_set.labels[:1000]
        raw_test = {"fashion": images.float() / 255.0, "rotated": rotate_images(images),
                    "shrunk": shrink_images(images, 0.6)}
        labels = dict.fromkeys(raw_test, test_labels)
        train_images, train_labels = train_set.images[:4000], train_set.labels[:4000]
    data = {"train_pixels": student_pixels(train_images, dataset), "train_labels": train_labels,
            "teacher_train": batched(teacher.encode_images, train_images.float() / 255.0),
            "test": {k: student_pixels(v, dataset) for k, v in raw_test.items()}, "test_labels": labels}
    with torch.no_grad():
        data["text"], data["enriched"] = class_text(teacher, False, dataset), class_text(teacher, True, dataset)
    return data, raw_test


def train(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pixels: torch.Tensor,
          *, epochs: int, seed: int, batch: int = 64, lr: float = 1e-3,
          after_step: Callable[[int, int], object] | None = None) -> float:
    """Adam on the trainable parameters; `loss_fn(outputs, rows)` with the batch's row indices."""
    return train_rows(model, loss_fn, pixels, epochs=epochs, seed=seed, batch=batch, lr=lr, after_step=after_step)


def accuracy(outputs: torch.Tensor, labels: torch.Tensor, text: torch.Tensor | None) -> float:
    from potstill.eval.zero_shot import zero_shot_predictions

    preds = outputs.argmax(-1) if text is None else zero_shot_predictions(outputs, text)
    return float((preds == labels).float().mean())


class Signal:
    """What the vision_language objectives read: image vectors and the shared class text."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor) -> None:
        self.image, self.class_text = image, text


def run_seed(seed: int, data: dict, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from potstill.config.common import WeightAverageConfig
    from potstill.losses.divergences import forward_kl
    from potstill.losses.promptkd import clip_logits
    from potstill.losses.vl2v_adip import vl2v_adip_loss
    from potstill.losses.vlm_ood import (
        vlm_ood_coherence,
        vlm_ood_label_ce,
        vlm_ood_visual_contrastive,
        vlm_ood_visual_mse,
    )
    from potstill.students.vl2v_adip import usps_cnn_features, vl2v_student
    from potstill.train.weight_average import WeightAverage

    x, y, t_img = data["train_pixels"], data["train_labels"], data["teacher_train"]
    out: dict[str, dict[str, float]] = {}

    def evaluate(row: str, model: nn.Module, text: torch.Tensor | None, seconds: float) -> None:
        out[row] = {name: accuracy(batched(model, pixels), data["test_labels"][name], text)
                    for name, pixels in data["test"].items()}
        out[row]["seconds"] = seconds
        print(f"  seed {seed} {row:26s} " + " ".join(f"{k} {v:.3f}" for k, v in out[row].items()), flush=True)

    text = data["text"]
    if "CE" in args.rows:
        t0 = time.time()
        torch.manual_seed(seed)
        ce = nn.Sequential(usps_cnn_features(), nn.Linear(128, 10))
        train(ce, lambda o, r: nn.functional.cross_entropy(o, y[r]), x, epochs=args.epochs, seed=seed)
        evaluate("CE", ce, None, time.time() - t0)

    if "KD (logits)" in args.rows:
        t0 = time.time()
        kd = vl2v_student(stage="full", seed=seed)

        def kd_loss(o: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            z_s, z_t = clip_logits(o, text), clip_logits(t_img[r], text)
            return (forward_kl(z_s, z_t, temperature=args.kd_temperature, scale_t2=True)
                    + args.kd_ce_weight * nn.functional.cross_entropy(z_s, y[r]))

        train(kd, kd_loss, x, epochs=args.epochs, seed=seed)
        evaluate("KD (logits)", kd, text, time.time() - t0)

    if "VL2V-ADiP" in args.rows or SWAD in args.rows:
        t0 = time.time()
        adip = vl2v_student(stage="align", seed=seed)

        def adip_loss(o: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return vl2v_adip_loss(o, t_img[r], text[y[r]], lam=args.lam)

        train(adip, adip_loss, x, epochs=args.align_epochs, seed=seed)
        adip.stage = "distil"
        adip.lock()
        average = WeightAverage(WeightAverageConfig(method="swa", start=args.swa_start), lambda m: m)

        def fold_in(step: int, steps: int) -> None:
            if SWAD in args.rows and average.takes(step, steps):
                average.update(adip)

        train(adip, adip_loss, x, epochs=args.epochs, seed=seed + 1000, after_step=fold_in)
        seconds = time.time() - t0
        if "VL2V-ADiP" in args.rows:
            evaluate("VL2V-ADiP", adip, text, seconds)
        if SWAD in args.rows:  # the same run's stage 2, its weights averaged
            average.apply(adip)
            if args.swa_bn == "recompute":  # SWA's last step: batch-norm statistics of the averaged weights
                torch.optim.swa_utils.update_bn([x[i:i + 64] for i in range(0, len(x), 64)], adip)  # keeps eval mode
            evaluate(SWAD, adip, text, seconds)

    for row, row_text in (("VLM-OOD losses", text), ("VLM-OOD + enriched text", data["enriched"])):
        if row not in args.rows:
            continue
        t0 = time.time()
        ood = vl2v_student(stage="full", seed=seed)

        def ood_loss(o: torch.Tensor, r: torch.Tensor, row_text: torch.Tensor = row_text) -> torch.Tensor:
            s, t, labels = Signal(o, row_text), Signal(t_img[r], row_text), y[r]
            return (vlm_ood_label_ce(s, t, labels=labels) + vlm_ood_coherence(s, t, labels=labels)
                    + vlm_ood_visual_mse(s, t) + vlm_ood_visual_contrastive(s, t))

        train(ood, ood_loss, x, epochs=args.epochs, seed=seed)
        evaluate(row, ood, row_text, time.time() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=tuple(DEFAULT_TEACHER), default="digits")
    parser.add_argument("--teacher", default=None, help="the LiT teacher folder, built there when missing "
                        "(default: runs/lit-teacher for digits, runs/lit-fashion-teacher for fashion)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--align-epochs", type=int, default=5)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--swa-start", type=float, default=0.5, help="the SWA row averages stage 2's weights after "
                        "every step from this fraction of its steps on")
    parser.add_argument("--swa-bn", choices=("average", "recompute"), default="recompute", help="the SWA row's "
                        "batch-norm statistics: averaged with the weights, or recomputed for the averaged weights by "
                        "one pass over the training images (torch.optim.swa_utils.update_bn, as SWA prescribes)")
    parser.add_argument("--kd-temperature", type=float, default=2.0)
    parser.add_argument("--kd-ce-weight", type=float, default=1.0, help="weight of CE on labels in the KD row")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the per-seed results as JSON here")
    args = parser.parse_args(argv)
    if not 0 <= args.swa_start < 1:
        parser.error(f"--swa-start is a fraction of stage 2's steps in [0, 1), got {args.swa_start}")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "src"))
    from potstill.teachers.lit import load_lit_teacher
    from potstill.teachers.lit import main as build_digit_teacher

    folder = Path(args.teacher) if args.teacher else DEFAULT_TEACHER[args.dataset]
    if not (folder / "head.pt").is_file():
        build_fashion_teacher(folder) if args.dataset == "fashion" else build_digit_teacher(["--out", str(folder)])
    teacher = load_lit_teacher(str(folder))
    data, raw_test = load_data(args.dataset, teacher)
    sets = tuple(raw_test)
    teacher_rows = {}
    for row, text in (("teacher (LiT)", data["text"]), ("teacher, enriched text", data["enriched"])):
        teacher_rows[row] = {k: accuracy(batched(teacher.encode_images, v), data["test_labels"][k], text)
                             for k, v in raw_test.items()}
        print(f"  {row:33s} " + " ".join(f"{k} {v:.3f}" for k, v in teacher_rows[row].items()), flush=True)
    per_seed = {seed: run_seed(seed, data, args) for seed in args.seeds}
    print(f"\n| row | {' | '.join(sets)} | s / run |\n|---|" + "---|" * (len(sets) + 1))
    for row in args.rows:
        cells = []
        for key in (*sets, "seconds"):
            values = [per_seed[s][row][key] for s in args.seeds]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.0f}" if key == "seconds" else
                         f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}")
        print(f"| {row} | {' | '.join(cells)} |")
    for row, values in teacher_rows.items():
        print(f"| {row} | {' | '.join(f'{100 * values[k]:.1f}' for k in sets)} | – |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "teacher": teacher_rows,
                                              "per_seed": per_seed}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
