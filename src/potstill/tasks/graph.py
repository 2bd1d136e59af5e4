"""Graph classification, GNN → MLP: a graph-free student learns a GNN teacher's outputs (GLNN, VQGraph), on the
nodes of one graph (the connectome) or on whole graphs (MUTAG).

The teacher is a frozen `potstill.teachers.vqgraph.VQGraphTeacher` saved with its data set, node features and
split (`python -m potstill.teachers.vqgraph --out DIR [--dataset mutag]`, loaded by `load_vqgraph_teacher`); the
data are read by `potstill.data.graphs.graph_items`. Nodes are transductive: every node is a training record,
the teacher's outputs on all of them are distilled, the gold labels of the teacher's training nodes only are
seen (`trainer.hard_label_weight`). Graphs are inductive: the training graphs are the records. A micro-batch is
a batch of item (node or graph) indices with the nodes they hold.

The teacher runs once, in setup, on all nodes (it is frozen; a graph set as one disjoint union): its logits per
item, its pre-quantisation node embeddings h and its codebook E; a batch gathers their rows. Both sides' signals
are `GraphSignal`s (logits, node vectors, and the teacher's codebook): logit objectives (`forward_kl` = GLNN's
soft labels, ...) read the logits (`on_logits`), `vqgraph_code_kl` (kind "graph", VQGraph's `soft_code_kl`) the
node vectors against the codebook; for graphs its per-node values are averaged within each graph first
(`PerGraphMean`), so every graph counts once. The student (`student.init: factory`, e.g.
`potstill.students.graph_mlp:GraphMLP`, which returns (hidden, logits)) sees node features only; `in_dim`,
`num_classes` and `graph_level` are filled in from the data when its kwargs leave them out.

Metrics: `accuracy` and `agreement` (top-1 equal to the teacher's) on the test items, `val_accuracy` and
`val_agreement` on the validation items (for `trainer.early_stopping`). Speed, interleaved: nodes/s of the
student on the nodes' features and of the teacher on each batch's 2-hop neighbourhood (`k_hop_subgraph`); for
graphs, graphs/s of both on batches of whole graphs.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.errors import UserError, one_line
from potstill.losses import OBJECTIVES
from potstill.signals import GraphSignal
from potstill.tasks.base import Task
from potstill.tasks.models import build_student, load_factory_teacher

NO_LABEL = -100


class PerGraphMean(nn.Module):
    """A node-level objective (`reduction="none"` gives one value per node) averaged within each graph of the
    batch, then reduced over the graphs; the batch's node-to-graph index arrives as `graph_of`."""

    batch_fields = {"graph_of": "graph_of"}

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, student: Any, teacher: Any, *, graph_of: torch.Tensor, mask: torch.Tensor | None = None,
                reduction: str = "mean", **params: Any) -> torch.Tensor:
        from potstill.teachers.vqgraph import pool_per_graph

        per_node = self.fn(student, teacher, reduction="none", **params)
        graph_of = graph_of.to(per_node.device)
        per_graph = pool_per_graph(per_node.unsqueeze(-1), graph_of, int(graph_of.max()) + 1).squeeze(-1)
        return per_graph.sum() if reduction == "sum" else per_graph.mean()


