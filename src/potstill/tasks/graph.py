"""Graph node classification, GNN → MLP: a graph-free student learns a GNN teacher's node outputs (GLNN, VQGraph).

The teacher is a frozen `potstill.teachers.vqgraph.VQGraphTeacher` saved with its data set, node features and
split (`python -m potstill.teachers.vqgraph --out DIR`, loaded by `load_vqgraph_teacher`); the graph is read
from `potstill.data.graphs`. Transductive: every node is a training record (a micro-batch is a batch of node
indices), the teacher's outputs on all nodes are distilled, the gold labels of the teacher's training nodes
only are seen (`trainer.hard_label_weight`), and the teacher's validation and test nodes are scored.

The teacher runs once, in setup, on the whole graph (it is frozen): its node logits, its pre-quantisation node
embeddings h and its codebook E; a batch gathers their rows. Both sides' signals are `GraphSignal`s (logits,
node vectors, and the teacher's codebook): logit objectives (`forward_kl` = GLNN's soft labels, ...) read the
logits (`on_logits`), `vqgraph_code_kl` (kind "graph", VQGraph's `soft_code_kl`) the node vectors against the
codebook. The student (`student.init: factory`, e.g. `potstill.students.graph_mlp:GraphMLP`, which returns
(hidden, logits)) sees one node's features at a time; `in_dim` and `num_classes` are filled in from the data when
its kwargs leave them out.

Metrics: `accuracy` and `agreement` (top-1 equal to the teacher's) on the test nodes, `val_accuracy` and
`val_agreement` on the validation nodes (for `trainer.early_stopping`). Speed: nodes/s of the student on the
nodes' features and of the teacher on each batch's 2-hop neighbourhood (`k_hop_subgraph`), interleaved.
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


class GraphTask(Task):
    signal_kind = "logits"
    extra_objective_kinds = ("graph",)
    captures_internals = False
    name = "graph"
    metric_names = ("accuracy", "agreement", "val_accuracy", "val_agreement")

    def setup(self, *, is_main: bool = True, barrier: Any = lambda: None) -> None:
        from potstill.data.graphs import connectome_tensors

        r = self.recipe
        self.teacher = load_factory_teacher(r.teacher).to(self.device)
        settings = getattr(self.teacher, "settings", None) or {}
        if "split" not in settings or "dataset" not in settings:
            raise UserError(f"field teacher.factory: {r.teacher.factory} gave a teacher without its data set and "
                            f"split; the graph task needs one saved by `python -m potstill.teachers.vqgraph --out DIR` "
                            f"(factory potstill.teachers.vqgraph:load_vqgraph_teacher)")
        if f"builtin:{settings['dataset']}" != r.data.train.path or settings.get("graph_level"):
            level = " (graph classification)" if settings.get("graph_level") else ""
            raise UserError(f"field data.train.path: {r.data.train.path}, but the teacher was trained on "
                            f"builtin:{settings['dataset']}{level}")
        self.graph = connectome_tensors(settings.get("features", "projection"))
        self.split = {name: torch.tensor(settings["split"][name], dtype=torch.long)
                      for name in ("train", "val", "test")}
        labels = self.graph.labels
        self.hard_labels = torch.full_like(labels, NO_LABEL)
        self.hard_labels[self.split["train"]] = labels[self.split["train"]]
        with torch.inference_mode():
            out = self.teacher(self.graph.x.to(self.device), self.graph.edge_index.to(self.device))
        self.teacher_outputs = GraphSignal(out.logits.float().cpu(), out.hidden.float().cpu(),
                                           self.teacher.codebook.codewords.float().cpu().clone())
        self.student_kwargs = self._student_kwargs()
        cfg = r.student.model_copy(update={"kwargs": self.student_kwargs})
        self.student = build_student(cfg, self.teacher, seed=r.seed).to(self.device)
        self._check_student()
        self.train_records = [{"i": n} for n in range(len(labels))]
        self.eval_records = [{"i": int(n), "eval": True} for n in torch.cat([self.split["val"], self.split["test"]])]

    def _student_kwargs(self) -> dict[str, Any]:
        """student.kwargs, plus in_dim / num_classes from the data when the factory takes them and they are not
        given."""
        from potstill.teachers.live import load_callable

        cfg = self.recipe.student
        kwargs = dict(cfg.kwargs)
        try:
            params = inspect.signature(load_callable(cfg.factory, field="student.factory")).parameters
        except (TypeError, ValueError):
            return kwargs
        for name, value in (("in_dim", self.graph.x.shape[1]), ("num_classes", self.graph.num_classes)):
            if name in params and name not in kwargs:
                kwargs[name] = int(value)
        return kwargs

    def _check_student(self) -> None:
        """One forward on two nodes: logits of the teacher's class count and, for vqgraph_code_kl, node vectors of
        the codebook's width; else a one-line error naming the field."""
        try:
            with torch.inference_mode():
                out = self._student_outputs(self.student, self.graph.x[:2].to(self.device))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise UserError(f"field student: the student does not take node features of width "
                            f"{self.graph.x.shape[1]} ({one_line(str(exc), 200)})") from None
        classes = self.graph.num_classes
        if out.logits.shape != (2, classes):
            raise UserError(f"field student: the student returned logits of shape {tuple(out.logits.shape)} for 2 "
                            f"nodes; expected (2, {classes}), the teacher's classes")
        width = self.teacher_outputs.hidden.shape[-1]
        reads_codes = any(OBJECTIVES[o.name].kind == "graph" for o in self.recipe.objectives)
        if reads_codes and (out.hidden is None or out.hidden.shape[-1] != width):
            got = "no node vectors" if out.hidden is None else f"node vectors of width {out.hidden.shape[-1]}"
            raise UserError(f"field student.kwargs.hidden_dim: vqgraph_code_kl compares the student's node vectors "
                            f"with the teacher's codebook of width {width}; the student gives {got} (return "
                            f"(hidden, logits) with hidden width {width})")

    def _student_outputs(self, model: nn.Module, x: torch.Tensor) -> GraphSignal:
        out = model(x)
        if isinstance(out, tuple):
            return GraphSignal(out[1], out[0])
        return GraphSignal(out, None)  # a logits-only student: no code loss

    # ---- batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        nodes = torch.tensor([rec["i"] for rec in records], dtype=torch.long)
        return {"x": self.graph.x[nodes], "nodes": nodes, "labels": self.hard_labels[nodes]}

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["nodes"].numel())

    def teacher_signal(self, batch: dict[str, Any]) -> GraphSignal:
        nodes, t = batch["nodes"].cpu(), self.teacher_outputs
        assert t.codebook is not None
        return GraphSignal(t.logits[nodes].to(self.device), t.hidden[nodes].to(self.device),
                           t.codebook.to(self.device))

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> GraphSignal:
        return self._student_outputs(model, batch["x"])

    def adapt_objective(self, name: str, fn: Any) -> Any:
        """Logit objectives read the `logits` of the two `GraphSignal`s."""
        if OBJECTIVES[name].kind != "logits":
            return fn
        from potstill.tasks.vision_language_objectives import on_logits

        return on_logits(fn, stateful=OBJECTIVES[name].stateful)

    def hard_label_loss(self, student_signal: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Summed cross-entropy on the teacher's training nodes of the batch (0, attached, when it has none)."""
        logits = student_signal.logits if isinstance(student_signal, GraphSignal) else student_signal
        labels = batch["labels"].to(logits.device)
        if not bool((labels != NO_LABEL).any()):
            return logits.float().sum() * 0.0
        return nn.functional.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=NO_LABEL)

    # ---- evaluation
    def node_logits(self, model: nn.Module) -> torch.Tensor:
        """The student's logits (float32, CPU) on every node, in eval mode."""
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            logits = self._student_outputs(model, self.graph.x.to(self.device)).logits.float().cpu()
        model.train(was_training)
        return logits

    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        teacher = self.teacher_outputs.logits
        logits = teacher if role == "teacher" else self.node_logits(model)
        predicted, teacher_predicted = logits.argmax(-1), teacher.argmax(-1)
        metrics = {}
        for prefix, part in (("", "test"), ("val_", "val")):
            nodes = self.split[part]
            metrics[f"{prefix}accuracy"] = float((predicted[nodes] == self.graph.labels[nodes]).float().mean())
            metrics[f"{prefix}agreement"] = float((predicted[nodes] == teacher_predicted[nodes]).float().mean())
        return metrics

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        """Nodes/s: the student on a batch's features, the teacher on the batch's 2-hop neighbourhood."""
        from torch_geometric.utils import k_hop_subgraph

        from potstill.teachers.vqgraph import teacher_logits

        x, edge_index = self.graph.x.to(self.device), self.graph.edge_index.to(self.device)

        def runner(model: nn.Module) -> Any:
            if model is self.teacher:
                def gnn(chunk: list[int]) -> torch.Tensor:
                    nodes, edges, mapping, _ = k_hop_subgraph(torch.tensor(chunk, device=self.device), 2, edge_index,
                                                              relabel_nodes=True, num_nodes=len(x))
                    return teacher_logits(model, x[nodes], edges)[mapping]

                return gnn
            return lambda chunk: self._student_outputs(model, x[torch.tensor(chunk, device=self.device)]).logits

        return self.compare_speed(student, list(range(len(x))), runner, unit="nodes_per_s",
                                  batch_size=self.recipe.eval.batch_size)

    # ---- output
    def save_student(self, model: nn.Module, path: Path) -> None:
        from potstill.students.save import save_factory_student

        settings = getattr(self.teacher, "settings", {})
        save_factory_student(model, path, factory=self.recipe.student.factory, kwargs=self.student_kwargs,
                             extra={"graph": self.recipe.data.train.path, "features": settings.get("features")})
