"""PRD's continual-learning loop: train task after task with no replay, and its baselines in the same loop.

Paper: Asadi et al., "Prototype-Sample Relation Distillation: Towards Replay-Free Continual Learning" (ICML 2023);
the losses and their formulas are in `potstill.losses.prd`.

One `ContinualNet` (a backbone giving features h, a projection head for SupCon, a linear classifier over all
classes for the logit baselines, and one prototype per class in feature space) is trained on a
class-incremental stream (`potstill.data.task_stream`): each task brings new classes, and only its own rows are
seen. After task t a frozen copy of the model (features and prototypes) becomes the "old" model of task t + 1.
Methods (`StreamConfig.method`), all on the same backbone, batches and optimizer:

- `finetune`: cross-entropy over the logits of the classes seen so far; nothing protects the old classes.
- `lwf`: Learning without Forgetting (Li & Hoiem 2016): fine-tuning plus λ·T²·KL(old ‖ new) between the old
  model's and the current model's softened logits of the old classes, on the current task's images (T = 2).
- `prd`: `L_SupCon(z) + λ_p·L_p(h) + λ_d·L_PRD(h, h_old)` on two augmented views of each image, the relation
  term over the prototypes of all classes seen before the task. Prediction: the nearest prototype (cosine)
  among the classes seen so far. `distill_weight = 0` is the ablation without relation distillation.
The logit baselines predict the arg-max of the seen classes' logits.

Why not a stream of `Distiller` runs: PRD's objectives read the batch's labels (SupCon, L_p) and a learned
prototype matrix that is both trained and frozen at task boundaries, the previous model's prototypes are a
second teacher output, and prediction is nearest-prototype; the `Objective` contract passes neither labels nor
teacher state beyond one signal, and `image_classification` evaluates arg-max logits against a teacher with
the student's width. The loop below is kept to one step function and one task function; `train_stream` is the
one implementation behind both `benchmarks/prd_continual.py` and `task: continual` recipes
(`potstill.train.continual_run`, which logs through its `on_step` / `after_task` hooks and continues a stopped
stream from a task boundary with `done=`).

Defaults follow the paper where they carry over (SupCon τ 0.1, λ_p 2, λ_d 4, distillation τ 1, prototype
lr 0.01, batch 128); epochs per task and the backbone are small, for CPU runs. Prototypes start at scale 1e-3:
at lr 0.01 and a few hundred steps per task, unit-scale random prototypes barely move, while near zero the
cosine's gradient (∝ 1/‖p‖) turns them towards their class within the first steps.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from potstill.data.image_transforms import random_crop, to_unit
from potstill.data.task_stream import StreamTask
from potstill.losses import forward_kl
from potstill.losses.prd import RelationAxis, prd_relation_kl, prototype_loss, prototype_scores, supcon_loss
from potstill.students.cnn import small_cnn
from potstill.teachers.live import freeze

Method = Literal["finetune", "lwf", "prd"]
METHODS: tuple[Method, ...] = ("finetune", "lwf", "prd")
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
OnStep = Callable[[int, int, float], None]


class ContinualNet(nn.Module):
    """`backbone` (inputs → features h of width `feature_dim`) with a projection head, a classifier over
    `num_classes` and `num_classes` prototypes (rows of `prototypes`)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, projection_dim: int = 32,
                 seed: int = 0, prototype_scale: float = 1e-3) -> None:
        super().__init__()
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.backbone = backbone
        self.projection = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(),
                                        nn.Linear(feature_dim, projection_dim))
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.prototypes = nn.Parameter(prototype_scale * torch.randn(num_classes, feature_dim))
        torch.random.set_rng_state(state)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Features h."""
        return self.backbone(inputs)


def small_cnn_net(*, width: int = 16, depth: int = 2, features: int = 64, projection_dim: int = 32,
                  num_classes: int = 10, in_channels: int = 1, image_size: int = 28, seed: int = 0) -> ContinualNet:
    """The network of the PRD benchmark and of `task: continual` recipes: `small_cnn` giving `features` outputs,
    then a ReLU, as the backbone of a `ContinualNet`; the same seed builds the same network for every method."""
    backbone = nn.Sequential(small_cnn(width=width, depth=depth, in_channels=in_channels, num_classes=features,
                                       image_size=image_size, seed=seed), nn.ReLU())
    return ContinualNet(backbone, features, num_classes=num_classes, projection_dim=projection_dim, seed=seed)


def random_crop_augment(padding: int) -> Augment | None:
    """Training augmentation: pad by `padding` pixels and crop back at a seeded random offset; None when 0."""
    if padding == 0:
        return None
    return lambda images, generator: random_crop(images, padding, generator)


@dataclass(frozen=True)
class StreamConfig:
    """One method's settings (see the module docstring)."""

    method: Method = "prd"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    prototype_lr: float = 0.01
    supcon_temperature: float = 0.1
    prototype_weight: float = 2.0
    distill_weight: float = 4.0
    distill_temperature: float = 1.0
    distill_axis: RelationAxis = "samples"
    lwf_weight: float = 1.0
    lwf_temperature: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