class GraphTask(Task):
    signal_kind = "logits"
    extra_objective_kinds = ("graph",)
    captures_internals = False
    name = "graph"
    metric_names = ("accuracy", "agreement", "val_accuracy", "val_agreement")
    export_kind = "logits"  # potstill export: `x` (nodes, F) [+ `graph_of` (nodes,)] → logits per node [per graph]

    def setup(self, *, is_main: bool = True, barrier: Any = lambda: None) -> None:
        from potstill.data.graphs import graph_items

        r = self.recipe
        self.teacher = load_factory_teacher(r.teacher).to(self.device)
        settings = getattr(self.teacher, "settings", None) or {}
        if "split" not in settings or "dataset" not in settings:
            raise UserError(f"field teacher.factory: {r.teacher.factory} gave a teacher without its data set and "
                            f"split; the graph task needs one saved by `python -m potstill.teachers.vqgraph --out DIR` "
                            f"(factory potstill.teachers.vqgraph:load_vqgraph_teacher)")
        if f"builtin:{settings['dataset']}" != r.data.train.path:
            raise UserError(f"field data.train.path: {r.data.train.path}, but the teacher was trained on "
                            f"builtin:{settings['dataset']}")
        self.items = graph_items(settings["dataset"], settings.get("features", "projection"))
        self.split = {name: torch.tensor(settings["split"][name], dtype=torch.long)
                      for name in ("train", "val", "test")}
        labels = self.items.labels
        self.hard_labels = torch.full_like(labels, NO_LABEL)
        self.hard_labels[self.split["train"]] = labels[self.split["train"]]
        with torch.inference_mode():
            out = self.teacher(*self._all_nodes())
        self.teacher_outputs = GraphSignal(out.logits.float().cpu(), out.hidden.float().cpu(),
                                           self.teacher.codebook.codewords.float().cpu().clone())
        self.student_kwargs = self._student_kwargs()
        cfg = r.student.model_copy(update={"kwargs": self.student_kwargs})
        self.student = build_student(cfg, self.teacher, seed=r.seed).to(self.device)
        self._check_student()
        train = range(len(labels)) if not self.items.graph_level else self.split["train"].tolist()
        self.train_records = [{"i": int(i)} for i in train]
        self.eval_records = [{"i": int(i), "eval": True} for i in torch.cat([self.split["val"], self.split["test"]])]

    def _all_nodes(self) -> tuple[torch.Tensor, ...]:
        """(x, edge_index[, graph_of]) of every node, on the device: the teacher's inputs."""
        parts = (self.items.x, self.items.edge_index) + ((self.items.graph_of,) if self.items.graph_level else ())
        return tuple(t.to(self.device) for t in parts)

    def _student_kwargs(self) -> dict[str, Any]:
        """student.kwargs, plus in_dim / num_classes / graph_level from the data when the factory takes them and
        they are not given."""
        from potstill.teachers.live import load_callable

        cfg = self.recipe.student
        kwargs = dict(cfg.kwargs)
        try:
            params = inspect.signature(load_callable(cfg.factory, field="student.factory")).parameters
        except (TypeError, ValueError):
            return kwargs
        for name, value in (("in_dim", int(self.items.x.shape[1])), ("num_classes", self.items.num_classes),
                            ("graph_level", self.items.graph_level)):
            if name in params and name not in kwargs:
                kwargs[name] = value
        return kwargs

    def _check_student(self) -> None:
        """One forward on two items: logits of the teacher's class count and, for vqgraph_code_kl, node vectors of
        the codebook's width; else a one-line error naming the field."""
        probe = self.collate([{"i": 0}, {"i": 1}], [0, 1])
        try:
            with torch.inference_mode():
                out = self.student_signal(self.student, self.to_device(probe))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise UserError(f"field student: the student does not take node features of width "
                            f"{self.items.x.shape[1]} ({one_line(str(exc), 200)})") from None
        classes, what = self.items.num_classes, "graphs" if self.items.graph_level else "nodes"
        if out.logits.shape != (2, classes):
            raise UserError(f"field student: the student returned logits of shape {tuple(out.logits.shape)} for 2 "
                            f"{what}; expected (2, {classes}), the teacher's classes")
        width = self.teacher_outputs.hidden.shape[-1]
        reads_codes = any(OBJECTIVES[o.name].kind == "graph" for o in self.recipe.objectives)
        if reads_codes and (out.hidden is None or out.hidden.shape[-1] != width):
            got = "no node vectors" if out.hidden is None else f"node vectors of width {out.hidden.shape[-1]}"
            raise UserError(f"field student.kwargs.hidden_dim: vqgraph_code_kl compares the student's node vectors "
                            f"with the teacher's codebook of width {width}; the student gives {got} (return "
                            f"(hidden, logits) with hidden width {width})")

    def _student_outputs(self, model: nn.Module, x: torch.Tensor, graph_of: torch.Tensor | None) -> GraphSignal:
        out = model(x) if graph_of is None else model(x, graph_of)
        if isinstance(out, tuple):
            return GraphSignal(out[1], out[0])
        return GraphSignal(out, None)  # a logits-only student: no code loss

    # ---- batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        """The items (nodes or graphs) of `records` with their nodes' features; for graphs also each node's
        graph within the batch (`graph_of`). Labels: the teacher's training labels only, but every label of the
        held-out items of `eval_records` (scored by `potstill export`)."""
        items = torch.tensor([rec["i"] for rec in records], dtype=torch.long)
        held_out = torch.tensor([bool(rec.get("eval")) for rec in records])
        nodes, owner = self.items.nodes_of(items)
        labels = torch.where(held_out, self.items.labels[items], self.hard_labels[items])
        batch = {"x": self.items.x[nodes], "items": items, "nodes": nodes, "labels": labels}
        if self.items.graph_level:
            batch["graph_of"] = owner
        return batch

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["items"].numel())

    def teacher_signal(self, batch: dict[str, Any]) -> GraphSignal:
        t = self.teacher_outputs
        assert t.codebook is not None and t.hidden is not None
        logits, hidden = t.logits[batch["items"].cpu()], t.hidden[batch["nodes"].cpu()]
        return GraphSignal(logits.to(self.device), hidden.to(self.device), t.codebook.to(self.device))

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> GraphSignal:
        return self._student_outputs(model, batch["x"], batch.get("graph_of"))

    def adapt_objective(self, name: str, fn: Any) -> Any:
        """Logit objectives read the `logits` of the two `GraphSignal`s; for graphs, node objectives are averaged
        within each graph."""
        if OBJECTIVES[name].kind == "graph":
            return PerGraphMean(fn) if self.recipe.data.train.graph_level else fn
        if OBJECTIVES[name].kind != "logits":
            return fn
        from potstill.tasks.vision_language_objectives import on_logits

        return on_logits(fn, stateful=OBJECTIVES[name].stateful)

    def hard_label_loss(self, student_signal: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Summed cross-entropy on the batch's items among the teacher's training items (0, attached, when it has
        none)."""
        logits = student_signal.logits if isinstance(student_signal, GraphSignal) else student_signal
        labels = batch["labels"].to(logits.device)
        if not bool((labels != NO_LABEL).any()):
            return logits.float().sum() * 0.0
        return nn.functional.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=NO_LABEL)

    def export_inputs(self, batch: dict[str, Any]) -> dict[str, dict[int, str]]:
        """Node features `x`; for graphs also `graph_of`, each node's graph (0..G-1) in the batch: G graphs in."""
        if self.items.graph_level:
            return {"x": {0: "nodes"}, "graph_of": {0: "nodes"}}
        return {"x": {0: "nodes"}}

    def export_output(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self._student_outputs(model, batch["x"], batch.get("graph_of")).logits

    # ---- evaluation
    def item_logits(self, model: nn.Module) -> torch.Tensor:
        """The student's logits (float32, CPU) on every item, in eval mode."""
        was_training = model.training
        model.eval()
        x, _, *graph_of = self._all_nodes()
        with torch.inference_mode():
            logits = self._student_outputs(model, x, graph_of[0] if graph_of else None).logits.float().cpu()
        model.train(was_training)
        return logits

    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        teacher = self.teacher_outputs.logits
        logits = teacher if role == "teacher" else self.item_logits(model)
        predicted, teacher_predicted = logits.argmax(-1), teacher.argmax(-1)
        metrics = {}
        for prefix, part in (("", "test"), ("val_", "val")):
            items = self.split[part]
            metrics[f"{prefix}accuracy"] = float((predicted[items] == self.items.labels[items]).float().mean())
            metrics[f"{prefix}agreement"] = float((predicted[items] == teacher_predicted[items]).float().mean())
        return metrics

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        """Items/s of teacher and student: nodes (the teacher on each batch's 2-hop neighbourhood, the student on
        the batch's features) or whole graphs (both on the batch's graphs)."""
        from potstill.teachers.vqgraph import teacher_logits

        if self.items.graph_level:
            def graph_runner(model: nn.Module) -> Any:
                def run(chunk: list[int]) -> torch.Tensor:
                    batch = self.to_device(self.collate([{"i": i} for i in chunk], chunk))
                    if model is self.teacher:
                        edges = self._edges_of(batch["nodes"])
                        return teacher_logits(model, batch["x"], edges, batch["graph_of"])
                    return self._student_outputs(model, batch["x"], batch["graph_of"]).logits

                return run

            return self.compare_speed(student, list(range(len(self.items.labels))), graph_runner,
                                      unit="graphs_per_s", batch_size=self.recipe.eval.batch_size)
        from torch_geometric.utils import k_hop_subgraph

        x, edge_index = self._all_nodes()

        def runner(model: nn.Module) -> Any:
            if model is self.teacher:
                def gnn(chunk: list[int]) -> torch.Tensor:
                    nodes, edges, mapping, _ = k_hop_subgraph(torch.tensor(chunk, device=self.device), 2, edge_index,
                                                              relabel_nodes=True, num_nodes=len(x))
                    return teacher_logits(model, x[nodes], edges)[mapping]

                return gnn
            return lambda chunk: self._student_outputs(model, x[torch.tensor(chunk, device=self.device)], None).logits

        return self.compare_speed(student, list(range(len(x))), runner, unit="nodes_per_s",
                                  batch_size=self.recipe.eval.batch_size)

    def _edges_of(self, nodes: torch.Tensor) -> torch.Tensor:
        """The edges among `nodes` (whole graphs), renumbered to their positions in `nodes`."""
        position = torch.full((len(self.items.x),), -1, dtype=torch.long, device=nodes.device)
        position[nodes] = torch.arange(len(nodes), device=nodes.device)
        edges = position[self.items.edge_index.to(nodes.device)]
        return edges[:, (edges >= 0).all(0)]

    # ---- output
    def save_student(self, model: nn.Module, path: Path) -> None:
        from potstill.students.save import save_factory_student

        settings = getattr(self.teacher, "settings", {})
        save_factory_student(model, path, factory=self.recipe.student.factory, kwargs=self.student_kwargs,
                             extra={"data": self.recipe.data.train.path, "features": settings.get("features")})
