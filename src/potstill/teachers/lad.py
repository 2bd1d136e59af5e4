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
`forward(images, labels)` one-hot encodes the given (noised) mask and concatenates it to the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.errors import UserError

__all__ = ["LabelAssistedTeacher", "SegmentationNet", "segmentation_net"]


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
