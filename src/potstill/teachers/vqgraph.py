"""VQGraph's teacher: a GraphSAGE network whose node embeddings are vector-quantised against a learned codebook.

Paper: Yang et al., "VQGraph: Rethinking Graph Representation Space for Bridging GNNs and MLPs" (ICLR 2024).

The codebook is a "structure-aware tokenizer": each codeword stands for a kind of local neighbourhood, learned by
asking the quantised embeddings to reconstruct the node features and the graph's adjacency while also solving the
training labels. The student (`potstill.students.graph_mlp`) then learns the teacher's soft assignments of every
node to the codewords (`potstill.losses.vqgraph`).

Forward (`VQGraphTeacher`):
- `h = SAGE₁(X, A)`  (the node embedding, width d = the codebook's dimension)
- `e = VQ(h)`  (the nearest codeword, straight-through gradient to h)
- `u = dec_e(e)`;  logits = `SAGE₂(u, A)` per node, or a linear head on the mean (or sum) of `SAGE₂(u, A)` per
  graph.
- Reconstructions: features `x̂ = dec_n(e)`, adjacency `Â = minmax(u uᵀ)` (within each graph).

Teacher loss (`teacher_loss`):
`L_T = CE(y, logits) + λ_n · mean‖x − x̂‖² + λ_e · RMSE(A, Â) + β · mean‖h − sg(e)‖²`, with β = 0.25 (commitment).

The codebook is updated by an exponential moving average (decay 0.8) of the embeddings assigned to each
codeword, not by gradients. Defaults from the paper's code: commitment 0.25, EMA 0.8, λ_n = 1e-3, λ_e = 0.03.
Codebook size: the paper uses thousands of codes on large graphs; potstill defaults to 64 for graphs of a few
hundred nodes. Δ from the paper: Euclidean nearest-codeword search (the authors' code offers cosine), and
codewords are initialised from embeddings of the first batch.

PyTorch Geometric (`pip install "potstill[graph]"`) provides the SAGE layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.errors import UserError

__all__ = ["EMACodebook", "VQGraphOutput", "VQGraphTeacher", "pool_per_graph", "teacher_logits", "teacher_loss"]

PYG_HINT = 'pip install "potstill[graph]"'


def _sage_conv() -> Any:
    try:
        from torch_geometric.nn import SAGEConv
    except ImportError:
        raise UserError(f"the VQGraph teacher needs PyTorch Geometric; install it with `{PYG_HINT}`") from None
    return SAGEConv


class EMACodebook(nn.Module):
    """M codewords of dimension d; nearest-codeword quantisation with an EMA update in training mode.

    Update (training mode, per call): n_m ← γ n_m + (1−γ)·#{i: code(i)=m}; s_m ← γ s_m + (1−γ)·Σ_{code(i)=m} h_i;
    E_m ← s_m / n̂_m with Laplace-smoothed counts n̂_m = (n_m + ε) / (Σn + Mε) · Σn.
    """

    def __init__(self, size: int, dim: int, *, decay: float = 0.8, eps: float = 1e-5) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"codebook size and dim must be >= 1, got {size} and {dim}")
        self.decay, self.eps = decay, eps
        self.register_buffer("codewords", torch.zeros(size, dim))
        self.register_buffer("counts", torch.zeros(size))
        self.register_buffer("sums", torch.zeros(size, dim))
        self.register_buffer("initialised", torch.tensor(False))

    def nearest(self, vectors: Tensor) -> Tensor:
        """Index of the nearest codeword (squared Euclidean distance) for every row of `vectors`."""
        distances = torch.cdist(vectors.detach().float(), self.codewords.float())
        return distances.argmin(dim=-1)

    @torch.no_grad()
    def _initialise(self, vectors: Tensor) -> None:
        generator = torch.Generator().manual_seed(0)
        rows = torch.randint(len(vectors), (len(self.codewords),), generator=generator).to(vectors.device)
        noise = 0.01 * torch.randn(self.codewords.shape, generator=generator).to(vectors.device)
        self.codewords.copy_(vectors[rows].float() + noise)
        self.sums.copy_(self.codewords)
        self.counts.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, vectors: Tensor, codes: Tensor) -> None:
        one_hot = F.one_hot(codes, len(self.codewords)).to(vectors.dtype)
        self.counts.mul_(self.decay).add_((1 - self.decay) * one_hot.sum(0))
        self.sums.mul_(self.decay).add_((1 - self.decay) * one_hot.T @ vectors.float())
        total = self.counts.sum()
        smoothed = (self.counts + self.eps) / (total + len(self.counts) * self.eps) * total
        self.codewords.copy_(self.sums / smoothed.unsqueeze(-1))

    def forward(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        """(quantised vectors with a straight-through gradient to `vectors`, codeword index per row)."""
        if self.training and not bool(self.initialised):
            self._initialise(vectors.detach())
        codes = self.nearest(vectors)
        quantised = self.codewords[codes].to(vectors.dtype)
        if self.training:
            self._ema_update(vectors.detach(), codes)
        return vectors + (quantised - vectors).detach(), codes


@dataclass
class VQGraphOutput:
    """What the teacher computes for one (batch of) graph(s). `logits` is per node, or per graph when the model
    was built with `graph_level=True`; `adjacency_scores` is Â for node pairs of the same graph (within-graph
    mask in `same_graph`)."""

    hidden: Tensor
    quantised: Tensor
    codes: Tensor
    logits: Tensor
    feature_reconstruction: Tensor
    adjacency_scores: Tensor
    same_graph: Tensor


def _graph_index(batch: Tensor | None, num_nodes: int, device: torch.device) -> Tensor:
    return torch.zeros(num_nodes, dtype=torch.long, device=device) if batch is None else batch


def pool_per_graph(values: Tensor, batch: Tensor, num_graphs: int, pooling: str = "mean") -> Tensor:
    """Mean (or sum, `pooling="sum"`) of the rows of `values` [N, d] per graph id in `batch` [N]: [num_graphs, d]."""
    if pooling not in ("mean", "sum"):
        raise ValueError(f'pooling must be "mean" or "sum", got {pooling!r}')
    sums = torch.zeros(num_graphs, values.shape[-1], dtype=values.dtype, device=values.device)
    sums.index_add_(0, batch, values)
    if pooling == "sum":
        return sums
    counts = torch.bincount(batch, minlength=num_graphs).clamp_min(1).to(values.dtype)
    return sums / counts.unsqueeze(-1)


class VQGraphTeacher(nn.Module):
    """GraphSAGE encoder → EMA codebook → decoder GraphSAGE (node or graph logits), plus the two reconstructions."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 64,
        codebook_size: int = 64,
        graph_level: bool = False,
        pooling: str = "mean",
        dropout: float = 0.2,
        ema_decay: float = 0.8,
    ) -> None:
        super().__init__()
        conv = _sage_conv()
        self.graph_level, self.pooling = graph_level, pooling
        self.encoder = conv(in_dim, hidden_dim)
        self.codebook = EMACodebook(codebook_size, hidden_dim, decay=ema_decay)
        self.edge_decoder = nn.Linear(hidden_dim, hidden_dim)
        self.feature_decoder = nn.Linear(hidden_dim, in_dim)
        self.classifier_conv = conv(hidden_dim, hidden_dim if graph_level else num_classes)
        self.graph_head = nn.Linear(hidden_dim, num_classes) if graph_level else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor | None = None) -> VQGraphOutput:
        hidden = self.encoder(self.dropout(x), edge_index)
        quantised, codes = self.codebook(hidden)
        decoded = self.edge_decoder(quantised)
        scores = decoded @ decoded.T
        graph_of = _graph_index(batch, len(x), x.device)
        same_graph = graph_of.unsqueeze(0) == graph_of.unsqueeze(1)
        low = scores.masked_fill(~same_graph, float("inf")).amin(1, keepdim=True)
        high = scores.masked_fill(~same_graph, float("-inf")).amax(1, keepdim=True)
        adjacency_scores = (scores - low) / (high - low).clamp_min(1e-8)
        node_out = self.classifier_conv(self.dropout(F.relu(decoded)), edge_index)
        if self.graph_head is not None:
            num_graphs = int(graph_of.max()) + 1 if len(graph_of) else 0
            logits = self.graph_head(pool_per_graph(F.relu(node_out), graph_of, num_graphs, self.pooling))
        else:
            logits = node_out
        return VQGraphOutput(hidden, quantised, codes, logits, self.feature_decoder(quantised), adjacency_scores,
                             same_graph)


