"""A seeded synthetic segmentation set: squares and discs on a textured, noisy background (LAD's CPU check).

Three classes per pixel: 0 background, 1 square, 2 disc. Each 1-channel `size`×`size` image holds 1 to
`max_shapes` shapes of either kind; both kinds share the same intensity and size distribution, so only their
outline tells them apart. A smooth random background texture (a coarse 4×4 random field, bilinearly
upsampled) and per-pixel Gaussian noise blur that outline: the image alone leaves pixels that a segmenter cannot
classify with certainty, which is the room a label-assisted teacher (methods-b §17) needs.

Shapes are drawn in order; a later shape paints over an earlier one in both image and mask. A square of
"radius" r covers |dx| ≤ r, |dy| ≤ r around its centre, a disc dx² + dy² ≤ r² (r is drawn uniformly from
[min_radius, max_radius], centres at least r from the border).

`make_shapes(n, seed, config)` returns `(images, masks)`: float32 (n, 1, size, size) and int64 (n, size, size).
The same `(n, seed, config)` always gives the same tensors; the global torch generator is not touched.
`shifted(config)` is this project's distribution shift for the check: 1.5× the noise and smaller shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.errors import UserError

__all__ = ["CLASS_NAMES", "ShapesConfig", "make_shapes", "shifted"]

CLASS_NAMES = ("background", "square", "disc")


@dataclass(frozen=True)
class ShapesConfig:
    """How the images are drawn. Defaults: 32×32, up to 3 shapes of radius 2.5–6.5, shape contrast 0.8 over a
    texture of amplitude 0.5, noise σ 0.5."""

    size: int = 32
    max_shapes: int = 3
    min_radius: float = 2.5
    max_radius: float = 6.5
    contrast: float = 0.8
    texture: float = 0.5
    noise: float = 0.5

    def __post_init__(self) -> None:
        if self.size < 8:
            raise UserError(f"ShapesConfig.size: expected at least 8 pixels, got {self.size}")
        if self.max_shapes < 1:
            raise UserError(f"ShapesConfig.max_shapes: expected at least 1, got {self.max_shapes}")
        if not 0 < self.min_radius <= self.max_radius < self.size / 2 - 1:
            raise UserError(f"ShapesConfig radii: expected 0 < min_radius ≤ max_radius < size/2 − 1 "
                            f"({self.size / 2 - 1}), got {self.min_radius}, {self.max_radius}")
        if min(self.contrast, self.texture, self.noise) < 0:
            raise UserError("ShapesConfig contrast, texture and noise: expected values ≥ 0")


def shifted(config: ShapesConfig) -> ShapesConfig:
    """The shifted test distribution: 1.5× the noise, shapes of radius 2 to 0.7 × the original maximum."""
    return dataclasses.replace(config, noise=config.noise * 1.5, min_radius=min(2.0, config.min_radius),
                               max_radius=max(min(2.0, config.min_radius), 0.7 * config.max_radius))


def make_shapes(n: int, seed: int, config: ShapesConfig | None = None) -> tuple[Tensor, Tensor]:
    """`n` images (float32, n×1×size×size) and their masks (int64, n×size×size, classes 0/1/2), drawn from `seed`."""
    if n < 1:
        raise UserError(f"make_shapes: n must be at least 1, got {n}")
    cfg = config or ShapesConfig()
    gen = torch.Generator().manual_seed(seed)
    size = cfg.size
    coarse = torch.rand(n, 1, 4, 4, generator=gen) * 2 - 1
    images = cfg.texture * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    ys = torch.arange(size, dtype=torch.float32).view(size, 1)
    xs = torch.arange(size, dtype=torch.float32).view(1, size)
    counts = torch.randint(1, cfg.max_shapes + 1, (n,), generator=gen)
    for i in range(n):
        for _ in range(int(counts[i])):
            kind = int(torch.randint(1, 3, (1,), generator=gen))
            radius = cfg.min_radius + float(torch.rand(1, generator=gen)) * (cfg.max_radius - cfg.min_radius)
            low, high = radius, size - 1 - radius
            cy = low + float(torch.rand(1, generator=gen)) * (high - low)
            cx = low + float(torch.rand(1, generator=gen)) * (high - low)
            dy, dx = ys - cy, xs - cx
            if kind == 1:
                inside = (dy.abs() <= radius) & (dx.abs() <= radius)
            else:
                inside = dy**2 + dx**2 <= radius**2
            masks[i][inside] = kind
            images[i, 0][inside] = cfg.contrast
    images = images + cfg.noise * torch.randn(images.shape, generator=gen)
    return images.float(), masks
