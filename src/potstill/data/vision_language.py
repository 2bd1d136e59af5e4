"""Class names, caption templates and a digit style shift for `task: vision_language`.

- `class_captions(names, templates)`: every class's captions, e.g. "a photo of the digit seven"; a teacher's
  text tower embeds them and `potstill.eval.zero_shot.prompt_ensemble` averages them into one class feature.
- `CLASS_DESCRIPTIONS`: attribute descriptions of each built-in class (3 per class, written for this project),
  the enriched label text of the large-VLM OOD paper (`class_descriptions`; with descriptions,
  `class_captions` pairs every template with every description).
- `BUILTIN_CLASS_NAMES`: the class names of the built-in image sets (`builtin:digits` for MNIST, `builtin:fashion`
  for Fashion-MNIST) and their default templates.
- `rotate_images`: the out-of-distribution digit style used by the PromptKD benchmark (each image rotated by a
  fixed angle, alternating sign), on tensors, no torchvision; `thicken_images`: bolder strokes (grey dilation).
"""

from __future__ import annotations

import math

import torch

from potstill.data.image_transforms import to_unit
from potstill.errors import UserError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")
DIGIT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "an image of the number {}.",
                   "a black and white photo of the digit {}.")
FASHION_TEMPLATES = ("a photo of a {}.", "a grey photo of a {}, a piece of clothing.", "an image of a {}.",
                     "a low resolution photo of a {}.")
DIGIT_DESCRIPTIONS = (
    ("a closed oval loop with a hollow centre", "a round ring drawn in one stroke", "an egg shape with nothing inside"),
    ("a single straight vertical stroke", "a thin upright line", "one narrow slanted bar"),
    ("a curved hook on top above a flat base line", "an arc that turns into a diagonal and a bottom bar",
     "a swan-like curve ending in a horizontal stroke"),
    ("two stacked bumps open to the left", "two rounded curves joined in the middle",
     "a backwards letter E with round arms"),
    ("a vertical stroke crossed by a horizontal bar", "an open angle on top of a long down stroke",
     "a small triangle with a line through its base"),
    ("a flat top bar over a round belly", "a short vertical stroke then a hook curving left at the bottom",
     "a cap line with a curve like a backwards C below it"),
    ("a closed loop at the bottom with a tail rising to the top", "a curved stroke falling into a small circle",
     "a round base with a stem leaning up and left"),
    ("a horizontal top bar with a long diagonal stroke down", "a flat line on top and a slanted line below",
     "a sharp angle at the top right"),
    ("two loops stacked one above the other", "a shape like a snowman or an hourglass",
     "two circles touching in the middle"),
    ("a closed loop on top with a straight tail below", "a round head with a stem down the right side",
     "a small circle above a long down stroke"),
)
FASHION_DESCRIPTIONS = (
    ("a short-sleeved top with a round neck", "a simple casual shirt with no collar", "a light top for summer"),
    ("long pants with two straight legs", "a pair of trousers seen from the front", "two long parallel legs"),
    ("a long-sleeved knitted sweater", "a warm jumper with a round neck", "a thick top with long sleeves"),
    ("a one-piece garment with a skirt", "a long dress narrowing at the waist", "a sleeveless dress"),
    ("a long-sleeved outer jacket that opens at the front", "a heavy coat with a collar and buttons",
     "a warm winter jacket"),
    ("an open shoe made of thin straps", "a light summer shoe with gaps", "a flat sandal with a sole and straps"),
    ("a long-sleeved button-up shirt with a collar", "a formal shirt with a row of buttons",
     "a blouse with a collar"),
    ("a low sports shoe with laces", "a trainer for running", "a canvas shoe with a rubber sole"),
    ("a handbag with a handle or strap", "a rectangular bag for carrying things", "a purse or a tote"),
    ("a short boot reaching the ankle", "a leather boot with a heel", "a high shoe covering the ankle"),
)
CLASS_DESCRIPTIONS = {"digits": DIGIT_DESCRIPTIONS, "fashion": FASHION_DESCRIPTIONS}
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


def class_descriptions(spec: list[list[str]] | str | None, classes: int, *,
                       field: str = "vision_language.descriptions") -> list[list[str]] | None:
    """The descriptions of each class (builtin:digits / builtin:fashion, or one list per class), checked: one list
    per class, all of the same non-zero length (prompt ensembling averages equally many captions)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        key = spec.removeprefix("builtin:")
        if not spec.startswith("builtin:") or key not in CLASS_DESCRIPTIONS:
            raise UserError(f"field {field}: expected a list per class or one of "
                            f"{', '.join('builtin:' + k for k in CLASS_DESCRIPTIONS)}, got {spec!r}")
        spec = [list(d) for d in CLASS_DESCRIPTIONS[key]]
    counts = {len(d) for d in spec}
    if len(spec) != classes or len(counts) != 1 or 0 in counts:
        raise UserError(f"field {field}: expected {classes} lists (one per class name), each with the same number "
                        f"(≥ 1) of descriptions; got {len(spec)} lists of lengths {sorted(counts)}")
    return [list(d) for d in spec]


def class_captions(names: list[str], templates: list[str],
                   descriptions: list[list[str]] | None = None) -> list[list[str]]:
    """captions[c][k] = templates[k] filled with names[c]; with descriptions, every template with every
    description of class c: "a photo of the digit seven, a flat line on top and a slanted line below."."""
    filled = [[template.format(name) for template in templates] for name in names]
    if descriptions is None:
        return filled
    return [[f"{caption.rstrip('.')}, {text}." for caption in captions for text in descriptions[c]]
            for c, captions in enumerate(filled)]


def turn_and_zoom(images: torch.Tensor, radians: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Image i rotated about its centre by `radians[i]` and zoomed out to `scales[i]` of its size (bilinear, zero
    border; scale 1 keeps the size); uint8 in: scaled to [0, 1] first; float out."""
    x = to_unit(images)
    zoom = 1 / scales.float()
    cos, sin = radians.float().cos() * zoom, radians.float().sin() * zoom
    theta = torch.zeros(x.shape[0], 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate_images(images: torch.Tensor, degrees: float = 35.0) -> torch.Tensor:
    """Each (C, H, W) image rotated about its centre by +degrees (even rows) or −degrees (odd rows), bilinear,
    zero fill; float pixels in, float out (uint8 in: scaled to [0, 1] first)."""
    angle = torch.full((images.shape[0],), math.radians(degrees))
    angle[1::2] *= -1
    return turn_and_zoom(images, angle, torch.ones_like(angle))


def shrink_images(images: torch.Tensor, scale: float = 0.6) -> torch.Tensor:
    """Each image zoomed out about its centre to `scale` of its size (bilinear, zero border: the object seen from
    farther away); uint8 in: scaled to [0, 1] first; float out."""
    if not 0 < scale <= 1:
        raise ValueError(f"shrink_images: scale must be in (0, 1], got {scale}")
    n = images.shape[0]
    return turn_and_zoom(images, torch.zeros(n), torch.full((n,), float(scale)))


def thicken_images(images: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Bolder strokes: each pixel the maximum of its size × size neighbourhood (grey dilation, odd `size`);
    uint8 in: scaled to [0, 1] first; float out."""
    x = to_unit(images)
    return torch.nn.functional.max_pool2d(x, size, stride=1, padding=size // 2)
