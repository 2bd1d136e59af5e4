"""Graph data as tensors: the Drosophila connectome for node classification, MUTAG batches for graph
classification, and the seeded stratified split both use (VQGraph's teacher, the `graph` task, the benchmark).

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

__all__ = ["CONNECTOME_FEATURES", "GRAPH_DATASETS", "NodeTensors", "connectome_tensors", "mutag_batch",
           "stratified_split"]

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
