"""The search space of `potstill search`: a YAML file parsed into a typed `SearchSpace`, sampled by Optuna.

A space names what varies between candidate students (everything else comes from the recipe):

    proxy: train                 # train: a short run through the Distiller; diswot: the zero-cost score at init;
                                 # supernet: a slice of AutoDistil's supernet, trained once (supernet: {...})
    budget: {max_steps: 20}      # per trial (proxy train): max_steps and/or max_seconds
    quality: {metric: cosine_to_teacher, direction: maximize}   # a metric of the task's evaluation
    student:
      init: [layers_from_teacher, pruned]   # also from_config (random init), static (embedding task)
      layers: [[0, 3], [0, 5]]   # layer-drop choices (layers_from_teacher); without it: spread over `depth`
      depth: [2, 3, 4]           # num_hidden_layers (pruned, from_config; layers_from_teacher without layers)
      width: [384]               # hidden_size (pruned, from_config)
      heads: [12]                # num_attention_heads (pruned, from_config)
      ffn: [384, 768, 1536]      # intermediate_size (pruned, from_config)
    objectives:                  # choices of the whole objectives list; a weight may be a range
      - [{name: embedding_mse, params: {normalize: true}}]
    temperature: {low: 1, high: 4}          # into every chosen objective that takes a temperature
    lr: {low: 1.0e-4, high: 1.0e-3, log: true}

A range is {low, high, log}; a list is a categorical choice. A field left out does not vary. Mistakes are
`UserError`s naming the file and the field.

`proxy: supernet` (`potstill.search.supernet_proxy`) searches architecture only: `student.init` is `[supernet]`
(the default under that proxy), the candidates are `depth` × `width` × `ffn` (a dim left out keeps the teacher's),
and `layers`, `heads`, `objectives`, `temperature`, `lr` and `quality` are refused (a subnet keeps its depth's
layers spread evenly, its heads follow the width, and its quality is the held-out relation loss).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from potstill.config.common import Strict
from potstill.errors import UserError

Init = Literal["layers_from_teacher", "pruned", "from_config", "static", "supernet"]
SHAPED_INITS = ("pruned", "from_config")  # the inits whose dims the space sets
DIMS = {"depth": "num_hidden_layers", "width": "hidden_size", "heads": "num_attention_heads",
        "ffn": "intermediate_size"}
DEFAULT_QUALITY = {"embedding": ("cosine_to_teacher", "maximize"), "causal_lm": ("kl_to_teacher", "minimize")}
SEARCH_TASKS = tuple(DEFAULT_QUALITY)
SUPERNET_METRIC = "supernet_loss"  # proxy supernet's quality: a subnet's held-out relation loss (lower is better)


class Range(Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class StudentSpace(Strict):
    init: list[Init] = Field(default_factory=lambda: list[Init](["layers_from_teacher"]), min_length=1)
    layers: list[list[int]] | None = Field(None, min_length=1)
    depth: list[int] | None = Field(None, min_length=1)
    width: list[int] | None = Field(None, min_length=1)
    heads: list[int] | None = Field(None, min_length=1)
    ffn: list[int] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> StudentSpace:
        for field in ("depth", "width", "heads", "ffn"):
            values = getattr(self, field)
            if values is not None and min(values) < 1:
                raise ValueError(f"{field}: sizes must be >= 1, got {min(values)}")
        if "supernet" in self.init:
            return self._supernet_consistent()
        if self.layers is not None:
            if "layers_from_teacher" not in self.init:
                raise ValueError("layers are the layer-drop choices: add layers_from_teacher to init")
            if any(not choice or min(choice) < 0 for choice in self.layers):
                raise ValueError("layers: each choice is a non-empty list of teacher layer indices (>= 0)")
        shaped = [f for f in ("width", "heads", "ffn") if getattr(self, f) is not None]
        if shaped and not set(SHAPED_INITS) & set(self.init):
            raise ValueError(f"{', '.join(shaped)} set the shape of a pruned or from_config student: add one of "
                             f"those to init (layer-drop students keep the teacher's width)")
        if "layers_from_teacher" in self.init and self.layers is None and self.depth is None:
            raise ValueError("init layers_from_teacher needs layers (the layer-drop choices) or depth")
        if set(SHAPED_INITS) & set(self.init) and not (self.depth or shaped):
            raise ValueError("init pruned / from_config need at least one of depth, width, heads, ffn")
        return self

    def _supernet_consistent(self) -> StudentSpace:
        if self.init != ["supernet"]:
            raise ValueError("init supernet (a slice of the study's supernet) is the only init of proxy supernet")
        if self.layers is not None:
            raise ValueError("layers: a supernet subnet of depth L keeps L teacher layers spread evenly from the "
                             "first to the last; give depth instead of layer choices")
        if self.heads is not None:
            raise ValueError("heads: a supernet subnet keeps the teacher's head size, so its heads follow its "
                             "width; leave heads out")
        if not (self.depth or self.width or self.ffn):
            raise ValueError("init supernet needs at least one of depth, width, ffn")
        return self


class ObjectiveChoice(Strict):
    name: str
    weight: float | Range = 1.0
    params: dict[str, Any] = Field(default_factory=dict)


class TrialBudget(Strict):
    max_steps: int | None = Field(None, ge=1)
    max_seconds: float | None = Field(None, gt=0)


class Quality(Strict):
    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"


class DisWOTData(Strict):
    path: str
    split: str | None = None
    limit: int = Field(64, ge=2)
    form: Literal["gram", "code"] = "gram"


class TextSource(Strict):
    """Texts the supernet reads: a data path or builtin:<name>, its split, the first `limit` records."""

    path: str
    split: str | None = None
    limit: int | None = Field(None, ge=1)


class SupernetSettings(Strict):
    """AutoDistil's supernet of proxy supernet; the defaults are `benchmarks/supernet_suite.py`'s measured
    setting (240 sandwich steps of batch 8 at 32 tokens, lr 1e-4, 2 random subnets beside the largest and the
    smallest, last-layer q/k/v relations with the teacher's head count, 64 held-out texts)."""

    steps: int = Field(240, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(32, ge=2)
    lr: float = Field(1.0e-4, gt=0)
    n_random: int = Field(2, ge=0)
    relation_heads: int | None = Field(None, ge=1)
    seed: int = 0
    train: TextSource | None = None  # default: the recipe's data.train
    heldout: TextSource | None = None  # default: the recipe's data.eval, first 64


class SearchSpace(Strict):
    proxy: Literal["train", "diswot", "supernet"] = "train"
    budget: TrialBudget = Field(default_factory=lambda: TrialBudget(max_steps=20))
    quality: Quality | None = None
    student: StudentSpace = Field(default_factory=StudentSpace)
    objectives: list[list[ObjectiveChoice]] | None = Field(None, min_length=1)
    temperature: Range | list[float] | None = None
    lr: Range | list[float] | None = None
    diswot: DisWOTData | None = None
    supernet: SupernetSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _supernet_init(cls, raw: Any) -> Any:
        """Under proxy supernet, a student section without init means init [supernet]."""
        if isinstance(raw, dict) and raw.get("proxy") == "supernet" and isinstance(raw.get("student"), dict) \
                and "init" not in raw["student"]:
            return {**raw, "student": {**raw["student"], "init": ["supernet"]}}
        return raw

    @model_validator(mode="after")
    def _budget(self) -> SearchSpace:
        if self.proxy == "supernet":
            return self._supernet_only()
        if "supernet" in self.student.init:
            raise ValueError("student.init supernet is a slice of AutoDistil's supernet: it needs proxy: supernet")
        if self.supernet is not None:
            raise ValueError("supernet: these are the settings of proxy supernet; set proxy: supernet or remove them")
        if self.proxy == "train" and self.budget.max_steps is None and self.budget.max_seconds is None:
            raise ValueError("budget: proxy train needs max_steps or max_seconds per trial")
        if self.objectives is not None and any(not choice for choice in self.objectives):
            raise ValueError("objectives: each choice is a non-empty list of objectives")
        return self

    def _supernet_only(self) -> SearchSpace:
        if self.student.init != ["supernet"]:
            raise ValueError("student.init: proxy supernet scores slices of the study's supernet: init is "
                             "[supernet] (or left out), with depth / width / ffn choices")
        varied = [f for f in ("objectives", "temperature", "lr", "quality", "diswot") if getattr(self, f) is not None]
        if varied:
            raise ValueError(f"{', '.join(varied)}: proxy supernet searches the architecture only (its quality is "
                             f"the held-out relation loss, minimized); remove them")
        return self

    def quality_for(self, task: str) -> Quality:
        """The quality metric and direction: the space's, else the proxy's or the task's default."""
        if self.proxy == "supernet":
            return Quality.model_validate({"metric": SUPERNET_METRIC, "direction": "minimize"})
        if self.quality is not None:
            return self.quality
        metric, direction = DEFAULT_QUALITY[task]
        return Quality.model_validate({"metric": metric, "direction": direction})


def parse_space(raw: Any, source: str = "space") -> SearchSpace:
    """A `SearchSpace` from the parsed YAML; every problem is one `UserError` line naming `source` and the field."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a search space is a YAML mapping (proxy, budget, student, ...), got "
                        f"{type(raw).__name__}")
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as err:
        by_field: dict[str, list[str]] = {}
        for e in err.errors():
            # a union's branches add their type tags (`function-after[...]`, `list[float]`, `Range`) to the path
            loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p[:1].isupper()
                                                                                      or p in ("float", "int"))))
            message = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            by_field.setdefault(loc or "(top)", []).append(message)
        problems = []
        for loc, messages in by_field.items():
            # of a union's branches, keep the specific complaint over "not the other type"
            specific = [m for m in messages if not m.startswith("Input should be a valid")] or messages
            problems += [f"field {loc}: {m}" for m in dict.fromkeys(specific)]
        raise UserError(f"invalid search space: {source}: " + "; ".join(problems)) from None


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--space: search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    return parse_space(raw, str(path))


def _suggest(trial: Any, name: str, spec: Range | list) -> Any:
    if isinstance(spec, Range):
        return trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    return trial.suggest_categorical(name, list(spec))


def sample(space: SearchSpace, trial: Any) -> dict[str, Any]:
    """One candidate: the space's values drawn through an Optuna trial (`suggest_*`, define-by-run: the dims of
    an init are drawn only when that init is). Lists are drawn as their JSON text (Optuna's choices are scalars)."""
    s = space.student
    values: dict[str, Any] = {"init": trial.suggest_categorical("init", list(s.init))}
    if values["init"] == "layers_from_teacher":
        if s.layers is not None:
            values["layers"] = json.loads(trial.suggest_categorical("layers", [json.dumps(c) for c in s.layers]))
        else:
            values["depth"] = trial.suggest_categorical("depth", list(s.depth or []))
    elif values["init"] in (*SHAPED_INITS, "supernet"):
        for field in DIMS:
            options = getattr(s, field)
            if options is not None:
                values[field] = trial.suggest_categorical(field, list(options))
    if space.objectives is not None:
        index = trial.suggest_categorical("objectives", list(range(len(space.objectives))))
        values["objectives"] = index
        for j, objective in enumerate(space.objectives[index]):
            if isinstance(objective.weight, Range):
                values[f"weight.{index}.{j}"] = _suggest(trial, f"weight.{index}.{j}", objective.weight)
    for field in ("temperature", "lr"):
        spec = getattr(space, field)
        if spec is not None:
            values[field] = _suggest(trial, field, spec)
    return values
