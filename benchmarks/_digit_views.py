"""Pieces shared by the digit benchmarks of issue #20 (`promptkd.py`, `vl2v_adip.py`): a student's view of 28×28
digits, batched inference without gradients, and the small Adam loop both train their students with."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def centre_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """28×28 images (uint8 or [0, 1]) → the centre 20×20 crop, area-resized to size×size."""
    from potstill.data.image_transforms import to_unit

    return torch.nn.functional.interpolate(to_unit(images)[..., 4:24, 4:24], size=(size, size), mode="area")


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = 500) -> torch.Tensor:
    """`fn` over `x` in chunks of `size` rows, without gradients, as float32."""
    with torch.no_grad():
        return torch.cat([fn(x[i:i + size]).float() for i in range(0, len(x), size)])


def train_rows(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               pixels: torch.Tensor, *, epochs: int, seed: int, batch: int, lr: float, cosine: bool = False,
               after_step: Callable[[int, int], object] | None = None) -> float:
    """Adam on the trainable parameters over seeded shuffles of `pixels`; `loss_fn(model outputs, row indices)`;
    with `cosine`, the rate decays to 0 over all steps; `after_step(step, steps)` runs after each optimizer step
    (1-based). Returns the last batch's loss; leaves `model` in eval mode."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = epochs * math.ceil(len(pixels) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))) \
        if cosine else None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss, done = torch.tensor(0.0), 0
    for _ in range(epochs):
        order = torch.randperm(len(pixels), generator=generator)
        for start in range(0, len(pixels), batch):
            rows = order[start:start + batch]
            loss = loss_fn(model(pixels[rows]), rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            done += 1
            if after_step is not None:
                after_step(done, steps)
    model.eval()
    return float(loss.detach())
