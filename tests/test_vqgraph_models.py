"""VQGraph's teacher (GraphSAGE + EMA codebook) and the MLP student, on tiny hand-made graphs."""

import pytest
import torch

from potstill.students.graph_mlp import GraphMLP
from potstill.teachers.vqgraph import EMACodebook, pool_per_graph


def test_ema_codebook_quantises_to_the_nearest_codeword_then_moves_it_by_hand():
    book = EMACodebook(2, 1, decay=0.5, eps=0.0)
    book.codewords.copy_(torch.tensor([[0.0], [10.0]]))
    book.sums.copy_(book.codewords)
    book.counts.fill_(1.0)
    book.initialised.fill_(True)
    vectors = torch.tensor([[1.0], [2.0], [9.0]], requires_grad=True)
    quantised, codes = book(vectors)
    assert codes.tolist() == [0, 0, 1]
    assert quantised.detach().flatten().tolist() == [0.0, 0.0, 10.0]  # the codewords before the update
    # counts: 0.5·1 + 0.5·(2, 1) = (1.5, 1); sums: 0.5·(0, 10) + 0.5·(1 + 2, 9) = (1.5, 9.5); E = sums / counts.
    assert book.counts.tolist() == pytest.approx([1.5, 1.0])
    assert book.codewords.flatten().tolist() == pytest.approx([1.0, 9.5])
    quantised.sum().backward()  # straight-through: d(sum)/d(vectors) = 1
    assert vectors.grad.flatten().tolist() == [1.0, 1.0, 1.0]


def test_ema_codebook_does_not_move_in_eval_mode_and_initialises_from_the_first_batch():
    book = EMACodebook(3, 2)
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    book(vectors)  # training mode: codewords start near rows of the first batch
    distance_to_rows = torch.cdist(book.codewords, vectors).min(1).values
    assert bool(book.initialised) and distance_to_rows.max() < 0.5
    book.eval()
    before = book.codewords.clone()
    book(vectors + 5)
    assert torch.equal(book.codewords, before)


def test_pool_per_graph_by_hand():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert pool_per_graph(values, torch.tensor([0, 0, 1]), 2).tolist() == [[2.0, 3.0], [5.0, 6.0]]
    assert pool_per_graph(values, torch.tensor([0, 0, 1]), 2, "sum").tolist() == [[4.0, 6.0], [5.0, 6.0]]


def _identity_student(graph_level: bool) -> GraphMLP:
    student = GraphMLP(2, 2, hidden_dim=2, layers=1, graph_level=graph_level).eval()
    with torch.no_grad():
        for linear in (student.body[0], student.head[2]):
            linear.weight.copy_(torch.eye(2))
            linear.bias.zero_()
    return student


def test_graph_mlp_pools_hidden_vectors_per_graph_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]])
    hidden, logits = _identity_student(True)(x, torch.tensor([0, 0, 1]))
    assert hidden.tolist() == x.tolist()
    assert logits.tolist() == [[2.0, 3.0], [5.0, 0.0]]  # mean per graph, then ReLU and the identity head
    hidden, logits = _identity_student(False)(x)
    assert logits.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]]


def _toy_graph() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Two triangles joined by nothing: nodes 0-2 and 3-5; both directions listed.
    pairs = [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5)]
    edges = torch.tensor(pairs + [(b, a) for a, b in pairs]).T
    adjacency = torch.zeros(6, 6)
    adjacency[edges[0], edges[1]] = 1.0
    return torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), edges, adjacency


def test_teacher_node_and_graph_outputs_and_loss():
    pytest.importorskip("torch_geometric")
    from potstill.teachers.vqgraph import VQGraphTeacher, teacher_logits, teacher_loss

    torch.manual_seed(0)
    x, edges, adjacency = _toy_graph()
    teacher = VQGraphTeacher(3, 2, hidden_dim=4, codebook_size=5)
    out = teacher(x, edges)
    assert out.hidden.shape == (6, 4) and out.logits.shape == (6, 2) and out.codes.shape == (6,)
    assert out.feature_reconstruction.shape == (6, 3)
    scores = out.adjacency_scores.detach()
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0 + 1e-6
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    terms = teacher_loss(out, x, adjacency, labels, label_mask=torch.tensor([True, False] * 3))
    manual = terms["ce"] + 1e-3 * terms["features"] + 0.03 * terms["edges"] + 0.25 * terms["commit"]
    assert torch.isclose(terms["total"], manual)
    terms["total"].backward()
    assert teacher.encoder.lin_l.weight.grad is not None  # straight-through reaches the encoder
    teacher.eval()
    with torch.no_grad():
        assert torch.allclose(teacher_logits(teacher, x, edges), teacher(x, edges).logits, atol=1e-6)

    graph_teacher = VQGraphTeacher(3, 2, hidden_dim=4, codebook_size=5, graph_level=True)
    batch = torch.tensor([0, 0, 0, 1, 1, 1])
    out = graph_teacher(x, edges, batch)
    assert out.logits.shape == (2, 2)
    assert out.same_graph.sum() == 18  # two 3×3 blocks
    terms = teacher_loss(out, x, adjacency, torch.tensor([0, 1]))
    assert torch.isfinite(terms["total"])


def test_teacher_fits_a_toy_graph_and_the_student_learns_its_codes():
    pytest.importorskip("torch_geometric")
    from potstill.losses.vqgraph import soft_code_kl
    from potstill.teachers.vqgraph import VQGraphTeacher, teacher_loss

    torch.manual_seed(0)
    x, edges, adjacency = _toy_graph()
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    teacher = VQGraphTeacher(3, 2, hidden_dim=4, codebook_size=4, dropout=0.0)
    opt = torch.optim.Adam(teacher.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        teacher_loss(teacher(x, edges), x, adjacency, labels)["total"].backward()
        opt.step()
    teacher.eval()
    out = teacher(x, edges)
    assert out.logits.argmax(-1).tolist() == labels.tolist()

    student = GraphMLP(3, 2, hidden_dim=4, dropout=0.0)
    s_opt = torch.optim.Adam(student.parameters(), lr=0.05)
    first = None
    for _ in range(100):
        s_opt.zero_grad()
        loss = soft_code_kl(student(x)[0], out.hidden, teacher.codebook.codewords)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        s_opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_teacher_without_pytorch_geometric_is_a_user_error(monkeypatch):
    import sys

    from potstill.errors import UserError
    from potstill.teachers.vqgraph import VQGraphTeacher

    monkeypatch.setitem(sys.modules, "torch_geometric.nn", None)
    with pytest.raises(UserError, match=r"potstill\[graph\]"):
        VQGraphTeacher(3, 2)
