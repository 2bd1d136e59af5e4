"""Teacher-mined hard negatives for image–text distillation (DCD's candidate lists).

DCD (Rao et al. 2023, see `potstill.losses.dcd`) gives each training image its positive text plus N texts
drawn at random; the teacher scores all of them and only the K it scores highest go to the student with the
positive, so the student spends its capacity on the negatives the teacher finds confusable. The paper's code
draws N = 15 (or 63) random texts and keeps K = 7.

Here the teacher's scores of every (image, text) pair are one (images, texts) matrix, computed once (a dual
encoder gives it as a matrix product; a cross-encoder teacher scores the pairs block by block), and
`relevant[i, j]` marks the texts that describe image i (never drawn as its negatives):
- `sample_positives`: one relevant text per image, uniformly among its relevant texts;
- `mine_hard_negatives`: N random non-relevant texts per image, the K best by teacher score, best first;
- `random_negatives`: K random non-relevant texts per image (the baseline without the teacher);
- `candidate_lists`: [positive, negatives] index rows, the layout `potstill.losses.dcd.dcd_loss` expects.
Every draw takes a `torch.Generator`, so a seeded run draws the same lists.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(relevant: Tensor, count: int, what: str) -> None:
    if relevant.dim() != 2 or relevant.dtype != torch.bool:
        raise ValueError(f"relevant must be a bool (images, texts) matrix, got {relevant.dtype} "
                         f"{tuple(relevant.shape)}")
    if count < 1:
        raise ValueError(f"{what} must be ≥ 1, got {count}")
    fewest = int((~relevant).sum(dim=1).min()) if relevant.shape[0] else count
    if fewest < count:
        raise ValueError(f"{what} is {count}, but an image has only {fewest} non-relevant texts")


def _random_non_relevant(relevant: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """(images, count) distinct random non-relevant text indices per image."""
    keys = torch.rand(relevant.shape, generator=generator).to(relevant.device)
    return keys.masked_fill(relevant, -1.0).topk(count, dim=1).indices


def sample_positives(relevant: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """(images,) one relevant text index per image, uniformly among its relevant texts."""
    if relevant.dim() != 2 or relevant.dtype != torch.bool or not bool(relevant.any(dim=1).all()):
        raise ValueError("relevant must be a bool (images, texts) matrix with at least one relevant text per image")
    keys = torch.rand(relevant.shape, generator=generator).to(relevant.device)
    return keys.masked_fill(~relevant, -1.0).argmax(dim=1)


def random_negatives(relevant: Tensor, *, keep: int = 7, generator: torch.Generator | None = None) -> Tensor:
    """(images, keep) random non-relevant text indices per image, without repeats."""
    _check(relevant, keep, "keep")
    return _random_non_relevant(relevant, keep, generator)


def mine_hard_negatives(teacher_scores: Tensor, relevant: Tensor, *, candidates: int = 15, keep: int = 7,
                        generator: torch.Generator | None = None) -> Tensor:
    """(images, keep) text indices: of `candidates` random non-relevant texts per image, the `keep` with the
    highest `teacher_scores` (images, texts), in descending teacher score."""
    if teacher_scores.shape != relevant.shape:
        raise ValueError(f"teacher_scores {tuple(teacher_scores.shape)} and relevant {tuple(relevant.shape)} "
                         f"must have the same (images, texts) shape")
    _check(relevant, candidates, "candidates")
    if not 1 <= keep <= candidates:
        raise ValueError(f"keep must be in [1, candidates = {candidates}], got {keep}")
    drawn = _random_non_relevant(relevant, candidates, generator)
    best = teacher_scores.gather(1, drawn.to(teacher_scores.device)).topk(keep, dim=1).indices
    return drawn.gather(1, best.to(drawn.device))


def candidate_lists(positives: Tensor, negatives: Tensor) -> Tensor:
    """(images, 1 + K) text indices: each image's positive, then its negatives."""
    if positives.dim() != 1 or negatives.dim() != 2 or negatives.shape[0] != positives.shape[0]:
        raise ValueError(f"expected positives (B,) and negatives (B, K), got {tuple(positives.shape)} and "
                         f"{tuple(negatives.shape)}")
    return torch.cat([positives.view(-1, 1), negatives], dim=1)


__all__ = ["candidate_lists", "mine_hard_negatives", "random_negatives", "sample_positives"]