@dataclass
class StreamResult:
    """`accuracy[t][j]`: accuracy on task j's test rows after training on task t (j ≤ t)."""

    accuracy: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def average_accuracy(self) -> float:
        """Mean accuracy over all tasks after the last one."""
        last = self.accuracy[-1]
        return sum(last) / len(last)

    @property
    def forgetting(self) -> float:
        """Mean over the tasks before the last of (best accuracy ever − final accuracy)."""
        if len(self.accuracy) < 2:
            return 0.0
        final = self.accuracy[-1]
        drops = [max(row[j] for row in self.accuracy[j:]) - final[j] for j in range(len(final) - 1)]
        return sum(drops) / len(drops)


def _step_loss(model: ContinualNet, old: ContinualNet | None, x: torch.Tensor, y: torch.Tensor,
               seen_before: list[int], seen: list[int], cfg: StreamConfig, augment: Augment | None,
               generator: torch.Generator) -> torch.Tensor:
    view = (lambda batch: augment(batch, generator)) if augment is not None else (lambda batch: batch)
    if cfg.method == "prd":
        views, labels = torch.cat([view(x), view(x)]), y.repeat(2)
        h = model(views)
        loss = supcon_loss(model.projection(h), labels, temperature=cfg.supcon_temperature)
        loss = loss + cfg.prototype_weight * prototype_loss(h, model.prototypes, labels)
        if old is not None and seen_before and cfg.distill_weight:
            with torch.no_grad():
                h_old = old(views)
            rows = torch.tensor(seen_before)
            reduction = "sum" if cfg.distill_axis == "samples" else "mean"
            loss = loss + cfg.distill_weight * prd_relation_kl(
                h, h_old, model.prototypes[rows], old.prototypes[rows], temperature=cfg.distill_temperature,
                axis=cfg.distill_axis, reduction=reduction)
        return loss
    inputs = view(x)
    columns = torch.tensor(seen)
    logits = model.classifier(model(inputs))[:, columns]
    position = {c: i for i, c in enumerate(seen)}
    loss = F.cross_entropy(logits, torch.tensor([position[int(c)] for c in y]))
    if cfg.method == "lwf" and old is not None and seen_before:
        with torch.no_grad():
            old_logits = old.classifier(old(inputs))[:, torch.tensor(seen_before)]
        loss = loss + cfg.lwf_weight * forward_kl(logits[:, :len(seen_before)], old_logits,
                                                  temperature=cfg.lwf_temperature, scale_t2=True)
    return loss


