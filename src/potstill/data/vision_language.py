"""Class names, caption templates and a digit style shift for `task: vision_language`.

- `class_captions(names, templates)`: every class's captions, e.g. "a photo of the digit seven"; a teacher's
  text tower embeds them and `potstill.eval.zero_shot.prompt_ensemble` averages them into one class feature.
- `BUILTIN_CLASS_NAMES`: the class names of the built-in image sets (`builtin:digits` for MNIST, `builtin:fashion`
  for Fashion-MNIST) and their default templates.
- `rotate_images`: the out-of-distribution digit style used by the PromptKD benchmark (each image rotated by a
  fixed angle, alternating sign), on tensors, no torchvision.
"""

from __future__ import annotations

import math

import torch

from potstill.errors import UserError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")
DIGIT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "an image of the number {}.",
                   "a black and white photo of the digit {}.")
FASHION_TEMPLATES = ("a photo of a {}.", "a grey photo of a {}, a piece of clothing.", "an image of a {}.",
                     "a low resolution photo of a {}.")
BUILTIN_CLASS_NAMES = {"digits": (DIGIT_NAMES, DIGIT_TEMPLATES), "fashion": (FASHION_NAMES, FASHION_TEMPLATES)}


def class_names_and_templates(names: list[str] | str, templates: list[str] | None, *,
                              field: str = "vision_language.class_names") -> tuple[list[str], list[str]]:
    """The class names (a list, or builtin:digits / builtin:fashion) and the templates (given, else the builtin's
    defaults, else "a photo of a {}."), checked: every template has one `{}`."""
    if isinstance(names, str):
        key = names.removeprefix("builtin:")
        if not names.startswith("builtin:") or key not in BUILTIN_CLASS_NAMES:
            raise UserError(f"field {field}: expected a list of class names or one of "
                            f"{', '.join('builtin:' + k for k in BUILTIN_CLASS_NAMES)}, got {names!r}")
        builtin_names, builtin_templates = BUILTIN_CLASS_NAMES[key]
        names, templates = list(builtin_names), list(templates or builtin_templates)
    if not names:
        raise UserError(f"field {field}: no class names")
    templates = list(templates or ["a photo of a {}."])
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise UserError(f"field vision_language.templates: each template needs exactly one {{}} for the class "
                        f"name, got {bad[0]!r}")
    return list(names), templates


def class_captions(names: list[str], templates: list[str]) -> list[list[str]]:
    """captions[c][k] = templates[k] filled with names[c]."""
    return [[template.format(name) for template in templates] for name in names]


def rotate_images(images: torch.Tensor, degrees: float = 35.0) -> torch.Tensor:
    """Each (C, H, W) image rotated about its centre by +degrees (even rows) or −degrees (odd rows), bilinear,
    zero fill; float pixels in, float out (uint8 in: scaled to [0, 1] first)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    n = x.shape[0]
    angle = torch.full((n,), math.radians(degrees))
    angle[1::2] *= -1
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
