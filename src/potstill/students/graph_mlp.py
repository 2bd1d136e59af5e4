"""The MLP student of graph distillation (GLNN, VQGraph): it reads only a node's own features, never the graph.

Paper: Yang et al., "VQGraph: Rethinking Graph Representation Space for Bridging GNNs and MLPs" (ICLR 2024);
the plain and logit-distilled MLP are the GLNN baselines (Zhang et al., "Graph-less Neural Networks", 2022).

`GraphMLP(x)` returns `(hidden, logits)`: `hidden` [N, d] is the last hidden layer, whose width d must equal the
teacher's codebook dimension so that VQGraph's code loss can compare it with the codewords. For graph
classification (`graph_level=True`) the logits come from the mean (or sum) of `hidden` over each graph's nodes (pass the
node-to-graph index `batch`): still no message passing, so inference costs one MLP pass per node.
Plain torch: the student needs no graph library to run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from potstill.teachers.vqgraph import pool_per_graph

__all__ = ["GraphMLP"]


class GraphMLP(nn.Module):
    """`layers` Linear+ReLU(+dropout) blocks to width `hidden_dim`, then a linear classifier."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 64,
        layers: int = 2,
        dropout: float = 0.2,
        graph_level: bool = False,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        blocks: list[nn.Module] = []
        width = in_dim
        for index in range(layers):
            blocks.append(nn.Linear(width, hidden_dim))
            if index < layers - 1:
                blocks += [nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_dim
        self.body = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes))
        self.graph_level, self.pooling = graph_level, pooling

    def forward(self, x: Tensor, batch: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hidden = self.body(x)
        if not self.graph_level:
            return hidden, self.head(hidden)
        graph_of = torch.zeros(len(x), dtype=torch.long, device=x.device) if batch is None else batch
        num_graphs = int(graph_of.max()) + 1 if len(graph_of) else 0
        return hidden, self.head(pool_per_graph(hidden, graph_of, num_graphs, self.pooling))
