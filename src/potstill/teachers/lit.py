"""A LiT-style CLIP teacher built offline from real parts: a locked image tower, a locked text tower, and a
trained image head that aligns the two.

Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning". LiT keeps a pretrained image tower
frozen and trains the rest contrastively on image–caption pairs. No CLIP model and no image–caption data install
offline here, so this teacher is made of
- the image tower: the ccexam MNIST CNN's 128-d penultimate features (`mnist_cnn_features`), locked;
- the text tower: all-MiniLM-L6-v2 with mean pooling (`builtin:minilm`), locked;
- a trained head (Linear → ReLU → Linear, feature width → the text width) on the image side, fitted with a
  multi-positive contrastive loss: each image against every caption of every class,
  L = −Σ_j q_ij log softmax_j(⟨ℓ2n(h(f_i)), t_j⟩ / τ), q_i uniform over the captions of image i's class
  (τ = 0.05; captions from templates such as "a photo of the digit seven").
Images are labelled here only to pick their captions, the stand-in for real caption pairs.

    python -m potstill.teachers.lit --out runs/lit-teacher       # MNIST-5k + Fashion-MNIST captions, ~1 min

writes a folder that `load_lit_teacher` (the factory `potstill.teachers.lit:load_lit_teacher`) reads back:
`lit_teacher.json` (towers and widths) and `head.pt` (the head's weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.errors import UserError
from potstill.teachers.vision_language import TextTower, load_text_tower

SPEC_FILE, HEAD_FILE = "lit_teacher.json", "head.pt"


def mnist_cnn_features() -> nn.Module:
    """The pretrained MNIST CNN (ccexam) up to its 128-d penultimate ReLU, for [0, 1] pixels (N, 1, 28, 28)."""
    from potstill.assets_image import MNIST_MEAN, MNIST_STD, Normalized, mnist_cnn

    net = mnist_cnn().model
    body = nn.Sequential(net.features, nn.Flatten(), net.classifier[0], net.classifier[1])
    return Normalized(body, MNIST_MEAN, MNIST_STD).eval()


def lit_head(feature_dim: int, embed_dim: int, hidden: int = 256) -> nn.Sequential:
    """The trained part: Linear(feature_dim → hidden), ReLU, Linear(hidden → embed_dim)."""
    return nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))


class LiTTeacher(nn.Module):
    """Locked image tower → trained head, and a locked text tower; `encode_images` / `encode_texts` give unit
    vectors in the text tower's space."""

    def __init__(self, image_tower: nn.Module, head: nn.Module, text_tower: TextTower, *,
                 logit_scale: float = 100.0) -> None:
        super().__init__()
        self.image_tower, self.head, self.text_tower = image_tower.eval(), head, text_tower
        for p in list(image_tower.parameters()) + list(text_tower.parameters()):
            p.requires_grad_(False)
        self.logit_scale = logit_scale

    @property
    def embed_dim(self) -> int:
        return self.text_tower.embed_dim

    def train(self, mode: bool = True) -> LiTTeacher:
        super().train(mode)
        self.image_tower.eval()
        self.text_tower.eval()
        return self

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The locked tower's features (no autograd)."""
        with torch.no_grad():
            return self.image_tower(pixels).float()

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        out = self.head(features)
        return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.image_features(pixels))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.text_tower(texts)


