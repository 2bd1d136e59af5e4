"""VQGraph vs GLNN vs a plain MLP, GNN → MLP, on offline graph data (issue #20 §6).

Node classification: the Drosophila larva's left mushroom-body connectome (209 neurons, 4 cell types; graspologic's
bundled copy). The connectome has no node attributes. Default node features (`--features projection`): each
node's own synapse counts to and from every neuron, log(1 + x), projected to 16 dimensions by a fixed Gaussian
matrix (`potstill.assets_graph.connectivity_projection`), the analogue of a citation graph's bag-of-words.
`--features local`: eight local statistics (`connectome_node_features`: degrees, synapse counts, reciprocity,
self-loops), with which the plain MLP is already at the teacher's accuracy. The graph (edges in either direction)
carries the rest. Split per seed, stratified: 40 % train / 20 % validation / 40 % test, transductive (teachers and
students see every node's features; labels only of the training nodes).

Graph classification: MUTAG (188 molecules; grakel's bundled TU files), one-hot atom types as node features,
stratified 60 / 20 / 20 split per seed, mini-batches of 32 graphs; no dropout (`--graph-dropout`), since dropping
a one-hot input erases the atom's type.

Per seed, with model selection on validation accuracy (the test accuracy at the best validation epoch):
- GNN teacher: `potstill.teachers.vqgraph.VQGraphTeacher` (GraphSAGE + EMA codebook + reconstructions) trained
  with `teacher_loss`;
- MLP: `potstill.students.graph_mlp.GraphMLP` on the labels alone;
- GLNN: the same MLP with `soft_label_loss` (λ_h · CE on training labels + (1 − λ_h) · KL to the teacher's
  class probabilities, on every node / graph);
- VQGraph: GLNN's loss + λ_tok · `soft_code_kl` (the teacher's soft code assignments, τ = 4) on every node;
  λ_tok = 0.01 (a 4-seed sweep of 0.001, 0.01, 0.1, 1 on the connectome: larger values only lowered accuracy).
Inference speed: nodes per second of the MLP (features of a batch of nodes) and of the GNN (the 2-hop
neighbourhood of the batch cut out with `k_hop_subgraph`, then the teacher's logits), interleaved with
`potstill.eval.speed.compare_throughput`, one thread.

The teachers are trained by `potstill.teachers.vqgraph` (`fit_node_teacher`, `fit_graph_teacher`: what
`python -m potstill.teachers.vqgraph` saves for the `graph` task's recipes); the students here in this script's
own loop (the recipes `connectome-vqgraph` and `mutag-vqgraph` train them through `potstill run`).

Usage: python benchmarks/vqgraph.py [--seeds 0 1 2] [--tasks node graph] [--features projection|local]
       [--graph-pooling mean|sum] [--token-weight 0.01] [--label-weight 0] [--out vqgraph.json]
Needs the graph extra (`make venv` installs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from potstill.assets_graph import mutag
from potstill.data.graphs import NodeTensors, connectome_tensors, mutag_batch, stratified_split
from potstill.eval.speed import compare_throughput
from potstill.losses.vqgraph import soft_code_kl, soft_label_loss
from potstill.students.graph_mlp import GraphMLP
from potstill.teachers.vqgraph import (
    GRAPH_FRACTIONS,
    NODE_FRACTIONS,
    FitSettings,
    VQGraphTeacher,
    fit_graph_teacher,
    fit_node_teacher,
    teacher_logits,
)

METHODS = ("teacher", "mlp", "glnn", "vqgraph")


def best_on_validation(epochs: int, step: Callable[[], None], score: Callable[[], tuple[float, float]]) -> float:
    """Run `step` `epochs` times; return the test score at the epoch of the best validation score."""
    best_val, best_test = -1.0, 0.0
    for _ in range(epochs):
        step()
        val, test = score()
        if val > best_val:
            best_val, best_test = val, test
    return best_test


def teacher_settings(dataset: str, seed: int, args: argparse.Namespace) -> FitSettings:
    """The teacher's training settings (`potstill.teachers.vqgraph`, shared with `python -m
    potstill.teachers.vqgraph`) with this run's arguments."""
    if dataset == "connectome":
        return FitSettings.for_dataset(dataset, features=args.features, seed=seed, epochs=args.epochs,
                                       hidden=args.hidden, codebook=args.codebook, lr=args.lr)
    return FitSettings.for_dataset(dataset, seed=seed, epochs=args.graph_epochs, hidden=args.hidden,
                                   codebook=args.codebook, lr=args.lr, pooling=args.graph_pooling,
                                   dropout=args.graph_dropout)


# ---------------------------------------------------------------- node classification (Drosophila)

def run_node_seed(data: NodeTensors, seed: int, args: argparse.Namespace) -> dict[str, float]:
    x, edge_index, labels = data.x, data.edge_index, data.labels
    split = stratified_split(labels.numpy(), NODE_FRACTIONS, seed)
    train, val, test = (torch.from_numpy(i) for i in split)
    train_mask = torch.zeros(len(x), dtype=torch.bool)
    train_mask[train] = True

    def accuracy(logits: torch.Tensor, idx: torch.Tensor) -> float:
        return float((logits[idx].argmax(-1) == labels[idx]).float().mean())

    teacher, scores = fit_node_teacher(data, split, teacher_settings("connectome", seed, args))
    with torch.no_grad():  # the teacher of the best validation epoch, in eval mode, is what is distilled
        out = teacher(x, edge_index)
    best = {"logits": out.logits, "hidden": out.hidden, "codebook": teacher.codebook.codewords.clone()}
    results = {"teacher": scores["test_accuracy"]}
    hard = torch.where(train_mask, labels, torch.full_like(labels, -100))

    for method in ("mlp", "glnn", "vqgraph"):
        torch.manual_seed(seed)
        student = GraphMLP(x.shape[1], data.num_classes, hidden_dim=args.hidden)
        s_opt = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=5e-4)

        def student_step(method: str = method, student: GraphMLP = student, s_opt=s_opt) -> None:
            student.train()
            s_opt.zero_grad()
            hidden, logits = student(x)
            if method == "mlp":
                loss = torch.nn.functional.cross_entropy(logits[train], labels[train])
            else:
                loss = soft_label_loss(logits, best["logits"], hard, label_weight=args.label_weight)
            if method == "vqgraph":
                loss = loss + args.token_weight * soft_code_kl(hidden, best["hidden"], best["codebook"],
                                                               temperature=args.temperature)
            loss.backward()
            s_opt.step()

        def student_score(student: GraphMLP = student) -> tuple[float, float]:
            student.eval()
            with torch.no_grad():
                logits = student(x)[1]
            return accuracy(logits, val), accuracy(logits, test)

        results[method] = best_on_validation(args.epochs, student_step, student_score)
        if method == "vqgraph":
            results["speedup"] = node_speedup(teacher, student, data)
    return results


def node_speedup(teacher: VQGraphTeacher, student: GraphMLP, data: NodeTensors) -> float:
    from torch_geometric.utils import k_hop_subgraph

    x, edge_index = data.x, data.edge_index

    def gnn(batch: list[int]) -> torch.Tensor:
        nodes, sub_edges, mapping, _ = k_hop_subgraph(torch.tensor(batch), 2, edge_index, relabel_nodes=True,
                                                      num_nodes=len(x))
        return teacher_logits(teacher, x[nodes], sub_edges)[mapping]

    def mlp(batch: list[int]) -> torch.Tensor:
        return student(x[torch.tensor(batch)])[1]

    student.eval()
    rates = compare_throughput({"gnn": gnn, "mlp": mlp}, list(range(len(x))), batch_size=32, rounds=3)
    return rates["mlp"] / rates["gnn"]


# ---------------------------------------------------------------- graph classification (MUTAG)

def run_graph_seed(graphs: list, seed: int, args: argparse.Namespace) -> dict[str, float]:
    labels = np.array([g.label for g in graphs])
    split = stratified_split(labels, GRAPH_FRACTIONS, seed)
    train, val, test = split
    val_batch = mutag_batch([graphs[i] for i in val])
    test_batch = mutag_batch([graphs[i] for i in test])
    rng = np.random.default_rng(seed)  # the order of the training graphs, teacher's epochs first

    def train_batches() -> list[dict[str, torch.Tensor]]:
        order = rng.permutation(train)
        return [mutag_batch([graphs[i] for i in order[s:s + 32]]) for s in range(0, len(order), 32)]

    def accuracy(model: torch.nn.Module, batch: dict, is_teacher: bool) -> float:
        model.eval()
        with torch.no_grad():
            if is_teacher:
                logits = teacher_logits(model, batch["x"], batch["edge_index"], batch["batch"])
            else:
                logits = model(batch["x"], batch["batch"])[1]
        return float((logits.argmax(-1) == batch["labels"]).float().mean())

    teacher, scores = fit_graph_teacher(graphs, split, teacher_settings("mutag", seed, args), rng)
    results = {"teacher": scores["test_accuracy"]}

    for method in ("mlp", "glnn", "vqgraph"):
        torch.manual_seed(seed)
        student = GraphMLP(7, 2, hidden_dim=args.hidden, graph_level=True, pooling=args.graph_pooling,
                           dropout=args.graph_dropout)
        s_opt = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=5e-4)

        def student_step(method: str = method, student: GraphMLP = student, s_opt=s_opt) -> None:
            student.train()
            for batch in train_batches():
                s_opt.zero_grad()
                hidden, logits = student(batch["x"], batch["batch"])
                if method == "mlp":
                    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
                else:
                    with torch.no_grad():
                        out = teacher(batch["x"], batch["edge_index"], batch["batch"])
                    loss = soft_label_loss(logits, out.logits, batch["labels"], label_weight=args.label_weight)
                    if method == "vqgraph":
                        loss = loss + args.token_weight * soft_code_kl(
                            hidden, out.hidden, teacher.codebook.codewords, temperature=args.temperature)
                loss.backward()
                s_opt.step()

        def student_score(student: GraphMLP = student) -> tuple[float, float]:
            return accuracy(student, val_batch, False), accuracy(student, test_batch, False)

        results[method] = best_on_validation(args.graph_epochs, student_step, student_score)
    return results


# ---------------------------------------------------------------- report

def summarise(rows: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    out = {}
    for key in keys:
        values = [r[key] for r in rows]
        out[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=300, help="full-batch epochs on the connectome")
    parser.add_argument("--graph-epochs", type=int, default=100, help="epochs over the MUTAG training graphs")
    parser.add_argument("--hidden", type=int, default=64, help="GNN / MLP hidden width = codebook dimension")
    parser.add_argument("--codebook", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--label-weight", type=float, default=0.0, help="λ_h of the soft-label loss")
    parser.add_argument("--token-weight", type=float, default=0.01, help="λ_tok of the code loss")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--features", choices=("projection", "local"), default="projection",
                        help="connectome node features: projected connectivity or eight local statistics")
    parser.add_argument("--tasks", nargs="+", choices=("node", "graph"), default=["node", "graph"])
    parser.add_argument("--graph-dropout", type=float, default=0.0, help="dropout of the MUTAG teacher and MLP")
    parser.add_argument("--graph-pooling", choices=("mean", "sum"), default="mean", help="MUTAG readout")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    node_rows = []
    data = connectome_tensors(args.features) if "node" in args.tasks else None
    for seed in args.seeds if data is not None else []:
        node_rows.append(run_node_seed(data, seed, args))
        print(f"drosophila seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in node_rows[-1].items()), flush=True)
    graph_rows = []
    if "graph" in args.tasks:
        graphs = mutag()
        for seed in args.seeds:
            graph_rows.append(run_graph_seed(graphs, seed, args))
            print(f"mutag seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in graph_rows[-1].items()), flush=True)
    seconds = time.perf_counter() - started

    print(f"\n{seconds:.0f} s in all; test accuracy, mean ± sd over seeds {args.seeds}")
    if node_rows:
        node = summarise(node_rows, (*METHODS, "speedup"))
        print(f"\nDrosophila left ({args.features} features)\n| model | accuracy |\n|---|---|")
        for key in METHODS:
            print(f"| {key} | {node[key][0]:.3f} ± {node[key][1]:.3f} |")
        print(f"| MLP speed-up over the GNN (nodes/s, batch 32) | {node['speedup'][0]:.1f}× ± "
              f"{node['speedup'][1]:.1f} |")
    if graph_rows:
        graph = summarise(graph_rows, METHODS)
        print("\nMUTAG (test accuracy)\n| model | accuracy |\n|---|---|")
        for key in METHODS:
            print(f"| {key} | {graph[key][0]:.3f} ± {graph[key][1]:.3f} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "node": node_rows,
                                        "graph": graph_rows, "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
