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

Built once, saved with its split, loaded by recipes (`teacher.factory: potstill.teachers.vqgraph:load_vqgraph_teacher`):

    python -m potstill.teachers.vqgraph --out runs/vqgraph-teacher [--dataset connectome|mutag] [--seed N]

Connectome (node classification, `potstill.data.graphs.connectome_tensors`): a stratified 40/20/40 split of the
209 neurons (seeded by `--seed`), full-batch Adam (lr 0.01, weight decay 5e-4) for 300 epochs on `teacher_loss`
with the cross-entropy on the training nodes; the weights of the epoch with the best validation accuracy are
kept (the first such epoch). MUTAG (graph classification): a 60/20/20 split of the 188 graphs, 100 epochs of
batches of 32 training graphs, mean pooling, no dropout, the same selection. These are `benchmarks/vqgraph.py`'s
settings; it calls the same functions (`fit_node_teacher`, `fit_graph_teacher`).

The folder holds `model.safetensors` (the state dict, codebook included) and `vqgraph_teacher.json` (format,
data set, features, model sizes, training settings, the split as index lists, the validation and test accuracy
of the kept epoch), written together atomically (`potstill.io.atomic_dir`). `load_vqgraph_teacher(folder)`
rebuilds the frozen teacher with the json as its `settings`, which the `graph` task reads for the data and the
split: the student is scored on the teacher's held-out nodes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.data.graphs import CONNECTOME_FEATURES, GRAPH_DATASETS, NodeTensors, mutag_batch, stratified_split
from potstill.errors import UserError

__all__ = ["SETTINGS_FILE", "WEIGHTS_FILE", "EMACodebook", "FitSettings", "VQGraphOutput", "VQGraphTeacher",
           "fit_graph_teacher", "fit_node_teacher", "load_vqgraph_teacher", "main", "pool_per_graph",
           "save_vqgraph_teacher", "teacher_logits", "teacher_loss"]

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
    # counts by index_add, not bincount: a bincount whose minlength is traced has no ONNX form (potstill export)
    counts = torch.zeros(num_graphs, dtype=values.dtype, device=values.device)
    counts = counts.index_add_(0, batch, torch.ones_like(batch, dtype=values.dtype)).clamp_min(1)
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
        self.graph_level, self.pooling, self.num_classes = graph_level, pooling, num_classes
        # what `save_vqgraph_teacher` saved with a trained teacher (data set, features, split); empty for a new one
        self.settings: dict[str, Any] = {}
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


# ---------------------------------------------------------------- built once: train, save, load

SETTINGS_FILE, WEIGHTS_FILE = "vqgraph_teacher.json", "model.safetensors"
NODE_FRACTIONS, GRAPH_FRACTIONS = (0.4, 0.2), (0.6, 0.2)


@dataclass(frozen=True)
class FitSettings:
    """How the teacher is trained (the benchmark's defaults per data set: `for_dataset`)."""

    dataset: str = "connectome"
    features: str = "projection"
    seed: int = 0
    epochs: int = 300
    hidden: int = 64
    codebook: int = 64
    lr: float = 0.01
    weight_decay: float = 5e-4
    dropout: float = 0.2
    pooling: str = "mean"
    batch_size: int = 32  # MUTAG: training graphs per step

    @classmethod
    def for_dataset(cls, dataset: str, **changes: Any) -> FitSettings:
        if dataset not in GRAPH_DATASETS:
            raise UserError(f"--dataset must be one of {', '.join(GRAPH_DATASETS)}, got {dataset!r}")
        base = cls(dataset=dataset) if dataset == "connectome" else cls(dataset=dataset, epochs=100, dropout=0.0)
        return cls(**{**asdict(base), **{k: v for k, v in changes.items() if v is not None}})


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def fit_node_teacher(data: NodeTensors, split: tuple[np.ndarray, ...],
                     settings: FitSettings) -> tuple[VQGraphTeacher, dict[str, float]]:
    """The teacher of the best validation epoch (eval mode) and its {"val_accuracy", "test_accuracy"};
    full-batch training on `teacher_loss`, labels of the `split[0]` nodes only."""
    train, val, test = (torch.from_numpy(part) for part in split)
    train_mask = torch.zeros(len(data.x), dtype=torch.bool)
    train_mask[train] = True
    torch.manual_seed(settings.seed)
    teacher = VQGraphTeacher(data.x.shape[1], data.num_classes, hidden_dim=settings.hidden,
                             codebook_size=settings.codebook, dropout=settings.dropout)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    best: dict[str, Any] = {"val_accuracy": -1.0}
    for _ in range(settings.epochs):
        teacher.train()
        optimizer.zero_grad()
        out = teacher(data.x, data.edge_index)
        teacher_loss(out, data.x, data.adjacency, data.labels, label_mask=train_mask)["total"].backward()
        optimizer.step()
        teacher.eval()
        with torch.no_grad():
            logits = teacher(data.x, data.edge_index).logits
        val_accuracy = _accuracy(logits[val], data.labels[val])
        if val_accuracy > best["val_accuracy"]:
            best = {"val_accuracy": val_accuracy, "test_accuracy": _accuracy(logits[test], data.labels[test]),
                    "state": _state_copy(teacher)}
    teacher.load_state_dict(best.pop("state"))
    return teacher.eval(), best


