"""potstill.index: the differentiable IVF-PQ quantiser mirrors FAISS's IndexIVFPQ, Distill-VQ improves it, and
the export is a plain FAISS index."""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest
import torch

from potstill import assets
from potstill.index import IVFPQ, export_faiss, train_faiss_ivfpq
from potstill.index.distill_vq import distill_vq, exact_search, retrieval_agreement

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _faiss_one_thread():
    faiss.omp_set_num_threads(1)


def clustered(n_docs: int = 2000, n_queries: int = 600, d: int = 32, seed: int = 0):
    """Documents around 20 Gaussian centres; queries are noisy copies of random documents."""
    rs = np.random.RandomState(seed)
    centres = rs.randn(20, d).astype(np.float32)
    docs = (centres[rs.randint(20, size=n_docs)] + 0.6 * rs.randn(n_docs, d)).astype(np.float32)
    queries = (docs[rs.randint(n_docs, size=n_queries)] + 0.5 * rs.randn(n_queries, d)).astype(np.float32)
    return docs, queries


@pytest.fixture(scope="module")
def data():
    return clustered()


def hard_reference(qz: IVFPQ, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute-force IVF-PQ in numpy (float64): list ids, codes, reconstructions."""
    o = qz.centroids.detach().numpy().astype(np.float64)
    cb = qz.codebooks.detach().numpy().astype(np.float64)
    x = x.astype(np.float64)
    if qz.metric == "ip":
        lists = (x @ o.T).argmax(1)
    else:
        lists = ((x[:, None, :] - o[None]) ** 2).sum(-1).argmin(1)
    u = (x - o[lists]).reshape(len(x), qz.m, qz.dsub)
    codes = ((u[:, :, None, :] - cb[None]) ** 2).sum(-1).argmin(-1)
    recon = o[lists] + cb[np.arange(qz.m), codes].reshape(len(x), qz.d)
    return lists, codes, recon


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_from_faiss_matches_the_trained_faiss_index(data, metric):
    docs, queries = data
    index = train_faiss_ivfpq(docs, nlist=16, m=8, nbits=6, metric=metric)
    qz = IVFPQ.from_faiss(index)
    assert (qz.nlist, qz.m, qz.ksub, qz.dsub, qz.nbits, qz.metric, qz.code_size) == (16, 8, 64, 4, 6, metric, 6)
    index.add(docs)
    index.nprobe = 3
    dist, labels = index.search(queries[:100], 10)
    list_ids, codes = qz.encode(torch.from_numpy(docs))
    mine_d, mine_i = qz.search(torch.from_numpy(queries[:100]), list_ids, codes, 10, nprobe=3)
    np.testing.assert_array_equal(mine_i.numpy(), labels)
    np.testing.assert_allclose(mine_d.numpy(), dist, rtol=1e-5, atol=1e-4)
    index.make_direct_map()
    np.testing.assert_array_equal(qz.decode(list_ids, codes).detach().numpy(), index.reconstruct_n(0, len(docs)))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ste_forward_equals_hard_quantisation(data, metric):
    docs, _ = data
    qz = IVFPQ.from_faiss(train_faiss_ivfpq(docs, nlist=8, m=4, nbits=4, metric=metric))
    x = torch.from_numpy(docs[:300])
    out = qz(x)
    lists, codes, recon = hard_reference(qz, docs[:300])
    np.testing.assert_array_equal(out.list_ids.numpy(), lists)
    np.testing.assert_array_equal(out.codes.numpy(), codes)
    # Bit for bit the gather-based reconstruction: the soft part contributes exactly 0.0 to the value.
    assert torch.equal(out.quantized, qz.decode(out.list_ids, out.codes))
    assert torch.equal(out.coarse, qz.centroids[out.list_ids])
    np.testing.assert_allclose(out.quantized.detach().numpy(), recon, atol=1e-5)
    # A fixed assignment is honoured.
    fixed = torch.zeros(300, dtype=torch.long)
    assert torch.equal(qz(x, fixed).coarse, qz.centroids[fixed])


def test_codebooks_centroids_and_inputs_get_gradients(data):
    docs, queries = data
    qz = IVFPQ.from_faiss(train_faiss_ivfpq(docs, nlist=8, m=4, nbits=4))
    x = torch.from_numpy(docs[:5]).requires_grad_(True)  # 5 vectors: most of the 16 codewords go unused
    out = qz(x)
    scores = torch.from_numpy(queries[:16]) @ out.quantized.T
    (scores.logsumexp(-1).sum() + out.quantized.square().sum()).backward()
    for grad in (qz.codebooks.grad, qz.centroids.grad, x.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # The soft assignment spreads gradient beyond the chosen codewords (straight-through, not a plain gather).
    used = torch.zeros(qz.m, qz.ksub, dtype=torch.bool)
    used[torch.arange(qz.m).expand_as(out.codes), out.codes] = True
    assert (~used).any() and qz.codebooks.grad[~used].abs().sum() > 0


@pytest.fixture(scope="module")
def trained(data):
    docs, queries = data
    result = distill_vq(docs, queries[:400], nlist=16, m=8, nbits=4, top_k=50, temperature=1.0, batch_size=16,
                        epochs=5, pq_lr=1e-2, ivf_lr=1e-2, seed=0)
    return result


def test_distill_vq_improves_recall_over_its_faiss_initialisation(data, trained):
    docs, queries = data
    held_out = queries[400:]
    _, exact = exact_search(held_out, docs, 10)
    scores = {}
    for name, qz in (("init", trained.initial), ("learned", trained.quantiser)):
        _, labels = export_faiss(qz, docs, nprobe=2).search(held_out, 10)
        scores[name] = retrieval_agreement(labels, exact)
    assert scores["learned"]["recall@10"] > scores["init"]["recall@10"] + 0.03, scores
    assert scores["learned"]["mrr@10"] > scores["init"]["mrr@10"], scores
    # The initial quantiser is FAISS's own k-means index, and training moved both parts.
    assert not torch.equal(trained.initial.codebooks, trained.quantiser.codebooks)
    assert not torch.equal(trained.initial.centroids, trained.quantiser.centroids)
    assert len(trained.history) == 5 * 25 and trained.ivf_weight == 1.0


def test_distill_vq_is_deterministic(data):
    docs, queries = data
    kw = dict(nlist=8, m=4, nbits=4, top_k=20, batch_size=32, max_steps=3, pq_lr=1e-2, ivf_lr=1e-2, seed=3)
    a, b = distill_vq(docs, queries[:64], **kw), distill_vq(docs, queries[:64], **kw)
    assert torch.equal(a.quantiser.codebooks, b.quantiser.codebooks)
    assert torch.equal(a.quantiser.centroids, b.quantiser.centroids)
    frozen = distill_vq(docs, queries[:64], **kw, train_ivf=False, ivf_weight="scaled_to_pq", in_batch=False)
    assert torch.equal(frozen.quantiser.centroids, frozen.initial.centroids)
    assert 0 < frozen.ivf_weight and len(frozen.history) == 3


def assert_same_results(qz, queries, list_ids, codes, nprobe, dist, labels):
    """FAISS's (dist, labels) are potstill's search up to the order of tied scores: the same sorted distances,
    and each FAISS neighbour lies in a probed list and has the score potstill gives it."""
    mine_d, mine_i = qz.search(torch.from_numpy(queries), list_ids, codes, labels.shape[1], nprobe=nprobe)
    np.testing.assert_allclose(mine_d.numpy(), dist, rtol=1e-5, atol=1e-4)
    assert (mine_i.numpy() == labels).mean() > 0.95
    with torch.no_grad():
        sim = qz.similarity(torch.from_numpy(queries), qz.decode(list_ids, codes))
        probe = qz.centroid_scores(torch.from_numpy(queries)).topk(nprobe, dim=-1).indices
    picked = torch.from_numpy(labels)
    assert (picked >= 0).all()
    assert (list_ids[picked].unsqueeze(-1) == probe.unsqueeze(1)).any(-1).all()
    score = sim.gather(1, picked)
    np.testing.assert_allclose(score.numpy() if qz.metric == "ip" else -score.numpy(), dist, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_export_matches_potstill_search(data, metric):
    docs, queries = data
    result = distill_vq(docs, queries[:64], nlist=16, m=8, nbits=6, metric=metric, top_k=20, batch_size=32,
                        max_steps=4, pq_lr=1e-2, ivf_lr=3e-2, temperature=1.0 if metric == "ip" else 10.0)
    qz = result.quantiser
    q = queries[400:]
    x = torch.from_numpy(docs)
    for list_ids in (None, result.list_ids):
        index = export_faiss(qz, docs, nprobe=3, list_ids=list_ids)
        assert isinstance(index, faiss.IndexIVFPQ) and index.ntotal == len(docs) and index.nprobe == 3
        dist, labels = index.search(q, 10)
        ids, codes = qz.encode(x, list_ids)
        assert_same_results(qz, q, ids, codes, 3, dist, labels)
        index.make_direct_map()  # FAISS's reconstructions are potstill's decode
        np.testing.assert_allclose(index.reconstruct_n(0, len(docs)), qz.decode(ids, codes).numpy(), atol=1e-6)
    # Learned (no longer spherical) centroids move some documents to another nearest list; `list_ids` keeps theirs.
    assert (qz.assign(x) != result.list_ids).any()
    fixed = export_faiss(qz, docs, nprobe=16, list_ids=result.list_ids)
    fixed.make_direct_map()
    assert [fixed.direct_map.get(i) >> 32 for i in range(len(docs))] == result.list_ids.tolist()


def test_write_read_round_trip_needs_only_faiss(data, trained, tmp_path):
    docs, queries = data
    index = export_faiss(trained.quantiser, docs, nprobe=4)
    path = tmp_path / "dvq.faiss"
    faiss.write_index(index, str(path))
    again = faiss.read_index(str(path))
    assert isinstance(again, faiss.IndexIVFPQ) and again.nprobe == 4
    d1, i1 = index.search(queries[:50], 10)
    d2, i2 = again.search(queries[:50], 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    np.save(tmp_path / "q.npy", queries[:50])
    np.save(tmp_path / "i.npy", i1)
    script = (
        "import sys, faiss, numpy as np\n"
        f"index = faiss.read_index({str(path)!r})\n"
        f"_, i = index.search(np.load({str(tmp_path / 'q.npy')!r}), 10)\n"
        f"assert (i == np.load({str(tmp_path / 'i.npy')!r})).all()\n"
        "assert not any(m.startswith('potstill') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_retrieval_agreement():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    found = np.array([[2, 0, 9], [-1, 7, 8]])
    got = retrieval_agreement(found, exact, k=3)
    assert got == {"recall@3": pytest.approx((2 / 3 + 0) / 2), "mrr@3": pytest.approx((1 / 2 + 0) / 2)}
    with pytest.raises(ValueError, match="at least k=10"):
        retrieval_agreement(found, exact)


def test_clear_errors(data):
    docs, queries = data
    with pytest.raises(ValueError, match="must divide the dimension 32"):
        train_faiss_ivfpq(docs, nlist=8, m=5)
    with pytest.raises(ValueError, match="at least max"):
        train_faiss_ivfpq(docs[:100], nlist=8, m=4, nbits=8)
    with pytest.raises(ValueError, match="metric must be one of"):
        train_faiss_ivfpq(docs, nlist=8, m=4, metric="cosine")
    qz = IVFPQ(torch.randn(4, 8), torch.randn(2, 16, 4))
    with pytest.raises(ValueError, match=r"x must be \(n, 8\)"):
        qz(torch.randn(3, 7))
    with pytest.raises(ValueError, match="power of two"):
        IVFPQ(torch.randn(4, 8), torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match="cover 6 dimensions"):
        IVFPQ(torch.randn(4, 8), torch.randn(2, 16, 3))
    with pytest.raises(ValueError, match="vectors must have 8 columns"):
        export_faiss(qz, np.zeros((5, 9), np.float32))
    with pytest.raises(ValueError, match="query_embeddings must have 32 columns"):
        distill_vq(docs, queries[:, :16], nlist=8, m=4)
    with pytest.raises(ValueError, match="init has d=8"):
        distill_vq(docs[:, :8], queries[:, :8], nlist=8, m=4, nbits=8, init=qz)
    with pytest.raises(ValueError, match="ivf_weight must be"):
        distill_vq(docs, queries, nlist=8, m=4, ivf_weight="auto")


def test_chatterbot_pairs():
    pairs = assets.chatterbot_pairs()
    assert len(pairs) == 2025
    assert pairs[0] == (
        "What is AI?",
        "Artificial Intelligence is the branch of engineering and science devoted to constructing machines that "
        "think.",
        "ai",
    )
    topics = {t for _, _, t in pairs}
    assert len(topics) == 21 and {"ai", "trivia", "tech_support"} <= topics
    assert len({q for q, _, _ in pairs}) == 748 and len({a for _, a, _ in pairs}) == 870
    assert all(q.strip() and a.strip() and "  " not in q + a for q, a, _ in pairs)
    assert assets.chatterbot_pairs() == pairs and assets.chatterbot_pairs() is not pairs
    assert "chatterbot_corpus" not in sys.modules
