"""Image + mask pairs for the segmentation task: `builtin:shapes` (potstill.data.shapes) or an `.npz` file.

- `builtin:shapes`: `make_shapes(n, seed + offset, config)`, offset 0 for split train, 1000 for test and 2000
  for shifted (drawn from `shapes.shifted(config)`), the draws of `benchmarks/lad_segmentation.py`; n is the
  source's `limit` (default 800 for train, 300 otherwise).
- `.npz`: images `x` (or `images`), (N, H, W) or (N, C, H, W), uint8 scaled to [0, 1], floats kept as they are;
  masks `y` (or `masks`), (N, H, W) integer classes ≥ 0. `limit` keeps the first N.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from potstill.data.shapes import ShapesConfig, make_shapes, shifted
from potstill.errors import UserError

__all__ = ["SHAPES_DEFAULT_SIZES", "SHAPES_SEED_OFFSETS", "SegmentationSet", "load_segmentation_source"]

SHAPES_SEED_OFFSETS = {"train": 0, "test": 1_000, "shifted": 2_000}
SHAPES_DEFAULT_SIZES = {"train": 800, "test": 300, "shifted": 300}


@dataclass(frozen=True)
class SegmentationSet:
    """float32 images (N, C, H, W) and int64 masks (N, H, W)."""

    images: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_segmentation_source(path: str, *, split: str, limit: int | None, shapes: ShapesConfig, seed: int,
                             where: str) -> SegmentationSet:
    """The pairs of one recipe source; `where` (e.g. "data.eval") names it in a one-line error."""
    if path == "builtin:shapes":
        if split not in SHAPES_SEED_OFFSETS:
            raise UserError(f"{where}.split: builtin:shapes has splits {', '.join(SHAPES_SEED_OFFSETS)}, got {split!r}")
        config = shifted(shapes) if split == "shifted" else shapes
        images, masks = make_shapes(limit or SHAPES_DEFAULT_SIZES[split], seed + SHAPES_SEED_OFFSETS[split], config)
        return SegmentationSet(images, masks)
    if path.startswith("builtin:"):
        raise UserError(f"{where}.path: unknown builtin {path!r}; the segmentation task has builtin:shapes")
    file = Path(path)
    if file.suffix != ".npz":
        raise UserError(f"{where}.path: expected builtin:shapes or an .npz file of images and masks, got {path}")
    if not file.is_file():
        raise UserError(f"{where}.path: file not found: {path}")
    try:
        arrays = np.load(file, allow_pickle=False)
        names = list(arrays.files)
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}.path: {path} is not a readable .npz file ({exc})") from None
    image_key = next((k for k in ("x", "images") if k in names), None)
    mask_key = next((k for k in ("y", "masks") if k in names), None)
    if image_key is None or mask_key is None:
        raise UserError(f"{where}.path: {path} needs arrays x (or images) and y (or masks); it has "
                        f"{', '.join(names) or 'none'}")
    return _pairs(arrays[image_key][:limit], arrays[mask_key][:limit], f"{where}.path ({path})")


def _pairs(images: np.ndarray, masks: np.ndarray, where: str) -> SegmentationSet:
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise UserError(f"{where}: images of shape {images.shape}; expected (N, H, W) or (N, C, H, W)")
    if masks.ndim != 3 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise UserError(f"{where}: masks of shape {masks.shape}; expected (N, H, W) = "
                        f"{(images.shape[0], *images.shape[2:])} to match the images")
    if not np.issubdtype(masks.dtype, np.integer) or (masks.size and int(masks.min()) < 0):
        raise UserError(f"{where}: masks must hold integer classes ≥ 0 (got dtype {masks.dtype})")
    if images.shape[0] == 0:
        raise UserError(f"{where}: no images")
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    pixels = pixels.float() / 255.0 if images.dtype == np.uint8 else pixels.float()
    return SegmentationSet(pixels, torch.from_numpy(np.ascontiguousarray(masks)).long())