def fit_graph_teacher(graphs: list, split: tuple[np.ndarray, ...], settings: FitSettings,
                      rng: np.random.Generator) -> tuple[VQGraphTeacher, dict[str, float]]:
    """MUTAG: the graph-level teacher of the best validation epoch and its accuracies; each epoch visits the
    training graphs in an order drawn from `rng`, `settings.batch_size` graphs per step."""
    train, val, test = split
    held_out = {"val": mutag_batch([graphs[i] for i in val]), "test": mutag_batch([graphs[i] for i in test])}
    torch.manual_seed(settings.seed)
    teacher = VQGraphTeacher(mutag_batch(graphs[:1])["x"].shape[1], 2, hidden_dim=settings.hidden,
                             codebook_size=settings.codebook, graph_level=True, pooling=settings.pooling,
                             dropout=settings.dropout)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    best: dict[str, Any] = {"val_accuracy": -1.0}

    def accuracy(part: str) -> float:
        batch = held_out[part]
        with torch.no_grad():
            return _accuracy(teacher_logits(teacher, batch["x"], batch["edge_index"], batch["batch"]),
                             batch["labels"])

    for _ in range(settings.epochs):
        teacher.train()
        order = rng.permutation(train)
        for start in range(0, len(order), settings.batch_size):
            batch = mutag_batch([graphs[i] for i in order[start:start + settings.batch_size]])
            optimizer.zero_grad()
            out = teacher(batch["x"], batch["edge_index"], batch["batch"])
            teacher_loss(out, batch["x"], batch["adjacency"], batch["labels"])["total"].backward()
            optimizer.step()
        teacher.eval()
        val_accuracy = accuracy("val")
        if val_accuracy > best["val_accuracy"]:
            best = {"val_accuracy": val_accuracy, "test_accuracy": accuracy("test"), "state": _state_copy(teacher)}
    teacher.load_state_dict(best.pop("state"))
    return teacher.eval(), best


def save_vqgraph_teacher(teacher: VQGraphTeacher, folder: str | Path, settings: FitSettings,
                         split: tuple[np.ndarray, ...], scores: dict[str, float]) -> Path:
    """Write weights and `vqgraph_teacher.json` (settings, sizes, split, scores) into `folder`, atomically."""
    from safetensors.torch import save_file

    from potstill.io import atomic_dir, atomic_write_json, safetensors_state

    spec = {"format": 1, **asdict(settings), "in_dim": teacher.feature_decoder.out_features,
            "num_classes": teacher.num_classes, "graph_level": teacher.graph_level,
            "split": {name: part.tolist() for name, part in zip(("train", "val", "test"), split, strict=True)},
            **scores}
    with atomic_dir(folder) as tmp:
        save_file(safetensors_state(teacher.state_dict()), str(tmp / WEIGHTS_FILE))
        atomic_write_json(tmp / SETTINGS_FILE, spec)
    return Path(folder)


def load_vqgraph_teacher(folder: str) -> VQGraphTeacher:
    """The teacher saved in `folder` by `python -m potstill.teachers.vqgraph` (factory for `teacher.factory`,
    kwargs {folder: ...}), frozen, in eval mode, with the saved json as `teacher.settings`."""
    from safetensors.torch import load_file

    from potstill.teachers.live import freeze

    root = Path(folder)
    if not (root / SETTINGS_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        raise UserError(f"field teacher.kwargs.folder: {root} is not a VQGraph teacher folder (expected "
                        f"{SETTINGS_FILE} and {WEIGHTS_FILE}; make one with `python -m potstill.teachers.vqgraph "
                        f"--out {root}`)")
    spec = json.loads((root / SETTINGS_FILE).read_text())
    teacher = VQGraphTeacher(spec["in_dim"], spec["num_classes"], hidden_dim=spec["hidden"],
                             codebook_size=spec["codebook"], graph_level=spec["graph_level"],
                             pooling=spec["pooling"], dropout=spec["dropout"])
    teacher.load_state_dict(load_file(str(root / WEIGHTS_FILE)))
    teacher.settings = spec
    return freeze(teacher)


def main(argv: list[str] | None = None) -> int:
    """Train the VQGraph teacher on the connectome (or MUTAG) and save it with its split."""
    parser = argparse.ArgumentParser(prog="python -m potstill.teachers.vqgraph", description=main.__doc__)
    parser.add_argument("--out", required=True, help="the teacher folder to write")
    parser.add_argument("--dataset", choices=GRAPH_DATASETS, default="connectome")
    parser.add_argument("--features", choices=CONNECTOME_FEATURES, default=None, help="connectome node features")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the teacher's weights")
    parser.add_argument("--epochs", type=int, default=None, help="default: 300 (connectome), 100 (MUTAG)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = FitSettings.for_dataset(args.dataset, features=args.features, seed=args.seed, epochs=args.epochs)
    if settings.dataset == "connectome":
        from potstill.data.graphs import connectome_tensors

        data = connectome_tensors(settings.features)
        split = stratified_split(data.labels.numpy(), NODE_FRACTIONS, settings.seed)
        teacher, scores = fit_node_teacher(data, split, settings)
    else:
        from potstill.assets_graph import mutag

        graphs = mutag()
        split = stratified_split(np.array([g.label for g in graphs]), GRAPH_FRACTIONS, settings.seed)
        teacher, scores = fit_graph_teacher(graphs, split, settings, np.random.default_rng(settings.seed))
    save_vqgraph_teacher(teacher, args.out, settings, split, scores)
    print(f"{args.out}: VQGraph teacher on {settings.dataset} saved (validation accuracy "
          f"{scores['val_accuracy']:.3f}, test accuracy {scores['test_accuracy']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
