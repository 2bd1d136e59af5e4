"""AutoDistil's weight-sharing supernet for BERT-layout encoders.

Xu et al. 2022, "AutoDistil: Few-shot Task-agnostic Neural Architecture Search for Distilling Large Language
Models". One set of weights (the supernet, here initialised from the teacher) holds every student of an elastic
space; a subnet is a slice of them:

- depth L: L of the supernet's layers, spread evenly from the first to the last (depth 1: the first);
- width h: the leading h hidden dimensions of every matrix, embedding and LayerNorm that reads or writes the
  hidden state; the attention keeps the supernet's head size, so a subnet has h / head_size heads (transformers'
  BERT ties q/k/v width to the hidden size);
- FFN f: the leading f intermediate neurons of every layer.

Training samples several subnets per step (the code's sandwich rule: the largest, the smallest and
`n_random` random ones) and accumulates their gradients into the shared weights; the loss is MiniLMv2-style
self-attention relation distillation on the last layer, the q-q, k-k and v-v relations matched with MSE
(AutoDistil's code; the paper writes MiniLM's KL), which needs no projection between widths. The search then
ranks subnets by their held-out distillation loss under a budget, without retraining any of them.

`ElasticBert.forward(subnet, ...)` runs a subnet through `torch.func.functional_call` on views of the shared
weights (so its gradients land in them); `ElasticBert.extract(subnet)` copies the slice into a standalone
`BertModel` that transformers saves and loads like any other.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from potstill.errors import UserError
from potstill.students.build import spread_layers


@dataclass(frozen=True)
class Subnet:
    """One student of the elastic space: depth, hidden width and FFN width."""

    layers: int
    hidden: int
    ffn: int

    @property
    def label(self) -> str:
        return f"{self.layers}L-h{self.hidden}-ffn{self.ffn}"


@dataclass(frozen=True)
class ElasticSpace:
    """The choices of each dimension (every combination is a subnet)."""

    layers: tuple[int, ...]
    hidden: tuple[int, ...]
    ffn: tuple[int, ...]

    def largest(self) -> Subnet:
        return Subnet(max(self.layers), max(self.hidden), max(self.ffn))

    def smallest(self) -> Subnet:
        return Subnet(min(self.layers), min(self.hidden), min(self.ffn))

    def all(self) -> list[Subnet]:
        return [Subnet(depth, width, ffn) for depth in self.layers for width in self.hidden for ffn in self.ffn]

    def sample(self, rng: random.Random, n_random: int = 2) -> list[Subnet]:
        """The sandwich rule: the largest, the smallest and `n_random` uniformly drawn subnets."""
        drawn = [Subnet(rng.choice(self.layers), rng.choice(self.hidden), rng.choice(self.ffn))
                 for _ in range(n_random)]
        return [self.largest(), self.smallest(), *drawn]


class ElasticBert(nn.Module):
    """A BERT-layout encoder (transformers' `BertModel`) whose subnets share its weights."""

    def __init__(self, supernet: nn.Module, space: ElasticSpace) -> None:
        super().__init__()
        config = supernet.config
        self.supernet = supernet
        self.space = space
        self.head_size = config.hidden_size // config.num_attention_heads
        self._modules_by_subnet: dict[Subnet, nn.Module] = {}
        for subnet in space.all():
            self.check(subnet)

    def check(self, subnet: Subnet) -> None:
        """A one-line `UserError` when the subnet does not fit in the supernet."""
        config = self.supernet.config
        if not 1 <= subnet.layers <= config.num_hidden_layers:
            raise UserError(f"supernet: depth {subnet.layers} is outside 1..{config.num_hidden_layers}")
        if not 0 < subnet.hidden <= config.hidden_size or subnet.hidden % self.head_size:
            raise UserError(f"supernet: width {subnet.hidden} must be a multiple of the head size {self.head_size} "
                            f"up to {config.hidden_size}")
        if not 0 < subnet.ffn <= config.intermediate_size:
            raise UserError(f"supernet: FFN width {subnet.ffn} is outside 1..{config.intermediate_size}")

    def subnet_config(self, subnet: Subnet) -> Any:
        config = self.supernet.config.__class__(**self.supernet.config.to_dict())
        config.num_hidden_layers = subnet.layers
        config.hidden_size = subnet.hidden
        config.num_attention_heads = subnet.hidden // self.head_size
        config.intermediate_size = subnet.ffn
        return config

    def _module(self, subnet: Subnet) -> nn.Module:
        """The subnet's module structure (its own weights are never used: `forward` passes the slices)."""
        if subnet not in self._modules_by_subnet:
            with torch.device("meta"):
                module = self.supernet.__class__(self.subnet_config(subnet), add_pooling_layer=False)
            self._modules_by_subnet[subnet] = module
        return self._modules_by_subnet[subnet].train(self.training)

    def _slices(self, subnet: Subnet) -> Iterator[tuple[str, Tensor]]:
        """(name in the subnet's module, view of the supernet's tensor) for every weight and buffer it reads."""
        h, f = subnet.hidden, subnet.ffn
        layer_of = spread_layers(subnet.layers, self.supernet.config.num_hidden_layers)
        tensors = dict(self.supernet.named_parameters())
        tensors.update(dict(self.supernet.named_buffers()))
        for name, tensor in tensors.items():
            if name.startswith("pooler."):
                continue
            if name.startswith("encoder.layer."):
                index = int(name.split(".")[2])
                if index not in layer_of:
                    continue
                name = f"encoder.layer.{layer_of.index(index)}." + name.split(".", 3)[3]
            yield name, _slice(name, tensor, h, f)

    def parameters_of(self, subnet: Subnet) -> dict[str, Tensor]:
        """The subnet's weights as views of the supernet's (gradients flow back into the shared weights)."""
        self.check(subnet)
        return dict(self._slices(subnet))

    def forward(self, subnet: Subnet, **inputs: Any) -> Any:  # type: ignore[override]
        """The subnet's forward on `inputs` (input_ids, attention_mask, ...), through the shared weights."""
        from torch.func import functional_call

        return functional_call(self._module(subnet), self.parameters_of(subnet), args=(), kwargs=inputs,
                               strict=False)

    def extract(self, subnet: Subnet) -> nn.Module:
        """A standalone `BertModel` holding a copy of the subnet's slice of the weights."""
        model = self.supernet.__class__(self.subnet_config(subnet), add_pooling_layer=False)
        wanted = model.state_dict()  # persistent tensors only (position_ids and token_type_ids are rebuilt)
        state = {name: tensor.detach().clone() for name, tensor in self.parameters_of(subnet).items()
                 if name in wanted}
        model.load_state_dict(state, strict=True)
        return model


def _slice(name: str, tensor: Tensor, h: int, f: int) -> Tensor:
    """The leading hidden (h) / intermediate (f) part of one BERT tensor, by what its dimensions mean."""
    if name.endswith("position_ids") or name.endswith("token_type_ids"):
        return tensor
    if ".intermediate.dense." in name:  # hidden → FFN: weight [f_max, h_max], bias [f_max]
        return tensor[:f, :h] if tensor.dim() == 2 else tensor[:f]
    if ".output.dense." in name and ".attention." not in name:  # FFN → hidden: weight [h_max, f_max]
        return tensor[:h, :f] if tensor.dim() == 2 else tensor[:h]
    if name.startswith("embeddings.") and name.endswith("embeddings.weight"):  # [rows, h_max]
        return tensor[:, :h]
    if tensor.dim() == 2:  # q / k / v / attention output: [h_max, h_max]
        return tensor[:h, :h]
    return tensor[:h]  # biases and LayerNorm of the hidden state


def last_layer_qkv(model: nn.Module) -> Any:
    """A context that records the last encoder layer's query, key and value projections of the next forward
    (`with last_layer_qkv(m) as qkv: m(...)`, then `qkv["query"]`, ...)."""
    import contextlib

    @contextlib.contextmanager
    def recording() -> Iterator[dict[str, Tensor]]:
        seen: dict[str, Tensor] = {}
        attention = model.encoder.layer[-1].attention.self
        handles = [getattr(attention, part).register_forward_hook(
            lambda _m, _i, out, part=part: seen.__setitem__(part, out)) for part in ("query", "key", "value")]
        try:
            yield seen
        finally:
            for handle in handles:
                handle.remove()

    return recording()


def relation_mse(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor, *, heads: int) -> Tensor:
    """Σ over the q-q, k-k and v-v relations of the mean squared difference between student and teacher relation
    logits x_a·x_aᵀ/√d_r (`potstill.losses.attention.relation_logits`, `heads` relation heads), over the real
    (query, key) token pairs of `mask` [B, T]."""
    from potstill.losses.attention import relation_logits

    pairs = (mask[:, None, :, None] * mask[:, None, None, :]).float()  # [B, 1, T, T]
    count = pairs.sum() * heads
    total = torch.zeros((), device=mask.device)
    for s, t in zip(student, teacher, strict=True):
        diff = relation_logits(s, heads=heads) - relation_logits(t, heads=heads)
        total = total + (diff.pow(2) * pairs).sum() / count
    return total


def subnet_relation_loss(elastic: ElasticBert, subnet: Subnet, inputs: dict[str, Tensor],
                         teacher_qkv: Sequence[Tensor], *, heads: int) -> Tensor:
    """AutoDistil's distillation loss of one subnet on one batch: `relation_mse` of its last layer's q, k, v
    against the teacher's (`teacher_qkv`, recorded with `last_layer_qkv` on the same inputs)."""
    with last_layer_qkv(elastic._module(subnet)) as qkv:
        elastic(subnet, **inputs)
    student = [qkv[part] for part in ("query", "key", "value")]
    return relation_mse(student, teacher_qkv, inputs["attention_mask"], heads=heads)


def sandwich_step(elastic: ElasticBert, subnets: Sequence[Subnet], inputs: dict[str, Tensor],
                  teacher_qkv: Sequence[Tensor], *, heads: int) -> float:
    """One supernet step's gradients: each subnet's relation loss, divided by their number, accumulated into the
    shared weights (the caller steps the optimizer). Returns the mean loss."""
    total = 0.0
    for subnet in subnets:
        loss = subnet_relation_loss(elastic, subnet, inputs, teacher_qkv, heads=heads) / len(subnets)
        loss.backward()
        total += float(loss.detach())
    return total
