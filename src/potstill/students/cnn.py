"""Small convolutional image classifiers, the `student.factory` of the image_classification task.

`small_cnn(width, depth)`: `depth` blocks of 3×3 convolution (padding 1) → ReLU → 2×2 max-pool, the channels
`width`, 2·`width`, 4·`width`, ...; then the feature map flattened into one linear layer to the classes. The
weights are drawn from `seed` (the global generator is left as it was), so a recipe builds the same student
every time. At width 8, depth 2 on 28×28 digits: about 9.1 k parameters, ~14× fewer multiply-adds than ccexam's
MNISTNet (potstill.assets_image.mnist_cnn).

`small_cnn_features(weights, ...)`: the same network with trained weights read from a state-dict file and its
last Linear dropped, i.e. the flattened feature map; the image tower of a LiT teacher built on a CNN trained
here (`benchmarks/vl2v_adip.py --dataset fashion`).
"""

from __future__ import annotations

import torch
from torch import nn

from potstill.errors import UserError


def small_cnn(width: int = 8, depth: int = 2, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
              seed: int = 0) -> nn.Module:
    """A `depth`-block CNN for `in_channels` × `image_size` × `image_size` images → `num_classes` logits."""
    if width < 1 or depth < 1 or image_size >> depth < 1:
        raise ValueError(f"small_cnn: width and depth must be ≥ 1 and image_size ({image_size}) ≥ 2**depth "
                         f"({2 ** depth}); got width {width}, depth {depth}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = in_channels
    for block in range(depth):
        out = width * 2 ** block
        layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = out
    side = image_size >> depth
    layers += [nn.Flatten(), nn.Linear(channels * side * side, num_classes)]
    model = nn.Sequential(*layers)
    torch.random.set_rng_state(state)
    return model


def small_cnn_features(weights: str, width: int = 8, depth: int = 2, in_channels: int = 1, num_classes: int = 10,
                       image_size: int = 28) -> nn.Module:
    """`small_cnn` with the state dict in `weights` loaded, its last Linear dropped: (N, C, H, W) → the flattened
    feature map (N, width·2^(depth−1)·(image_size >> depth)²), in eval mode."""
    model = small_cnn(width, depth, in_channels, num_classes, image_size)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"small_cnn_features: no weights file {weights}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"small_cnn_features: {weights} does not fit small_cnn(width={width}, depth={depth}, "
                        f"image_size={image_size}): {str(err).splitlines()[0]}") from None
    return nn.Sequential(*list(model)[:-1]).eval()