def train_lit_head(teacher: LiTTeacher, features: torch.Tensor, labels: torch.Tensor,
                   captions: list[list[str]], *, steps: int = 800, batch_size: int = 256, lr: float = 2e-3,
                   temperature: float = 0.05, seed: int = 0) -> list[float]:
    """Fit `teacher.head` on locked-tower `features` (N, F) with class `labels` (N,) against `captions[c]` (the
    captions of class c), Adam, seeded; returns the loss of every step."""
    counts = {len(c) for c in captions}
    if len(counts) != 1:
        raise UserError("LiT captions: every class needs the same number of captions")
    per_class = counts.pop()
    text = teacher.encode_texts([t for cls in captions for t in cls])  # (C·K, D)
    caption_class = torch.arange(len(captions)).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(teacher.head.parameters(), lr=lr)
    losses = []
    teacher.head.train()
    for _ in range(steps):
        idx = torch.randint(0, len(features), (min(batch_size, len(features)),), generator=generator)
        logits = teacher.embed_features(features[idx]) @ text.T / temperature
        target = (caption_class.view(1, -1) == labels[idx].view(-1, 1)).float()
        target = target / target.sum(1, keepdim=True)
        loss = -(target * logits.log_softmax(-1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    teacher.head.eval()
    return losses


def build_lit_teacher(image_tower: str | nn.Module, text_tower: str | TextTower, *, feature_dim: int,
                      image_tower_kwargs: dict[str, Any] | None = None, hidden: int = 256, seed: int = 0,
                      logit_scale: float = 100.0) -> LiTTeacher:
    """An untrained LiT teacher: `image_tower` a module or `module:callable`, `text_tower` a TextTower or a
    folder (builtin:minilm), the head seeded."""
    if isinstance(image_tower, str):
        from potstill.teachers.live import call_factory

        image_tower = call_factory(image_tower, dict(image_tower_kwargs or {}), field="teacher.kwargs.image_tower")
    text = text_tower if isinstance(text_tower, TextTower) else load_text_tower(text_tower)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    head = lit_head(feature_dim, text.embed_dim, hidden)
    torch.random.set_rng_state(state)
    return LiTTeacher(image_tower, head, text, logit_scale=logit_scale)


def save_lit_teacher(teacher: LiTTeacher, folder: str | Path, *, image_tower: str, text_tower: str,
                     image_tower_kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the head's weights and the spec (tower specs, widths) that `load_lit_teacher` rebuilds it from."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    first, last = teacher.head[0], teacher.head[-1]
    spec = {"format": 1, "image_tower": image_tower, "image_tower_kwargs": image_tower_kwargs or {},
            "text_tower": text_tower, "feature_dim": first.in_features, "hidden": first.out_features,
            "embed_dim": last.out_features, "logit_scale": teacher.logit_scale, **(extra or {})}
    tmp = out / (HEAD_FILE + ".tmp")
    torch.save(teacher.head.state_dict(), tmp)
    tmp.replace(out / HEAD_FILE)
    (out / (SPEC_FILE + ".tmp")).write_text(json.dumps(spec, indent=2))
    (out / (SPEC_FILE + ".tmp")).replace(out / SPEC_FILE)
    return out


def load_lit_teacher(folder: str) -> LiTTeacher:
    """The LiT teacher saved in `folder` (factory for `teacher.factory`, kwargs {folder: ...})."""
    root = Path(folder)
    if not (root / SPEC_FILE).is_file() or not (root / HEAD_FILE).is_file():
        raise UserError(f"field teacher.kwargs.folder: {root} is not a LiT teacher folder (expected {SPEC_FILE} and "
                        f"{HEAD_FILE}; make one with `python -m potstill.teachers.lit --out {root}`)")
    spec = json.loads((root / SPEC_FILE).read_text())
    teacher = build_lit_teacher(spec["image_tower"], spec["text_tower"], feature_dim=spec["feature_dim"],
                                image_tower_kwargs=spec.get("image_tower_kwargs"), hidden=spec["hidden"],
                                logit_scale=spec.get("logit_scale", 100.0))
    teacher.head.load_state_dict(torch.load(root / HEAD_FILE, map_location="cpu", weights_only=True))
    return teacher.eval()


def main(argv: list[str] | None = None) -> int:
    """Build the offline LiT teacher: MNIST CNN features + MiniLM, head trained on MNIST-5k train digits and
    (with --fashion, the default) 4,000 Fashion-MNIST training images, each with its class's captions."""
    import argparse

    from potstill.data.images import load_images
    from potstill.data.vision_language import (
        DIGIT_NAMES,
        DIGIT_TEMPLATES,
        FASHION_NAMES,
        FASHION_TEMPLATES,
        class_captions,
    )

    parser = argparse.ArgumentParser(prog="python -m potstill.teachers.lit", description=main.__doc__)
    parser.add_argument("--out", required=True, help="the teacher folder to write")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fashion", dest="fashion", action="store_false")
    args = parser.parse_args(argv)
    tower = "potstill.teachers.lit:mnist_cnn_features"
    teacher = build_lit_teacher(tower, "builtin:minilm", feature_dim=128, seed=args.seed)
    digits = load_images("builtin:mnist-5k", split="train")
    parts = [(digits.images, digits.labels, class_captions(list(DIGIT_NAMES), list(DIGIT_TEMPLATES)))]
    if args.fashion:
        fashion = load_images("builtin:fashion-mnist", split="train")
        parts.append((fashion.images[:4000], fashion.labels[:4000] + 10,
                      class_captions(list(FASHION_NAMES), list(FASHION_TEMPLATES))))
    features = torch.cat([teacher.image_features(images.float() / 255.0) for images, _, _ in parts])
    labels = torch.cat([labels for _, labels, _ in parts])
    captions = [c for _, _, caps in parts for c in caps]
    losses = train_lit_head(teacher, features, labels, captions, steps=args.steps, seed=args.seed)
    save_lit_teacher(teacher, args.out, image_tower=tower, text_tower="builtin:minilm",
                     extra={"trained_on": "mnist-5k train" + (" + fashion-mnist train[:4000]" if args.fashion else ""),
                            "steps": args.steps, "final_loss": losses[-1]})
    print(f"{args.out}: LiT teacher saved (final loss {losses[-1]:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
