"""The recipe of `task: graph`: node or graph classification on the data the teacher was trained on (GNN → MLP,
VQGraph / GLNN).

The data are a builtin (`builtin:connectome`: its nodes; `builtin:mutag`: its graphs; read by
`potstill.data.graphs`); the node features and the train / validation / test split are the teacher's, saved with
it by `python -m potstill.teachers.vqgraph` and read from the loaded teacher (`teacher.factory:
potstill.teachers.vqgraph:load_vqgraph_teacher`), so the student is scored on the items the teacher held out.
`data.eval` is therefore the same data (its validation and test items), and defaults to `data.train`.
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
from potstill.config.paths import DataPath

GRAPH_SOURCES = ("builtin:connectome", "builtin:mutag")
GRAPH_LEVEL_SOURCES = ("builtin:mutag",)  # whole graphs are the items (else: the nodes of one graph)


class GraphSource(DataSource):
    """The graph data: `builtin:connectome` (nodes: the Drosophila larva's left mushroom body, 209 neurons, 4 cell
    types) or `builtin:mutag` (graphs: 188 molecules, mutagenic or not)."""

    path: DataPath = Field(description="builtin:connectome (its nodes are classified) or builtin:mutag (its graphs)")

    @field_validator("path")
    @classmethod
    def _known_graph(cls, path: str) -> str:
        if path not in GRAPH_SOURCES:
            raise ValueError(f"the graph task reads {' or '.join(GRAPH_SOURCES)}, got {path!r}")
        return path

    @property
    def graph_level(self) -> bool:
        """Whether the items classified are whole graphs (MUTAG) rather than nodes."""
        return self.path in GRAPH_LEVEL_SOURCES

    @model_validator(mode="after")
    def _whole_graph(self) -> GraphSource:
        extra = [name for name in ("split", "limit") if getattr(self, name) is not None]
        if extra or self.columns:
            raise ValueError(f"{', '.join(extra + (['columns'] if self.columns else []))}: not read by the graph task "
                             f"(the split is the teacher's, saved with it)")
        return self


class GraphData(NoDomains, DataConfig):
    """The graph task's data: one data set, its items split as the teacher's were."""

    train: GraphSource = Field(description="builtin:connectome (every node is a training record: the teacher's "
                               "outputs on all of them are distilled, labels only of its training nodes) or "
                               "builtin:mutag (the teacher's training graphs are the records)")
    eval: GraphSource | None = Field(None, description="the same data (its validation and test items are scored); "
                                     "default: data.train")

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
            raise ValueError(f"data.eval is {self.eval.path} but data.train is {self.train.path}: the held-out items "
                             f"are the teacher's, in the same data")
        return self


class GraphTeacherConfig(NoTopKCache, TeacherConfig):
    """A graph teacher saved with its split: factory potstill.teachers.vqgraph:load_vqgraph_teacher, kwargs
    {folder: <what python -m potstill.teachers.vqgraph --out wrote>}."""


class GraphEvalConfig(EvalConfig):
    batch_size: int = Field(32, ge=1, description="nodes (or graphs) per batch in the teacher / student throughput "
                            "comparison (evaluation scores all items at once)")


class GraphRecipe(RecipeBase):
    """task: graph: a graph-free student (an MLP on each node's own features, pooled per graph for graphs)
    distilled from a GNN teacher on its logits (GLNN) and its soft code assignments (VQGraph's vqgraph_code_kl)."""

    task: Literal["graph"]
    teacher: GraphTeacherConfig = Field(default_factory=GraphTeacherConfig, description="the teacher model")
    student: StudentConfig = Field(description="how the student is built: init factory, e.g. "
                                   "potstill.students.graph_mlp:GraphMLP (in_dim, num_classes and graph_level "
                                   "filled in from the data when not given)")
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
            raise ValueError("data.prune is not read by the graph task (the training items are the teacher's split)")