def teacher_logits(model: VQGraphTeacher, x: Tensor, edge_index: Tensor, batch: Tensor | None = None) -> Tensor:
    """Inference path: the class logits only (quantised, no reconstructions)."""
    hidden = model.encoder(x, edge_index)
    quantised, _ = model.codebook(hidden)
    decoded = model.edge_decoder(quantised)
    node_out = model.classifier_conv(F.relu(decoded), edge_index)
    if model.graph_head is None:
        return node_out
    graph_of = _graph_index(batch, len(x), x.device)
    return model.graph_head(pool_per_graph(F.relu(node_out), graph_of, int(graph_of.max()) + 1, model.pooling))


def teacher_loss(
    output: VQGraphOutput,
    features: Tensor,
    adjacency: Tensor,
    labels: Tensor,
    *,
    label_mask: Tensor | None = None,
    feature_weight: float = 1e-3,
    edge_weight: float = 0.03,
    commitment: float = 0.25,
) -> dict[str, Tensor]:
    """The terms of L_T and their sum under "total". `adjacency` is the binary [N, N] adjacency (block-diagonal
    for a batch of graphs); `label_mask` picks the labelled rows of `output.logits` (all when None)."""
    logits = output.logits if label_mask is None else output.logits[label_mask]
    targets = labels if label_mask is None else labels[label_mask]
    ce = F.cross_entropy(logits, targets)
    features_mse = (features - output.feature_reconstruction).pow(2).sum(-1).mean()
    pair_error = (adjacency.float() - output.adjacency_scores).pow(2)[output.same_graph]
    edge_rmse = pair_error.mean().sqrt()
    commit = (output.hidden - output.quantised.detach()).pow(2).sum(-1).mean()
    total = ce + feature_weight * features_mse + edge_weight * edge_rmse + commitment * commit
    return {"total": total, "ce": ce, "features": features_mse, "edges": edge_rmse, "commit": commit}
