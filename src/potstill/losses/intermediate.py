"""Objectives on a model's internals: hidden states of mapped layers, and attention / token relations.

Each is a small `nn.Module` built from its recipe params, then bound once to the shapes of the two models
(`bind(student, teacher)` with `ModelShape`s): that fixes the layer pairs and creates the learned projections
(bias-free `Linear(d_student → d_teacher)`, one per layer pair, trained with the student, checkpointed with the
run and dropped at export). They are called with the models' internals:

- `signal = "hidden_states"`: `forward(student_hidden_states, teacher_hidden_states, mask=…, reduction=…)`,
  the sequences as Hugging Face returns them (`[0]` = embedding output, `[i + 1]` = output of layer i), each
  `[B, T, D]`;
- `signal = "qkv"`: `forward(student_qkv, teacher_qkv, mask=…, reduction=…)`, mappings layer index →
  (queries, keys, values), each `[B, T, D]` with the heads concatenated (the outputs of the layer's q / k / v
  Linear modules).

`mask` is the `[B, T]` attention mask. Every objective here is a mean over real tokens ("mean"), or its sum
over real tokens ("sum", what the training loop uses: it divides by the number of real tokens of the optimizer
step, `unit = "tokens"`). `needs()` tells the task which layers to capture.

Layer maps (`layer_map`): "uniform" pairs student layer i with teacher layer ⌈(i + 1)·L_t / L_s⌉ − 1 (both
0-based; 12 → 6 gives 1, 3, 5, 7, 9, 11; 6 → 2 gives 2, 5), "last" pairs the last layers, and explicit
`[[i, j], …]` pairs are taken as given (-1 = the embedding output for hidden states; negative indices count
from the end otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from .attention import attention_mse, relation_logits
from .features import feature_l1, hidden_cosine, hidden_mse, squarehead

LayerSpec = str | Sequence[Sequence[int]]


@dataclass(frozen=True)
class ModelShape:
    """What an objective needs to know of a model: transformer layers, hidden width, attention heads, and the width
    of the vectors its task compares when that is not `hidden` (`output`; e.g. DistillWeighted's concatenated
    sources), and, when those vectors are blocks side by side, each block's (width, scale) (`output_blocks`)."""

    layers: int
    hidden: int
    heads: int
    output: int | None = None
    output_blocks: tuple[tuple[int, float], ...] = ()

    @property
    def output_width(self) -> int:
        return self.hidden if self.output is None else self.output


