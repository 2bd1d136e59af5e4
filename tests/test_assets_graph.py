"""The offline graph data of the `graph` extra (potstill.assets_graph); skipped when the extra is missing."""

import importlib.util

import numpy as np
import pytest

from potstill import assets_graph
from potstill.errors import UserError


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not _installed("graspologic"), reason="graph extra (graspologic) not installed")
def test_drosophila_left_has_209_neurons_of_four_cell_types():
    graph = assets_graph.drosophila_left()
    assert graph.adjacency.shape == (209, 209)
    assert graph.label_names == ("K", "P", "O", "I")
    assert np.bincount(graph.labels).tolist() == [101, 58, 29, 21]
    features = assets_graph.connectome_node_features(graph.adjacency)
    assert features.shape == (209, 8)
    assert np.allclose(features.mean(0), 0, atol=1e-5)


@pytest.mark.skipif(not _installed("grakel"), reason="graph extra (grakel) not installed")
def test_mutag_is_read_offline_from_grakels_test_data():
    graphs = assets_graph.mutag()
    assert len(graphs) == 188
    assert sum(g.label for g in graphs) == 125
    first = graphs[0]
    assert first.edges.shape[0] == 2 and first.edges.min() >= 0
    assert first.edges.max() < len(first.node_labels)
    assert max(int(g.node_labels.max()) for g in graphs) == 6


def test_connectome_node_features_by_hand():
    # Node 0 -> 1 (2 synapses), 1 -> 0 (1), 1 -> 2 (1), 2 has a self-loop (3).
    adjacency = np.array([[0, 2, 0], [1, 0, 1], [0, 0, 3]], dtype=float)
    raw_out_degree = np.log1p([1, 2, 1])
    features = assets_graph.connectome_node_features(adjacency)
    expected = (raw_out_degree - raw_out_degree.mean()) / raw_out_degree.std()
    assert np.allclose(features[:, 0], expected, atol=1e-6)
    # Reciprocal fraction of out-partners: node 0 -> 1/1, node 1 -> 1/2, node 2 -> 1/1 (its self-loop).
    recip = np.array([1.0, 0.5, 1.0])
    assert np.allclose(features[:, 4], (recip - recip.mean()) / recip.std(), atol=1e-6)


def test_a_missing_package_is_a_user_error_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="graph extra"):
        assets_graph._asset_dir("graspologic", "datasets")


def test_connectivity_projection_is_the_projected_log_partner_counts():
    adjacency = np.array([[0, 2, 0], [1, 0, 1], [0, 0, 3]], dtype=float)
    features = assets_graph.connectivity_projection(adjacency, 2, seed=5)
    partners = np.log1p(np.concatenate([adjacency, adjacency.T], axis=1))
    raw = partners @ np.random.default_rng(5).normal(size=(6, 2))
    assert np.allclose(features, (raw - raw.mean(0)) / raw.std(0), atol=1e-5)
    assert features.dtype == np.float32
