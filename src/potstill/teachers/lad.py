"""LAD's teacher and student networks: a tiny fully convolutional segmenter, and the label-assisted teacher whose
input stem reads the image plus C one-hot channels of a (noised) label mask.

Paper: Qiu et al., "Make a Strong Teacher with Label Assistance" (2024, LAD; methods-b §17; the losses and
the noising operator are in `potstill.losses.lad`). The paper's teacher is a light segmentation net given the
corrupted ground truth as privileged input; its architecture is not released, so this one is this project's
choice, sized for 32×32 images on a CPU.

`segmentation_net(in_channels, num_classes, width, seed)`: a two-level U-Net —
  full resolution: conv3×3(in→w) → ReLU → conv3×3(w→w) → ReLU        (skip)
  half resolution: maxpool2 → conv3×3(w→2w) → ReLU → conv3×3 dilation 2 (2w→2w) → ReLU → bilinear ×2 upsampling
  head: concat(skip, up) → conv3×3(3w→w) → ReLU → conv1×1(w→C)
The receptive field is about 20 pixels, enough to see the outline of a shape of radius ≤ 7. Weights come from
`seed` (the global generator is left as it was). It is the student (in_channels = image channels) and the
image-only teacher (a larger width).

`LabelAssistedTeacher(image_channels, num_classes, width, seed)`: the same net on image_channels + C inputs;
`forward(images, labels)` one-hot encodes the given (noised) mask and concatenates it to the image; its
`reads_labels` flag tells the segmentation task to feed it a noised mask.

Built once, as the LiT teacher is, and loaded by recipes through `teacher.factory:
potstill.teachers.lad:load_lad_teacher` (kwargs {folder: ...}):

    python -m potstill.teachers.lad --out runs/lad-teacher                      # LAD teacher, lad_teacher_loss
    python -m potstill.teachers.lad --out runs/lad-teacher-image --kind image-only   # the same net on images, CE

trains on `potstill.data.shapes` (`--train` images drawn from `--seed`) with Adam (`fit_segmenter`, the loop
`benchmarks/lad_segmentation.py` also uses) and writes `lad_teacher.json` (kind, widths, every setting) and
`model.safetensors` into the folder in one atomic step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.errors import UserError

__all__ = ["KINDS", "LabelAssistedTeacher", "SegmentationNet", "fit_segmenter", "load_lad_teacher",
           "save_lad_teacher", "segmentation_net", "train_lad_teacher"]

SPEC_FILE, WEIGHTS_FILE = "lad_teacher.json", "model.safetensors"
KINDS = ("label-assisted", "image-only")


def _conv(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.ReLU())


class SegmentationNet(nn.Module):
    """A two-level U-Net mapping (N, in_channels, H, W) images to (N, num_classes, H, W) logits (H, W even)."""

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.full = nn.Sequential(_conv(in_channels, width), _conv(width, width))
        self.coarse = nn.Sequential(nn.MaxPool2d(2), _conv(width, 2 * width), _conv(2 * width, 2 * width, dilation=2))
        self.head = nn.Sequential(_conv(3 * width, width), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        skip = self.full(x)
        up = F.interpolate(self.coarse(skip), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([skip, up], dim=1))


def segmentation_net(in_channels: int = 1, num_classes: int = 3, width: int = 8, seed: int = 0) -> SegmentationNet:
    """A `SegmentationNet` with weights drawn from `seed`."""
    if in_channels < 1 or num_classes < 2 or width < 1:
        raise UserError(f"segmentation_net: expected in_channels ≥ 1, num_classes ≥ 2, width ≥ 1; got "
                        f"{in_channels}, {num_classes}, {width}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = SegmentationNet(in_channels, num_classes, width)
    torch.random.set_rng_state(state)
    return net


class LabelAssistedTeacher(nn.Module):
    """LAD's teacher f(x, N(y)): a `SegmentationNet` whose stem takes the image and the mask's one-hot channels."""

    reads_labels = True  # the segmentation task passes it a noised mask besides the images

    def __init__(self, image_channels: int = 1, num_classes: int = 3, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = segmentation_net(image_channels + num_classes, num_classes, width, seed)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        if labels.shape != (images.shape[0], *images.shape[-2:]):
            raise UserError(f"LabelAssistedTeacher: labels must be (N, H, W) = {(images.shape[0], *images.shape[-2:])}"
                            f" to match the images, got {tuple(labels.shape)}")
        onehot = F.one_hot(labels.long(), self.num_classes).permute(0, 3, 1, 2).to(images.dtype)
        return self.net(torch.cat([images, onehot], dim=1))


StepLoss = Callable[[Tensor, Tensor, torch.Generator], Tensor]


def fit_segmenter(model: nn.Module, step_loss: StepLoss, images: Tensor, masks: Tensor, *, epochs: int,
                  batch_size: int, lr: float, seed: int) -> float:
    """Adam over `epochs` shuffled passes of (images, masks), `step_loss(x, y, generator)` per batch, the shuffle
    and any draw of `step_loss` from one generator seeded by `seed`; returns the seconds spent. Leaves `model` in
    eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            loss = step_loss(images[idx], masks[idx], gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - start


def train_lad_teacher(kind: str, images: Tensor, masks: Tensor, *, num_classes: int = 3, width: int = 16,
                      seed: int = 0, epochs: int = 12, batch_size: int = 32, lr: float = 3e-3, p: float = 0.5,
                      mode: str = "pixel", block: int = 4, consistency: float = 1.0,
                      distance: str = "symmetric_kl") -> tuple[nn.Module, float]:
    """A teacher trained on (images (N, C, H, W), masks (N, H, W)) and the seconds it took. `kind`
    "label-assisted": a `LabelAssistedTeacher` with `lad_teacher_loss` (two noise draws N(y) of each batch's mask,
    `noise_labels(p, mode, block)`, consistency weight λ = `consistency`); "image-only": `segmentation_net` on the
    images with cross-entropy. Weights drawn from `seed`, as in `benchmarks/lad_segmentation.py`."""
    from potstill.losses.lad import lad_teacher_loss, noise_labels

    if kind not in KINDS:
        raise UserError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    channels = int(images.shape[1])
    fit = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
    if kind == "image-only":
        net = segmentation_net(channels, num_classes, width, seed)
        return net, fit_segmenter(net, lambda x, y, g: F.cross_entropy(net(x), y), images, masks, **fit)
    teacher = LabelAssistedTeacher(channels, num_classes, width, seed)

    def step(x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
        first = teacher(x, noise_labels(y, num_classes, p, mode, block, g))
        second = teacher(x, noise_labels(y, num_classes, p, mode, block, g))
        return lad_teacher_loss(first, second, y, consistency, distance)

    return teacher, fit_segmenter(teacher, step, images, masks, **fit)


def save_lad_teacher(model: nn.Module, folder: str | Path, *, kind: str, image_channels: int, num_classes: int,
                     width: int, extra: dict[str, Any] | None = None) -> Path:
    """Write the weights and the spec that `load_lad_teacher` rebuilds the net from (one atomic folder)."""
    from safetensors.torch import save_file

    from potstill.io import atomic_dir, atomic_write_json, safetensors_state

    spec = {"format": 1, "kind": kind, "image_channels": image_channels, "num_classes": num_classes,
            "width": width, **(extra or {})}
    with atomic_dir(folder) as tmp:
        save_file(safetensors_state(model.state_dict()), str(tmp / WEIGHTS_FILE))
        atomic_write_json(tmp / SPEC_FILE, spec)
    return Path(folder)


def load_lad_teacher(folder: str) -> nn.Module:
    """The teacher saved in `folder` by `python -m potstill.teachers.lad` (factory for `teacher.factory`, kwargs
    {folder: ...}): a `LabelAssistedTeacher` or an image-only `SegmentationNet`, in eval mode."""
    from safetensors.torch import load_file

    root = Path(folder)
    if not (root / SPEC_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        raise UserError(f"field teacher.kwargs.folder: {root} is not a LAD teacher folder (expected {SPEC_FILE} and "
                        f"{WEIGHTS_FILE}; make one with `python -m potstill.teachers.lad --out {root}`)")
    spec = json.loads((root / SPEC_FILE).read_text())
    if spec.get("kind") not in KINDS:
        raise UserError(f"{root / SPEC_FILE}: kind must be one of {', '.join(KINDS)}, got {spec.get('kind')!r}")
    channels, classes, width = spec["image_channels"], spec["num_classes"], spec["width"]
    model: nn.Module = (LabelAssistedTeacher(channels, classes, width) if spec["kind"] == "label-assisted"
                        else segmentation_net(channels, classes, width))
    model.load_state_dict(load_file(str(root / WEIGHTS_FILE)))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """Train a LAD teacher (or the image-only one) on the synthetic shapes set and save it."""
    import argparse
    import dataclasses

    from potstill.data.shapes import ShapesConfig, make_shapes

    parser = argparse.ArgumentParser(prog="python -m potstill.teachers.lad", description=main.__doc__)
    parser.add_argument("--out", required=True, help="the teacher folder to write")
    parser.add_argument("--kind", choices=KINDS, default="label-assisted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training images, the weights and the "
                        "shuffle (a recipe's data.shapes draws its images from the same seed)")
    parser.add_argument("--train", type=int, default=800, help="training images drawn")
    parser.add_argument("--noise", type=float, default=ShapesConfig.noise, help="the images' noise σ")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.5, help="label-assisted: share of the mask's pixels re-drawn")
    parser.add_argument("--mode", choices=["pixel", "block"], default="pixel")
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--consistency", type=float, default=1.0, help="label-assisted: λ of the consistency term")
    parser.add_argument("--distance", choices=["symmetric_kl", "mse"], default="symmetric_kl")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = ShapesConfig(noise=args.noise)
    images, masks = make_shapes(args.train, args.seed, shapes)
    settings = {"epochs": args.epochs, "batch_size": args.batch, "lr": args.lr, "seed": args.seed}
    if args.kind == "label-assisted":
        settings |= {"p": args.p, "mode": args.mode, "block": args.block, "consistency": args.consistency,
                     "distance": args.distance}
    model, secs = train_lad_teacher(args.kind, images, masks, width=args.width, **settings)
    save_lad_teacher(model, args.out, kind=args.kind, image_channels=1, num_classes=3, width=args.width,
                     extra={"training": settings, "data": {"source": "builtin:shapes", "images": args.train,
                                                           "seed": args.seed, **dataclasses.asdict(shapes)},
                            "seconds": round(secs, 1)})
    print(f"{args.out}: {args.kind} LAD teacher saved ({secs:.0f} s of training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