def layer_map(spec: LayerSpec, student_layers: int, teacher_layers: int, *,
              allow_embeddings: bool = False) -> list[tuple[int, int]]:
    """Pairs (student layer, teacher layer), 0-based, from "uniform", "last" or explicit pairs."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got student {student_layers}, teacher {teacher_layers}")
    if spec == "uniform":
        return [(i, math.ceil((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]
    if spec == "last":
        return [(student_layers - 1, teacher_layers - 1)]
    if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"layers must be 'uniform', 'last' or a list of [student, teacher] pairs, got {spec!r}")
    pairs = []
    for pair in spec:
        if (not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise ValueError(f"each layer pair must be [student_layer, teacher_layer] (ints), got {pair!r}")
        pairs.append((_resolve(pair[0], student_layers, "student", allow_embeddings),
                      _resolve(pair[1], teacher_layers, "teacher", allow_embeddings)))
    return pairs


def _resolve(index: int, layers: int, who: str, allow_embeddings: bool) -> int:
    if allow_embeddings and index == -1:
        return -1
    resolved = index + layers if index < 0 and not allow_embeddings else index
    if not 0 <= resolved < layers:
        low = -1 if allow_embeddings else -layers
        raise ValueError(f"{who} layer {index} is out of range: the {who} has {layers} layers "
                         f"(valid: {low} … {layers - 1}{', -1 = embedding output' if allow_embeddings else ''})")
    return resolved


class _Bound(nn.Module):
    """Shared plumbing: a layer spec, resolved by `bind` into pairs."""

    signal = "hidden_states"
    unit = "tokens"

    def __init__(self, layers: LayerSpec) -> None:
        super().__init__()
        self.layers_spec = layers
        self.pairs: list[tuple[int, int]] | None = None

    def _pairs(self) -> list[tuple[int, int]]:
        if self.pairs is None:
            raise RuntimeError(f"{type(self).__name__}: call bind(student_shape, teacher_shape) first")
        return self.pairs


class HiddenStateObjective(_Bound):
    """Σ or mean over mapped layer pairs of `loss(P_k·h_s^i, h_t^j)`; P_k a learned projection when widths
    differ (or always, with `project=True`)."""

    loss: Callable[..., Tensor] = staticmethod(hidden_mse)
    layer_reduction = "mean"

    def __init__(self, *, layers: LayerSpec = "uniform", project: bool | None = None, **loss_params) -> None:
        super().__init__(layers)
        if project not in (None, True, False):
            raise ValueError(f"project must be true, false or null (= when the widths differ), got {project!r}")
        self.project = project
        self.loss_params = loss_params
        self.projections = nn.ModuleList()

    def bind(self, student: ModelShape, teacher: ModelShape) -> None:
        self.pairs = layer_map(self.layers_spec, student.layers, teacher.layers, allow_embeddings=True)
        project = self.project if self.project is not None else student.hidden != teacher.hidden
        if self.project is False and student.hidden != teacher.hidden:
            raise ValueError(f"project is false but the hidden widths differ (student {student.hidden}, teacher "
                             f"{teacher.hidden}); a projection is needed")
        if project and not len(self.projections):
            self.projections = nn.ModuleList(nn.Linear(student.hidden, teacher.hidden, bias=False)
                                             for _ in self.pairs)

    def needs(self) -> dict[str, list[int]]:
        pairs = self._pairs()
        return {"student": sorted({i for i, _ in pairs}), "teacher": sorted({j for _, j in pairs})}

    def forward(self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], *,
                mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
        pairs = self._pairs()
        total: Tensor | None = None
        for k, (i, j) in enumerate(pairs):
            s = student_hidden[i + 1]
            if len(self.projections):
                projection = cast(nn.Linear, self.projections[k])
                s = projection(s.to(projection.weight.dtype))
            value = type(self).loss(s, teacher_hidden[j + 1], mask=mask, reduction=reduction, **self.loss_params)
            total = value if total is None else total + value
        assert total is not None  # layer_map never returns an empty map
        return total / len(pairs) if self.layer_reduction == "mean" else total


class HiddenMSE(HiddenStateObjective):
    """`hidden_mse` over mapped layers, averaged over the pairs (TinyBERT / DistillKit hidden-state MSE)."""

    loss = staticmethod(hidden_mse)

    def __init__(self, *, layers: LayerSpec = "uniform", project: bool | None = None) -> None:
        super().__init__(layers=layers, project=project)


class HiddenCosine(HiddenStateObjective):
    """`hidden_cosine` over mapped layers, averaged over the pairs (DistilBERT's cosine loss)."""

    loss = staticmethod(hidden_cosine)

    def __init__(self, *, layers: LayerSpec = "uniform", project: bool | None = None) -> None:
        super().__init__(layers=layers, project=project)


class SquareHead(HiddenStateObjective):
    """`squarehead` over mapped layers, summed over the pairs as in Kurtic et al. 2023."""

    loss = staticmethod(squarehead)
    layer_reduction = "sum"

    def __init__(self, *, layers: LayerSpec = "uniform", project: bool | None = None,
                 normalizer: str = "second_moment", eps: float = 1e-8) -> None:
        super().__init__(layers=layers, project=project, normalizer=normalizer, eps=eps)


class DMAEAlign(HiddenStateObjective):
    """DMAE's feature alignment (Bai et al. 2023): `feature_l1` between ℓ2n(P·h_s^i) and ℓ2n(sg h_t^j) for one
    intermediate block each, P a learned projection (always, as in DMAE; bias-free here). In the `vision` task
    the teacher sees the student's visible patches only and runs only up to block j. DMAE's ViT-B student /
    ViT-L teacher pair aligns blocks [[8, 17]]. Defaults: layers="last", project=True, normalize=True."""

    loss = staticmethod(feature_l1)

    def __init__(self, *, layers: LayerSpec = "last", project: bool | None = True, normalize: bool = True) -> None:
        super().__init__(layers=layers, project=project, normalize=normalize)


def _per_token(value: Tensor, heads: int, reduction: str) -> Tensor:
    """A relation loss over (example, head, token) rows as a mean over heads: per real token for "sum" and
    "none", over heads and real tokens for "mean"."""
    if reduction == "sum":
        return value / heads
    if reduction == "none":
        return value.mean(1)
    return value


class AttentionMSE(_Bound):
    """TinyBERT's attention loss: Σ over mapped layer pairs of `attention_mse` between the attention scores
    Q·Kᵀ/√d_k of each head, averaged over heads and tokens. Needs equal head counts. Default: layers="uniform"
    (TinyBERT: student layer i ↔ teacher layer (i + 1)·L_t/L_s − 1, the same map for divisible depths)."""

    signal = "qkv"

    def __init__(self, *, layers: LayerSpec = "uniform") -> None:
        super().__init__(layers)
        self.heads: int | None = None

    def bind(self, student: ModelShape, teacher: ModelShape) -> None:
        if student.heads != teacher.heads:
            raise ValueError(f"attention_mse compares attention heads one to one and needs equal head counts "
                             f"(student {student.heads}, teacher {teacher.heads})")
        self.pairs = layer_map(self.layers_spec, student.layers, teacher.layers)
        self.heads = student.heads

    needs = HiddenStateObjective.needs

    def forward(self, student_qkv: Mapping[int, tuple[Tensor, Tensor, Tensor]],
                teacher_qkv: Mapping[int, tuple[Tensor, Tensor, Tensor]], *, mask: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
        pairs = self._pairs()
        h, total = self.heads, None
        assert h is not None  # set by bind, like the pairs
        for i, j in pairs:
            (qs, ks, _), (qt, kt, _) = student_qkv[i], teacher_qkv[j]
            value = attention_mse(relation_logits(qs, ks, heads=h), relation_logits(qt, kt, heads=h), mask=mask,
                                  reduction=reduction)
            value = _per_token(value, h, reduction)
            total = value if total is None else total + value
        assert total is not None  # layer_map never returns an empty map
        return total


class ProjectedLoss(nn.Module):
    """A loss on the models' output vectors (`embedding_mse`, `embedding_cosine`) that learns a bias-free
    projection of the student's vectors to the teacher's width when they differ (created by `bind`; trained
    with the student, checkpointed, dropped at export). Equal widths: the loss as it is."""

    unit = "rows"

    def __init__(self, loss: Callable[..., Tensor], **params) -> None:
        super().__init__()
        self.loss, self.params = loss, params
        self.projection: nn.Linear | None = None

    def bind(self, student: ModelShape, teacher: ModelShape) -> None:
        if student.output_width != teacher.output_width and self.projection is None:
            self.projection = nn.Linear(student.output_width, teacher.output_width, bias=False)
            self._start_blocks_as_identity(student.output_width, teacher.output_blocks)

    def _start_blocks_as_identity(self, width: int, blocks: Sequence[tuple[int, float]]) -> None:
        """A teacher block as wide as the student starts as scale·I, so that the run starts by comparing the
        student's own vectors with that block (a block of another width keeps the default init)."""
        assert self.projection is not None
        start = 0
        with torch.no_grad():
            for block_width, scale in blocks:
                if block_width == width:
                    self.projection.weight[start:start + width] = scale * torch.eye(width)
                start += block_width

    def needs(self) -> dict[str, list[int]]:
        return {}

    def forward(self, student: Tensor, teacher: Tensor, *, mask: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
        if self.projection is not None:
            student = self.projection(student.to(self.projection.weight.dtype))
        return self.loss(student, teacher, mask=mask, reduction=reduction, **self.params)


def shape_of(config: object) -> ModelShape:
    """`ModelShape` from a Hugging Face config (num_hidden_layers / hidden_size / num_attention_heads, or the
    GPT-2 / DistilBERT names)."""
    def first(*names: str) -> int:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        raise ValueError(f"{type(config).__name__} has none of {names}")

    return ModelShape(layers=first("num_hidden_layers", "n_layer", "n_layers"),
                      hidden=first("hidden_size", "n_embd", "dim"),
                      heads=first("num_attention_heads", "n_head", "n_heads"))


__all__ = ["AttentionMSE", "DMAEAlign", "HiddenCosine", "HiddenMSE", "HiddenStateObjective", "ModelShape",
           "ProjectedLoss", "SquareHead", "layer_map", "shape_of"]
