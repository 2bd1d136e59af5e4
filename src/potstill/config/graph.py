"""The recipe of `task: graph`: node classification on a graph the teacher was trained on (GNN → MLP, VQGraph /
GLNN).

The graph is a builtin (`builtin:connectome`, read by `potstill.data.graphs`); its node features and its
train / validation / test split are the teacher's, saved with it by `python -m potstill.teachers.vqgraph` and read
from the loaded teacher (`teacher.factory: potstill.teachers.vqgraph:load_vqgraph_teacher`), so the student is
scored on the nodes the teacher held out. The task is transductive: `data.eval` is the same graph (its
validation and test nodes), and defaults to `data.train`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from potstill.config.common import (
    DataConfig,
    DataSource,
    EvalConfig,
    NoDomains,
    NoTopKCache,
    RecipeBase,
    StudentConfig,
    TeacherConfig,
)

GRAPH_SOURCES = ("builtin:connectome",)


class GraphSource(DataSource):
    """The graph: `builtin:connectome` (the Drosophila larva's left mushroom body, 209 neurons, 4 cell types)."""

    @field_validator("path")
    @classmethod
    def _known_graph(cls, path: str) -> str:
        if path not in GRAPH_SOURCES:
            hint = (" (graph classification on MUTAG is not built into the graph task yet: see "
                    "benchmarks/vqgraph.py)" if path == "builtin:mutag" else "")
            raise ValueError(f"the graph task reads {', '.join(GRAPH_SOURCES)}, got {path!r}{hint}")
        return path

    @model_validator(mode="after")
    def _whole_graph(self) -> GraphSource:
        extra = [name for name in ("split", "limit") if getattr(self, name) is not None]
        if extra or self.columns:
            raise ValueError(f"{', '.join(extra + (['columns'] if self.columns else []))}: not read by the graph task "
                             f"(the split is the teacher's, saved with it)")
        return self


class GraphData(NoDomains, DataConfig):
    """The graph task's data: one graph, its nodes split as the teacher's were."""

    train: GraphSource = Field(description="the graph, builtin:connectome; every node is a training record (the "
                               "teacher's outputs on all of them are distilled, labels only of its training nodes)")
    eval: GraphSource | None = Field(None, description="the same graph (transductive: its validation and test nodes "
                                     "are scored); default: data.train")

    @model_validator(mode="before")
    @classmethod
    def _eval_is_the_graph(cls, value: Any) -> Any:
        if not isinstance(value, dict) or value.get("eval") is not None:
            return value
        train = value.get("train")
        path = train.get("path") if isinstance(train, dict) else train
        return {**value, "eval": train} if path in GRAPH_SOURCES else value  # a wrong train is reported once

    @model_validator(mode="after")
    def _one_graph(self) -> GraphData:
        if self.eval is not None and self.eval.path != self.train.path:
            raise ValueError(f"data.eval is {self.eval.path} but data.train is {self.train.path}: node classification "
                             f"here is transductive, on one graph")
        return self


class GraphTeacherConfig(NoTopKCache, TeacherConfig):
    """A graph teacher saved with its split: factory potstill.teachers.vqgraph:load_vqgraph_teacher, kwargs
    {folder: <what python -m potstill.teachers.vqgraph --out wrote>}."""


class GraphEvalConfig(EvalConfig):
    batch_size: int = Field(32, ge=1, description="nodes per batch in the teacher / student throughput comparison "
                            "(evaluation scores the whole graph at once)")


class GraphRecipe(RecipeBase):
    """task: graph: a graph-free student (an MLP on each node's own features) distilled from a GNN teacher on its
    node logits (GLNN) and its soft code assignments (VQGraph's vqgraph_code_kl)."""

    task: Literal["graph"]
    teacher: GraphTeacherConfig = Field(default_factory=GraphTeacherConfig, description="the teacher model")
    student: StudentConfig = Field(description="how the student is built: init factory, e.g. "
                                   "potstill.students.graph_mlp:GraphMLP (in_dim and num_classes filled in from the "
                                   "data when not given)")
    data: GraphData
    eval: GraphEvalConfig = Field(default_factory=GraphEvalConfig)

    def check(self) -> None:
        self.check_loss()
        if self.teacher.factory is None:
            raise ValueError("the graph task's teacher is a factory saved with its split: teacher.factory "
                             "potstill.teachers.vqgraph:load_vqgraph_teacher with kwargs {folder: ...}")
        if self.student.init != "factory":
            raise ValueError(f"student.init is {self.student.init!r}; the graph task builds its student with init "
                             f"factory (e.g. potstill.students.graph_mlp:GraphMLP)")
        if self.data.prune is not None:
            raise ValueError("data.prune is not read by the graph task (the training nodes are the teacher's split)")