def train_task(model: ContinualNet, old: ContinualNet | None, task: StreamTask, seen_before: list[int],
               cfg: StreamConfig, augment: Augment | None = None, on_step: OnStep | None = None) -> None:
    """`cfg.epochs` passes over `task`'s training rows (seeded shuffles; a last batch of one row is dropped).
    `on_step(step, steps, loss)` is called after each optimizer step (step counted from 1 within the task)."""
    seen = [*seen_before, *task.classes]
    generator = torch.Generator().manual_seed(cfg.seed * 1_000 + task.index)
    prototype_ids = {id(model.prototypes)}
    network = [p for p in model.parameters() if id(p) not in prototype_ids]
    groups: list[dict[str, Any]] = [
        {"params": network},
        {"params": [model.prototypes], "lr": cfg.prototype_lr, "momentum": 0.0, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    inputs, labels = to_unit(task.train.images), task.train.labels
    steps, step = cfg.epochs * steps_per_epoch(len(labels), cfg.batch_size), 0
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            if len(rows) < 2:
                continue
            loss = _step_loss(model, old, inputs[rows], labels[rows], seen_before, seen, cfg, augment, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if on_step is not None:
                on_step(step, steps, float(loss.detach()))


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Optimizer steps of one pass over `rows` rows (a last batch of one row is dropped)."""
    full, rest = divmod(rows, batch_size)
    return full + (rest >= 2)


@torch.no_grad()
def predict(model: ContinualNet, inputs: torch.Tensor, seen: Sequence[int], method: Method,
            batch_size: int = 512) -> torch.Tensor:
    """Class ids among `seen`: nearest prototype (prd) or arg-max of the seen classes' logits (finetune, lwf)."""
    was_training = model.training
    model.eval()
    columns, out = torch.tensor(list(seen)), []
    for start in range(0, len(inputs), batch_size):
        h = model(to_unit(inputs[start:start + batch_size]))
        scores = prototype_scores(h, model.prototypes[columns]) if method == "prd" else model.classifier(h)[:, columns]
        out.append(columns[scores.argmax(-1)])
    model.train(was_training)
    return torch.cat(out)


def accuracy_on(model: ContinualNet, task: StreamTask, seen: Sequence[int], method: Method) -> float:
    """Accuracy on `task`'s test rows, predicting among all `seen` classes (class-incremental)."""
    return float((predict(model, task.test.images, seen, method) == task.test.labels).float().mean())


def frozen_copy(model: ContinualNet) -> ContinualNet:
    """The "old" model of the next task: a copy of `model` in eval mode, without gradients."""
    return freeze(copy.deepcopy(model))


def train_stream(model: ContinualNet, tasks: Sequence[StreamTask], cfg: StreamConfig,
                 augment: Augment | None = None, *, done: StreamResult | None = None,
                 on_step: Callable[[StreamTask, int, int, float], None] | None = None,
                 after_task: Callable[[StreamTask, ContinualNet, StreamResult], None] | None = None) -> StreamResult:
    """Train on `tasks` in order with no replay; after each, score every task so far (the accuracy matrix).

    To continue a stream stopped at a task boundary, pass `model` with the weights it had then and `done`, the
    result so far: training starts at task `len(done.accuracy)`, with the frozen copy of `model` as the old
    model, as it was in the uninterrupted run. `on_step(task, step, steps, loss)` follows each optimizer step,
    `after_task(task, model, result)` each task's scoring (where a run saves its state)."""
    result = StreamResult([list(row) for row in done.accuracy], done.seconds) if done is not None else StreamResult()
    first = len(result.accuracy)
    seen = [c for task in tasks[:first] for c in task.classes]
    old = frozen_copy(model) if first else None
    for task in tasks[first:]:
        start = time.perf_counter()
        step_hook = (lambda step, steps, loss, task=task: on_step(task, step, steps, loss)) if on_step else None
        train_task(model, old, task, list(seen), cfg, augment, step_hook)
        seen += list(task.classes)
        result.accuracy.append([accuracy_on(model, earlier, seen, cfg.method) for earlier in tasks[:task.index + 1]])
        result.seconds += time.perf_counter() - start
        if after_task is not None:
            after_task(task, model, result)
        old = frozen_copy(model)
    return result
