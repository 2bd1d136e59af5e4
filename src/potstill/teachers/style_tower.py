"""An image tower for digit *style* captions: the MNIST CNN's class features plus its pooled convolution maps.

The LiT teacher's default tower (`potstill.teachers.lit.mnist_cnn_features`) is the ccexam MNIST CNN's 128-d
penultimate layer, trained to tell digits apart and so largely blind to stroke weight and slant; a LiT head on
it reaches 50 % image→text R@1 on the 270 style captions of `potstill.data.digit_styles`. This tower appends
the CNN's last convolution maps (64 × 7 × 7) average-pooled to `pool` × `pool`, which keep where and how much
ink there is: 128 + 64·pool² features (704 at pool 3; 71 % R@1 with the same head). Locked, [0, 1] pixels in.
"""

from __future__ import annotations

import torch
from torch import nn


class CNNStyleFeatures(nn.Module):
    """[penultimate features, pooled last conv maps] of ccexam's MNISTNet for (N, 1, 28, 28) pixels in [0, 1]."""

    def __init__(self, pool: int = 3) -> None:
        super().__init__()
        from potstill.assets_image import mnist_cnn

        self.net, self.pool = mnist_cnn(), int(pool)
        self.eval()

    @property
    def feature_dim(self) -> int:
        return 128 + 64 * self.pool**2

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        net = self.net.model
        maps = net.features((pixels - self.net.mean) / self.net.std)
        penultimate = net.classifier[1](net.classifier[0](maps.flatten(1)))
        pooled = nn.functional.adaptive_avg_pool2d(maps, self.pool).flatten(1)
        return torch.cat([penultimate, pooled], dim=1)


def mnist_cnn_style_features(pool: int = 3) -> CNNStyleFeatures:
    """The locked style tower (the `image_tower` of a LiT teacher: `potstill.teachers.style_tower:...`)."""
    return CNNStyleFeatures(pool).eval()


__all__ = ["CNNStyleFeatures", "mnist_cnn_style_features"]
