"""Graph data as tensors: the Drosophila connectome for node classification, MUTAG batches for graph
classification, and the seeded stratified split both use (VQGraph's teacher, the `graph` task, the benchmark).

`graph_items` puts both kinds in one shape for the `graph` task: the items it classifies (nodes, or graphs) with
the nodes of each.

Read offline from the graph extra's packages (`potstill.assets_graph`). The connectome has no node attributes, so
its features are computed from each node's own connections: `projection` (`connectivity_projection`, 16 dims,
the default) or `local` (`connectome_node_features`, eight statistics). The GNN sees the graph as undirected,
without self-loops: an edge wherever a synapse goes either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from potstill.errors import UserError

__all__ = ["CONNECTOME_FEATURES", "GRAPH_DATASETS", "GraphItems", "NodeTensors", "connectome_tensors", "graph_items",
           "mutag_batch", "stratified_split"]

GRAPH_DATASETS = ("connectome", "mutag")
CONNECTOME_FEATURES = ("projection", "local")
MUTAG_ATOM_TYPES = 7


@dataclass(frozen=True)
class NodeTensors:
    """One graph for node classification: features `x` [N, F], undirected `edge_index` [2, E], the binary
    `adjacency` [N, N] (what the teacher reconstructs), `labels` [N] and the class count."""

    x: torch.Tensor
    edge_index: torch.Tensor
    adjacency: torch.Tensor
    labels: torch.Tensor
    num_classes: int


def connectome_tensors(features: str = "projection") -> NodeTensors:
    """The left Drosophila mushroom-body connectome (209 neurons, 4 cell types) with `features` node features."""
    from potstill.assets_graph import connectivity_projection, connectome_node_features, drosophila_left

    if features not in CONNECTOME_FEATURES:
        raise UserError(f"connectome features must be one of {', '.join(CONNECTOME_FEATURES)}, got {features!r}")
    graph = drosophila_left()
    if features == "projection":
        x = torch.from_numpy(connectivity_projection(graph.adjacency, 16, seed=0))
    else:
        x = torch.from_numpy(connectome_node_features(graph.adjacency))
    binary = (graph.adjacency > 0) | (graph.adjacency.T > 0)
    np.fill_diagonal(binary, False)
    edge_index = torch.from_numpy(np.stack(np.nonzero(binary))).long()
    return NodeTensors(x, edge_index, torch.from_numpy(binary).float(), torch.from_numpy(graph.labels.copy()),
                       len(graph.label_names))


def stratified_split(labels: np.ndarray, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
    """(train, validation, test) sorted index arrays: each class's members shuffled (seeded) and cut by
    `fractions` = (train, validation) shares, at least one of each per class; the test part is the rest."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_train = max(1, round(fractions[0] * len(members)))
        n_val = max(1, round(fractions[1] * len(members)))
        parts[0] += members[:n_train].tolist()
        parts[1] += members[n_train:n_train + n_val].tolist()
        parts[2] += members[n_train + n_val:].tolist()
    return tuple(np.sort(np.array(p, dtype=np.int64)) for p in parts)


def mutag_batch(graphs: list) -> dict[str, torch.Tensor]:
    """MUTAG graphs (`assets_graph.LabelledGraph`) as one disjoint union: one-hot atom features `x`, `edge_index`,
    node-to-graph `batch`, block-diagonal binary `adjacency` and the graph `labels`."""
    xs, edges, batch, offset = [], [], [], 0
    for g, graph in enumerate(graphs):
        n = len(graph.node_labels)
        xs.append(torch.nn.functional.one_hot(torch.from_numpy(graph.node_labels), MUTAG_ATOM_TYPES).float())
        edges.append(torch.from_numpy(graph.edges) + offset)
        batch.append(torch.full((n,), g, dtype=torch.long))
        offset += n
    edge_index = torch.cat(edges, 1)
    adjacency = torch.zeros(offset, offset)
    adjacency[edge_index[0], edge_index[1]] = 1.0
    return {"x": torch.cat(xs), "edge_index": edge_index, "batch": torch.cat(batch), "adjacency": adjacency,
            "labels": torch.tensor([graph.label for graph in graphs])}


@dataclass(frozen=True)
class GraphItems:
    """What a graph task classifies: the nodes of one graph (`graph_of` None) or the graphs of a set (`graph_of`
    [N]: each node's graph). `x` [N, F] and `edge_index` cover all nodes (a set's graphs as one disjoint union);
    `labels` [I] has one label per item; item i's nodes are `starts[i]:starts[i + 1]` (one node per item for node
    classification)."""

    x: torch.Tensor
    edge_index: torch.Tensor
    graph_of: torch.Tensor | None
    labels: torch.Tensor
    num_classes: int
    starts: torch.Tensor

    @property
    def graph_level(self) -> bool:
        return self.graph_of is not None

    def nodes_of(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the nodes of `items` in order, the position in `items` of each of those nodes' item)."""
        sizes = self.starts[items + 1] - self.starts[items]
        owner = torch.repeat_interleave(torch.arange(len(items)), sizes)
        offsets = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        return self.starts[items][owner] + offsets, owner


def graph_items(dataset: str, features: str = "projection") -> GraphItems:
    """The connectome's nodes (`features`: its node features) or MUTAG's graphs, as `GraphItems`."""
    if dataset == "connectome":
        data = connectome_tensors(features)
        return GraphItems(data.x, data.edge_index, None, data.labels, data.num_classes,
                          torch.arange(len(data.labels) + 1))
    if dataset != "mutag":
        raise UserError(f"graph data sets: {', '.join(GRAPH_DATASETS)}; got {dataset!r}")
    from potstill.assets_graph import mutag

    union = mutag_batch(mutag())
    counts = torch.bincount(union["batch"])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    return GraphItems(union["x"], union["edge_index"], union["batch"], union["labels"], 2, starts)
