"""A small image–text scorer: the student of DCD (`potstill.losses.dcd`) on digit images and captions.

The student is a **dual encoder** whose score is the scaled cosine s(x, c) = scale · ⟨ℓ2n(f(x)), ℓ2n(g(e_c))⟩:
- f: a small CNN on the raw 28×28 pixels (`potstill.students.cnn.small_cnn` blocks → ReLU → a linear map to
  `embed_dim`), trained from scratch;
- g: a linear map of a caption's text embedding e_c (the teacher's locked MiniLM tower, computed once),
  initialised to the identity, trained.

Why a dual encoder and not the paper's cross-encoder (ViLT / METER fusion): DCD's loss needs only one score per
(image, text) pair, which both give, and retrieval then scores every image against every caption with one
matrix product, where a cross-encoder would run once per pair. The image half alone (`forward(pixels)` →
vectors in the text space) is also the student kind `task: vision_language` takes, so the same module serves a
recipe there. `scale` is fixed (the teacher's 1/τ), so DCD's score regression compares like with like.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from potstill.students.cnn import small_cnn


class ImageTextScorer(nn.Module):
    """Dual-encoder scorer: `encode_images(pixels)`, `encode_texts(text_embeddings)` (unit vectors) and
    `score(pixels, text_embeddings, candidates)` → (B, L) scaled cosines of each image with its L candidates."""

    def __init__(self, image_tower: nn.Module, text_map: nn.Module, *, scale: float) -> None:
        super().__init__()
        self.image_tower, self.text_map, self.scale = image_tower, text_map, float(scale)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.image_tower(pixels)

    def encode_images(self, pixels: Tensor) -> Tensor:
        return nn.functional.normalize(self.image_tower(pixels).float(), dim=-1)

    def encode_texts(self, text_embeddings: Tensor) -> Tensor:
        return nn.functional.normalize(self.text_map(text_embeddings.float()), dim=-1)

    def score(self, pixels: Tensor, text_embeddings: Tensor, candidates: Tensor) -> Tensor:
        """(B, L) scores of image b with texts `candidates[b]` (indices into the (M, D_text) `text_embeddings`)."""
        images = self.encode_images(pixels)  # (B, D)
        texts = self.encode_texts(text_embeddings)[candidates]  # (B, L, D)
        return self.scale * torch.einsum("bd,bld->bl", images, texts)

    def score_all(self, pixels: Tensor, text_embeddings: Tensor) -> Tensor:
        """(N, M) scores of every image with every text."""
        return self.scale * self.encode_images(pixels) @ self.encode_texts(text_embeddings).T


def image_text_scorer(embed_dim: int = 384, text_dim: int = 384, width: int = 16, hidden: int = 256,
                      scale: float = 20.0, image_size: int = 28, seed: int = 0) -> ImageTextScorer:
    """The DCD student: a 2-block `small_cnn` (`width` channels) → ReLU → Linear(hidden → embed_dim) image tower,
    and an identity-initialised Linear(text_dim → embed_dim) on the text embeddings; weights drawn from `seed`
    (the global generator is left as it was)."""
    if text_dim != embed_dim:
        raise ValueError(f"image_text_scorer: the text map starts as the identity, so text_dim ({text_dim}) must "
                         f"equal embed_dim ({embed_dim})")
    if scale <= 0:
        raise ValueError(f"image_text_scorer: scale must be > 0, got {scale}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    tower = nn.Sequential(small_cnn(width, 2, num_classes=hidden, image_size=image_size, seed=seed), nn.ReLU(),
                          nn.Linear(hidden, embed_dim))
    text_map = nn.Linear(text_dim, embed_dim, bias=False)
    nn.init.eye_(text_map.weight)
    torch.random.set_rng_state(state)
    return ImageTextScorer(tower, text_map, scale=scale)


__all__ = ["ImageTextScorer", "image_text_scorer"]
