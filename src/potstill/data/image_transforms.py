"""Tensor transforms for image batches (N, C, H, W): scaling, resizing, channel repeat, augmentation, normalising.

torchvision cannot be installed beside every torch build (its compiled operators must match), so potstill has
its own small set, written on plain torch:
- `to_unit`: uint8 pixels / 255 (float images unchanged);
- `resize`: bilinear with antialiasing (`torch.nn.functional.interpolate`); when `torchvision.transforms.v2`
  imports, its `Resize` (same interpolation, antialiased) is used instead, so results match torchvision users';
- `random_crop`: zero-pad by `padding` pixels, crop back to the size at an offset drawn per image;
- `horizontal_flip`: flip each image left-right with probability 0.5;
- `mixup`: each image blended with a partner of the same batch, λ·x + (1 − λ)·x_partner, λ ~ Beta(α, α) per
  image (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization");
- `normalize`: (x − mean) / std per channel.
The random ones take an explicit `torch.Generator`, so the task draws them from (seed, micro-batch, process) and
a resumed run augments the same way (torchvision's random transforms draw from the global generator).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Float pixels: uint8 divided by 255, float images as they are."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


@functools.lru_cache(maxsize=1)
def _torchvision_resize() -> object | None:
    try:
        from torchvision.transforms import v2  # type: ignore[import-not-found]
    except Exception:  # not installed, or its compiled operators do not fit this torch
        return None
    return v2


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square `size` × `size` images (bilinear, antialiased); unchanged when already that size."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    v2 = _torchvision_resize()
    if v2 is not None:
        return v2.Resize((size, size), antialias=True)(images)  # type: ignore[attr-defined]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def repeat_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """A one-channel batch repeated to `channels` channels (other counts must already match)."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] != 1:
        raise ValueError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
    return images.expand(-1, channels, -1, -1).contiguous()


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad with zeros by `padding` on every side, then crop each image back to its size at a random offset."""
    if padding <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).to(images.device)
    rows = (offsets[:, 0:1] + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    picked_rows = torch.gather(padded, 2, rows.expand(n, c, h, w + 2 * padding))
    return torch.gather(picked_rows, 3, cols.expand(n, c, h, w))


def horizontal_flip(images: torch.Tensor, generator: torch.Generator, probability: float = 0.5) -> torch.Tensor:
    """Each image flipped left-right with `probability`."""
    flip = torch.rand(images.shape[0], generator=generator) < probability
    return torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)


def mixup(images: torch.Tensor, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """(mixed images, partner index (N,), λ (N,)): image i becomes λ_i·x_i + (1 − λ_i)·x_partner(i), the partners a
    random permutation of the batch and λ_i ~ Beta(α, α), all drawn from `generator`."""
    if alpha <= 0:
        raise ValueError(f"mixup needs alpha > 0, got {alpha}")
    n = images.shape[0]
    partner = torch.randperm(n, generator=generator)
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    lam = torch.as_tensor(rng.beta(alpha, alpha, size=n), dtype=torch.float32)
    weight = lam.to(images.device, images.dtype).view(-1, *([1] * (images.dim() - 1)))
    mixed = weight * images + (1 - weight) * images[partner.to(images.device)]
    return mixed, partner, lam


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x − mean) / std per channel (one value each is broadcast to every channel)."""
    m = torch.tensor(list(mean), dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s
