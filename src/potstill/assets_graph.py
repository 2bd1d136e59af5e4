"""Offline graph data installed as pip packages (the `graph` extra), read from disk without importing them.

- The Drosophila larva's left mushroom-body connectome (209 neurons, 4 cell types: K, P, O, I), shipped inside
  `graspologic` (install it with `--no-deps`: graspologic 3.4.4 pins numpy < 2, which potstill does not use).
- MUTAG (188 molecules, mutagenic or not; 7 atom types), shipped as TU-format test data inside `grakel`
  (`grakel.datasets.fetch_dataset` would download it; the bundled copy under `grakel/tests/data` does not).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from potstill.assets import package_dir
from potstill.errors import UserError

GRAPH_INSTALL_HINT = 'pip install "potstill[graph]" && pip install --no-deps graspologic==3.4.4'
DROSOPHILA_CELL_TYPES = ("K", "P", "O", "I")


@dataclass(frozen=True)
class NodeGraph:
    """One graph for node classification: weighted adjacency [N, N] (row = source), one label index per node."""

    adjacency: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]


@dataclass(frozen=True)
class LabelledGraph:
    """One graph of a graph-classification set: directed edges [2, E] (0-based, both directions listed),
    node label ids [N] and the graph's class (0 or 1)."""

    edges: np.ndarray
    node_labels: np.ndarray
    label: int


def _asset_dir(package: str, *parts: str) -> Path:
    try:
        root = package_dir(package)
    except UserError:
        raise UserError(
            f'graph asset package "{package}" is not installed; install the graph extra with `{GRAPH_INSTALL_HINT}`'
        ) from None
    folder = root.joinpath(*parts)
    if not folder.is_dir():
        raise UserError(f"{folder} is missing from the installed package {package!r}; reinstall with "
                        f"`{GRAPH_INSTALL_HINT}`")
    return folder


def _read_ints(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path} is missing ({what}); reinstall with `{GRAPH_INSTALL_HINT}`")
    return np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=1)


@functools.lru_cache(maxsize=1)
def _drosophila_left() -> NodeGraph:
    folder = _asset_dir("graspologic", "datasets", "drosophila")
    adjacency = np.loadtxt(folder / "left_adjacency.csv", dtype=np.float64)
    names = [line.strip() for line in (folder / "left_cell_labels.csv").read_text().splitlines() if line.strip()]
    unknown = sorted(set(names) - set(DROSOPHILA_CELL_TYPES))
    if adjacency.shape != (len(names), len(names)) or unknown:
        raise UserError(f"{folder}: expected a square adjacency with one of {DROSOPHILA_CELL_TYPES} per node, got "
                        f"shape {adjacency.shape}, {len(names)} labels, unknown labels {unknown}")
    labels = np.array([DROSOPHILA_CELL_TYPES.index(n) for n in names], dtype=np.int64)
    adjacency.setflags(write=False)
    labels.setflags(write=False)
    return NodeGraph(adjacency, labels, DROSOPHILA_CELL_TYPES)


def drosophila_left() -> NodeGraph:
    """The left mushroom-body connectome: synapse counts between 209 neurons and each neuron's cell type."""
    return _drosophila_left()


def connectome_node_features(adjacency: np.ndarray) -> np.ndarray:
    """Eight local statistics per node (the connectome has no node attributes): log(1 + x) of the out- and
    in-degree and of the out- and in-synapse counts, the fraction of partners that are reciprocal (out and in),
    the self-loop count (log 1 + x), and the out/in synapse ratio (log). Standardised over the nodes."""
    a = np.asarray(adjacency, dtype=np.float64)
    binary = a > 0
    out_deg, in_deg = binary.sum(1), binary.sum(0)
    out_w, in_w = a.sum(1), a.sum(0)
    mutual = (binary & binary.T).sum(1)
    features = np.stack([
        np.log1p(out_deg), np.log1p(in_deg), np.log1p(out_w), np.log1p(in_w),
        mutual / np.maximum(out_deg, 1), mutual / np.maximum(in_deg, 1),
        np.log1p(np.diag(a)), np.log((out_w + 1) / (in_w + 1)),
    ], axis=1)
    std = features.std(0)
    return ((features - features.mean(0)) / np.where(std > 0, std, 1.0)).astype(np.float32)


def connectivity_projection(adjacency: np.ndarray, dim: int = 16, *, seed: int = 0) -> np.ndarray:
    """Each node's own connections as a short dense vector: [log(1 + out-row), log(1 + in-column)] (2N values)
    times a fixed Gaussian matrix [2N, dim] (seed `seed`), standardised over the nodes. The connectome's analogue
    of a citation graph's bag-of-words: informative but noisy, and blind to the neighbours' connections."""
    a = np.asarray(adjacency, dtype=np.float64)
    partners = np.log1p(np.concatenate([a, a.T], axis=1))
    projected = partners @ np.random.default_rng(seed).normal(size=(partners.shape[1], dim))
    std = projected.std(0)
    return ((projected - projected.mean(0)) / np.where(std > 0, std, 1.0)).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _mutag() -> tuple[LabelledGraph, ...]:
    folder = _asset_dir("grakel", "tests", "data", "MUTAG")
    edges = _read_ints(folder / "MUTAG_A.txt", "edges").reshape(-1, 2) - 1
    graph_of_node = _read_ints(folder / "MUTAG_graph_indicator.txt", "graph of each node") - 1
    node_labels = _read_ints(folder / "MUTAG_node_labels.txt", "node labels")
    graph_labels = _read_ints(folder / "MUTAG_graph_labels.txt", "graph labels")
    if len(node_labels) != len(graph_of_node) or graph_of_node.max() + 1 != len(graph_labels):
        raise UserError(f"{folder}: node and graph counts of the MUTAG files disagree")
    starts = np.searchsorted(graph_of_node, np.arange(len(graph_labels)))
    graphs = []
    for g, label in enumerate(graph_labels):
        nodes = np.flatnonzero(graph_of_node == g)
        mine = edges[graph_of_node[edges[:, 0]] == g]
        graphs.append(LabelledGraph((mine - starts[g]).T.copy(), node_labels[nodes].copy(), int(label > 0)))
    return tuple(graphs)


def mutag() -> list[LabelledGraph]:
    """MUTAG's 188 molecule graphs (class 1 = mutagenic, 125 of them), node labels = 7 atom types."""
    return list(_mutag())
