"""Style-attribute captions for digit images: a caption set rich enough that image–text retrieval is not trivial.

The built-in digit captions ("a photo of the digit seven.") name only the class, so any image of a seven
matches every seven caption and retrieval reduces to 10-way classification. Here every image also gets two
style attributes measured from its pixels, and each caption names the digit and both attributes:

- **stroke weight** ("thin", "medium", "bold"): the ink mass Σ pixel / 255;
- **slant** ("leaning left", "upright", "leaning right"): the shear μ₁₁ / μ₀₂ of the ink's second moments
  (x to the right, y downward: a negative shear means the top of the digit sits to the right, "leaning right").

Each attribute is cut into three bins at the tertiles of the training images of the same digit (`fit_style_bins`),
so the bins are balanced per digit and a "bold one" is bold for a one. An image's style class is
`digit · 9 + weight · 3 + slant` (90 classes), named by a phrase such as "bold seven leaning right"
(`style_class_names`); `style_captions` fills every name into each of `STYLE_TEMPLATES` ("a handwritten {}.",
3 templates → 270 captions, the layout of `task: vision_language`'s class captions), and `style_relevance`
marks image i relevant to caption j when their style classes are equal. Out-of-domain copies (e.g.
`potstill.data.vision_language.rotate_images`) are labelled with the same bins measured on their own pixels: the
captions describe what the image shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from potstill.data.image_transforms import to_unit
from potstill.data.vision_language import DIGIT_NAMES, class_captions

WEIGHT_WORDS = ("thin", "medium", "bold")
SLANT_WORDS = ("leaning left", "upright", "leaning right")
STYLE_TEMPLATES = ("a handwritten {}.", "a photo of a {}.", "an image of a {}, drawn by hand.")
STYLES_PER_DIGIT = len(WEIGHT_WORDS) * len(SLANT_WORDS)


def _unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) or (N, 1, H, W) images, uint8 or float → (N, H, W) float in [0, 1]."""
    x = to_unit(images)
    return x.reshape(x.shape[0], x.shape[-2], x.shape[-1])


def ink_mass(images: torch.Tensor) -> torch.Tensor:
    """Σ pixels of each image in [0, 1] units (N,)."""
    return _unit_pixels(images).sum(dim=(1, 2))


def slant(images: torch.Tensor) -> torch.Tensor:
    """The shear μ₁₁ / μ₀₂ of each image's ink (N,): x to the right, y downward; negative = leaning right."""
    x = _unit_pixels(images)
    n, h, w = x.shape
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    mass = x.sum(dim=(1, 2)).clamp_min(1e-6)
    my = (x * ys).sum(dim=(1, 2)) / mass
    mx = (x * xs).sum(dim=(1, 2)) / mass
    dy, dx = ys - my.view(n, 1, 1), xs - mx.view(n, 1, 1)
    mu11 = (x * dx * dy).sum(dim=(1, 2)) / mass
    mu02 = (x * dy * dy).sum(dim=(1, 2)) / mass
    return mu11 / mu02.clamp_min(1e-6)


@dataclass(frozen=True)
class StyleBins:
    """Per-digit tertile cut points: `weight[d]` and `slant[d]` are (2,) tensors (lower, upper)."""

    weight: torch.Tensor  # (10, 2)
    slant: torch.Tensor  # (10, 2)


def fit_style_bins(images: torch.Tensor, digits: torch.Tensor) -> StyleBins:
    """The tertiles of ink mass and slant among the `images` of each digit (every digit needs ≥ 3 images)."""
    mass, shear = ink_mass(images), slant(images)
    q = torch.tensor([1 / 3, 2 / 3])
    weight_cuts, slant_cuts = [], []
    for d in range(len(DIGIT_NAMES)):
        rows = digits == d
        if int(rows.sum()) < 3:
            raise ValueError(f"fit_style_bins: digit {d} has {int(rows.sum())} images; need at least 3")
        weight_cuts.append(torch.quantile(mass[rows], q))
        slant_cuts.append(torch.quantile(shear[rows], q))
    return StyleBins(torch.stack(weight_cuts), torch.stack(slant_cuts))


def style_classes(images: torch.Tensor, digits: torch.Tensor, bins: StyleBins) -> torch.Tensor:
    """Each image's style class digit·9 + weight·3 + slant (N,), the bins measured on its own pixels."""
    digits = digits.long()
    weight = (ink_mass(images).unsqueeze(1) > bins.weight[digits]).sum(1)
    # slant bins run left → right; a larger shear is further left, so the bin index counts down
    lean = 2 - (slant(images).unsqueeze(1) > bins.slant[digits]).sum(1)
    return digits * STYLES_PER_DIGIT + weight * len(SLANT_WORDS) + lean


def style_class_words(style_class: int) -> tuple[str, str, str]:
    """(digit name, weight word, slant words) of one style class."""
    digit, rest = divmod(int(style_class), STYLES_PER_DIGIT)
    weight, lean = divmod(rest, len(SLANT_WORDS))
    return DIGIT_NAMES[digit], WEIGHT_WORDS[weight], SLANT_WORDS[lean]


def style_class_names() -> list[str]:
    """The 90 style classes as phrases, "thin zero leaning left", ..., "bold nine leaning right" (the class names
    of a `task: vision_language` recipe)."""
    names = []
    for c in range(len(DIGIT_NAMES) * STYLES_PER_DIGIT):
        digit, weight, lean = style_class_words(c)
        names.append(f"{weight} {digit} {lean}")
    return names


def style_captions(templates: tuple[str, ...] = STYLE_TEMPLATES) -> tuple[list[str], torch.Tensor]:
    """Every caption (class-major: the templates of class 0, then class 1, ...) and each caption's style class."""
    captions = [c for per_class in class_captions(style_class_names(), list(templates)) for c in per_class]
    return captions, torch.arange(len(DIGIT_NAMES) * STYLES_PER_DIGIT).repeat_interleave(len(templates))


def style_relevance(image_classes: torch.Tensor, caption_classes: torch.Tensor) -> torch.Tensor:
    """(N, M) bool: image i matches caption j when their style classes are equal."""
    return image_classes.view(-1, 1) == caption_classes.view(1, -1)


__all__ = ["SLANT_WORDS", "STYLE_TEMPLATES", "WEIGHT_WORDS", "StyleBins", "fit_style_bins", "ink_mass", "slant",
           "style_captions", "style_class_names", "style_class_words", "style_classes", "style_relevance"]
