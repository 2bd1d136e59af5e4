"""The sections every task's recipe has: data, teacher, student, objectives, trainer, eval.

A task's recipe (potstill.config.tasks, potstill.config.generative) uses these or a subclass that adds the
fields only that task reads. Path fields are `RelPath` / `ModelPath` / `DataPath` (potstill.config.paths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from potstill.config.paths import DataPath, ModelPath, RelPath
from potstill.errors import did_you_mean


class Strict(BaseModel):
    """Unknown keys are errors; assignments are validated; numbers are finite (no .inf / .nan)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SubFieldError(ValueError):
    """A ValueError about a key below the field being validated (e.g. `params.temperature` of an objective):
    the recipe's error message then names that key's path and line."""

    def __init__(self, sub: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.sub = sub


MAX_EPOCHS = 1_000_000
MAX_SEED = 2**32 - 1


class DataSource(Strict):
    """Where records come from: a file (JSONL/CSV/TSV/Parquet), a `datasets` folder, or `builtin:<name>`."""

    path: DataPath = Field(description="file, `datasets` folder, Hugging Face dataset id (org/name, read through "
                       "the HF cache), or builtin:digits / bbc / bbc-sentences / bbc-continuations (preference "
                       "pairs) / chatterbot / general / lee; relative paths are relative to the recipe")
    split: str | None = Field(None, description="split of a DatasetDict folder or a builtin dataset")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="canonical name -> column in the file, e.g. {text: sentence}")
    limit: int | None = Field(None, ge=1, description="keep only the first N records")

    def describe(self) -> str:
        """The source in words, e.g. "builtin:bbc (test split, first 600)" (reports and model cards)."""
        extra = [f"{self.split} split"] if self.split else []
        extra += [f"first {self.limit:,}"] if self.limit else []
        return f"{self.path} ({', '.join(extra)})" if extra else str(self.path)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class TeacherConfig(Strict):
    """The teacher model: a Hugging Face folder / id, or a factory function (the fields every task has)."""

    path: ModelPath | None = Field(None, description="Hugging Face model folder, or id (read through the HF "
                                   "cache; downloaded when online), or "
                                   "builtin:minilm / builtin:smollm2")
    factory: str | None = Field(None, description="'module:function' returning a torch.nn.Module teacher")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for `factory`")
    weights: RelPath | None = Field(None, description="optional .safetensors/.pt state-dict file for the factory's "
                                    "module")
    layers_path: str | None = Field(None, description="module path of the teacher's list of transformer blocks "
                                    "(e.g. encoder.layer), for objectives on internals; default: found from the "
                                    "config's layer count")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if self.path is not None and self.factory is not None:
            raise ValueError("give exactly one of teacher.path or teacher.factory")
        return self


class NoTopKCache:
    """Mixin for the teacher of a task without `teacher.cache` (only causal_lm has one): code shared by all
    tasks reads `recipe.teacher.cache`, which is then None."""

    @property
    def cache(self) -> None:
        return None


class LoraStudentConfig(Strict):
    """LoRA adapters on the student through peft: its weights stay frozen, low-rank updates train."""

    r: int = Field(8, ge=1, description="rank of each update B·A")
    alpha: int = Field(16, ge=1, description="scale: the update is (alpha / r)·B·A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="names of the linear layers that get adapters (e.g. [query, value]); all-linear; null = "
        "peft's default for the architecture")
    modules_to_save: list[str] | None = Field(None, description="modules trained in full next to the adapters "
                                              "(e.g. [classifier] for a new classification head)")


# The dims `student.init: pruned` can cut (potstill.students.pruning.PRUNABLE_FIELDS).
PRUNABLE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                   "num_hidden_layers")


class StudentConfig(Strict):
    """How the student is built (the fields every task has; the embedding task adds init: static)."""

    init: Literal["layers_from_teacher", "from_config", "pretrained", "factory", "pruned", "swiftkv"] = Field(
        "layers_from_teacher", description="how the student is built; pruned: the teacher cut to the dims in "
        "student.config by mask-gradient importance on the training data (MiniMA; embedding and causal_lm tasks); "
        "swiftkv: the teacher itself with SwiftKV's SingleInputKV from student.config.cut_layer on (across_kv: "
        "layers sharing one K/V), only the new K/V weights training (Llama-layout causal LMs)")
    layers: list[int] | None = Field(None, description="teacher layers copied into the student (layers_from_teacher; "
                                     "with pruned: the layers kept instead of choosing num_hidden_layers)")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="config overrides for from_config, e.g. {num_hidden_layers: 2}; for "
                                   "pruned the target dims: " + ", ".join(PRUNABLE_FIELDS) + "; for swiftkv "
                                   "cut_layer (default half the depth) and across_kv (default 1)")
    dropout: float | None = Field(None, ge=0, lt=1, description="set every dropout rate of the student (hidden "
                                  "states, attention; a LoRA adapter's own dropout aside) to this value; null "
                                  "keeps the rates its init gives it (e.g. the teacher's config)")
    calibration_batches: int = Field(8, ge=1, description="init pruned: training batches the importance is "
                                     "averaged over (the first texts of data.train)")
    calibration_batch_size: int = Field(8, ge=1, description="init pruned: texts per calibration batch")
    path: ModelPath | None = Field(None, description="pretrained student folder or Hugging Face id (init: pretrained)")
    factory: str | None = Field(None, description="'module:function' returning a torch.nn.Module (init: factory)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for `factory`")
    layers_path: str | None = Field(None, description="module path of the student's list of transformer blocks, "
                                    "for objectives on internals; default: found from the config's layer count")
    lora: LoraStudentConfig | None = Field(None, description="train LoRA adapters (peft) instead of the whole "
                                           "student; the saved student has them merged, the adapter is saved in "
                                           "<run>/adapter/")

    @field_validator("init", mode="before")
    @classmethod
    def _static_is_embedding(cls, init: Any) -> Any:
        if init == "static" and "static" not in get_args(cls.model_fields["init"].annotation):
            raise ValueError("student.init static (a static-embedding student) is for the embedding task")
        return init

    @model_validator(mode="after")
    def _needs(self) -> StudentConfig:
        need = {"layers_from_teacher": "layers", "pretrained": "path", "factory": "factory"}.get(self.init)
        if need and getattr(self, need) is None:
            raise ValueError(f"student.init is {self.init!r}, which needs student.{need}")
        if self.init == "pruned":
            unknown = sorted(set(self.config) - set(PRUNABLE_FIELDS))
            if unknown or not (self.config or self.layers):
                raise ValueError(f"student.config for init pruned takes the target dims {', '.join(PRUNABLE_FIELDS)}"
                                 f"{'; got ' + ', '.join(unknown) if unknown else ' (give at least one)'}")
        if self.dropout is not None and self.init in ("static", "swiftkv"):
            raise SubFieldError(("dropout",), f"init {self.init} has no dropout of its own to set (static: no "
                                "layers; swiftkv: the teacher's own frozen layers); remove student.dropout")
        if self.init == "swiftkv" and set(self.config) - {"cut_layer", "across_kv"}:
            raise ValueError(f"student.config for init swiftkv takes cut_layer and across_kv; got "
                             f"{', '.join(sorted(set(self.config) - {'cut_layer', 'across_kv'}))}")
        return self

    @model_validator(mode="after")
    def _lora_on_layers(self) -> StudentConfig:
        if self.lora is not None and self.init == "static":
            raise ValueError("student.lora adapts a transformer's linear layers; a static-embedding student (init "
                             "static) has none")
        return self


class ObjectiveConfig(Strict):
    name: str = Field(description="an objective listed by `potstill objectives`")
    weight: float = Field(1.0, ge=0, description="weight of this term in the summed loss")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="keyword arguments of the loss, e.g. {temperature: 4}; checked "
                                   "by name, type and bound against the objective's parameters")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from potstill.losses import OBJECTIVES

        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}{did_you_mean(name, OBJECTIVES)}; "
                             f"valid: {', '.join(OBJECTIVES)}")
        return name

    @model_validator(mode="after")
    def _params(self) -> ObjectiveConfig:
        from potstill.losses.objective_params import check_params

        for key, problem in check_params(self.name, self.params):
            raise SubFieldError(("params", key), problem)
        return self


class PruneConfig(Strict):
    """Train on a pruned share of data.train, with KD (Ben-Baruch et al. 2024, "Distilling the Knowledge in Data
    Pruning"): with a full-data teacher, random pruning is as good as a clever score, and the KD weight should
    grow as the kept fraction shrinks."""

    fraction: float = Field(gt=0, le=1, description="share of the training records kept (rounded, at least one)")
    keep: Literal["random", "hardest", "easiest"] = Field("random", description="which records: a seeded random "
                                                          "subset, or the highest / lowest score_column values")
    score_column: str | None = Field(None, description="record field with a difficulty score (higher = harder, "
                                     "e.g. EL2N or the teacher's loss); needed for keep hardest / easiest")
    tie_kd_weight: StrictBool = Field(True, description="loss = (1 − α(f))·hard-label CE + α(f)·(the objectives), α(f) "
                                "= potstill.data.kd_weight_for_fraction(fraction) (0.5 at f = 1, 0.9 at f ≤ 0.1); "
                                "the recipe's objective weights then set the split among the KD terms and "
                                "trainer.hard_label_weight is replaced. Needs gold labels and one objective")

    @model_validator(mode="after")
    def _score_for_rank(self) -> PruneConfig:
        if self.keep != "random" and self.score_column is None:
            raise ValueError(f"data.prune.keep {self.keep!r} ranks records by a score: give data.prune.score_column")
        if self.keep == "random" and self.score_column is not None:
            raise ValueError("data.prune.score_column is only used with keep hardest / easiest")
        return self


class DomainsConfig(Strict):
    """DDK (Liu et al. 2024): sample training batches by domain, re-weighted every `every` optimizer steps toward
    the domains where the student's perplexity is furthest above the teacher's, with a floor per domain."""

    column: str = Field("domain", description="record field naming each record's domain (data.train and data.eval)")
    every: int = Field(100, ge=1, description="optimizer steps between weight updates (the paper's K = 1,000 on "
                       "~15B tokens; smaller runs need smaller K)")
    smoothing: float = Field(0.5, ge=0, le=1, description="the paper's α: weights = α·(updated) + (1 − α)/N, so "
                             "every domain keeps at least (1 − α)/N")
    eval_records: int = Field(64, ge=1, description="data.eval records per domain used to measure the "
                              "perplexities (the first N of each domain)")


class DataConfig(Strict):
    """The records (the fields every task has)."""

    train: DataSource = Field(description="training records")
    eval: DataSource | None = Field(None, description="held-out records scored during and after training")
    max_length: int = Field(128, ge=1, description="token limit for text inputs (causal_lm: tokens per sequence)")
    prune: PruneConfig | None = Field(None, description="keep only a share of data.train (random or by a score), "
                                      "with the KD weight tied to the kept share")


class DomainWeightedData(DataConfig):
    """The data of a task that can weight its training batches by domain (classification, causal_lm)."""

    domains: DomainsConfig | None = Field(None, description="domain-weighted sampling (DDK): needs a domain column "
                                          "in data.train and data.eval")


class NoDomains:
    """Mixin for the data of a task without `data.domains`: code shared by all tasks reads
    `recipe.data.domains`, which is then None."""

    @property
    def domains(self) -> None:
        return None


class EvalConfig(Strict):
    """Evaluation during and after training (the fields every task has)."""

    every: int = Field(0, ge=0, description="evaluate every N optimizer steps (0 = only at the end)")
    compare_before: StrictBool = Field(True, description="also evaluate the untrained student (the 'before' row)")
    throughput: StrictBool = Field(True, description="measure teacher and student throughput (interleaved)")
    batch_size: int = Field(64, ge=1, description="batch size for evaluation and teacher caching")


class EarlyStoppingConfig(Strict):
    """Stop when an eval metric stops improving, and save the student of its best evaluation."""

    metric: str = Field(description="a metric the task's evaluation gives (eval/<metric> in metrics.jsonl), e.g. "
                        "accuracy, perplexity, mrr@10")
    mode: Literal["min", "max"] = Field(description="whether lower (min) or higher (max) values are better")
    patience: int = Field(3, ge=1, description="evaluations in a row without improvement before training stops")
    min_delta: float = Field(0.0, ge=0, description="an evaluation improves only when it beats the best by more "
                             "than this")


class WeightAverageConfig(Strict):
    """Average the student's weights along training (potstill.train.weight_average): EMA or SWA."""

    method: Literal["ema", "swa"] = Field(description="ema: θ̄ ← decay·θ̄ + (1 − decay)·θ after each averaged step "
                                          "(Polyak / mean teacher); swa: the equal-weight mean of the averaged "
                                          "steps' weights (SWA, dense as SWAD)")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA's decay (method: ema only)")
    start: float = Field(0.0, ge=0, lt=1, description="averaging begins after this fraction of the run's steps")
    every: int = Field(1, ge=1, description="fold the weights in every N steps (and at the last step)")

    @model_validator(mode="after")
    def _decay_is_emas(self) -> WeightAverageConfig:
        if self.method == "swa" and "decay" in self.model_fields_set:
            raise SubFieldError(("decay",), "is EMA's rate; method swa weighs every averaged step equally: drop "
                                "decay or use method: ema")
        return self


class TrainerConfig(Strict):
    """The optimisation loop (the fields every task has)."""

    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS, description="passes over the training data (ignored if "
                          "max_steps is set)")
    max_steps: int | None = Field(None, ge=0, description="optimizer steps; overrides epochs; 0 = no training "
                                  "(evaluate and save the student as built, e.g. a data-free static student)")
    batch_size: int = Field(32, ge=1, description="micro-batch size per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW's (β1, β2), each in [0, 1)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps (overrides warmup_ratio)")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="warm-up as a fraction of all steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (null = off)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast for both models")
    log_every: int = Field(10, ge=1, description="write a metrics.jsonl line every N steps")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    hard_label_weight: float = Field(0.0, ge=0, description="weight of cross-entropy on gold labels")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    max_seconds: float | None = Field(None, gt=0, description="wall-clock budget of the training loop: stop after "
                                      "the first optimizer step that ends past it (checked after each step; kept "
                                      "in checkpoints, so a resumed run spends only what is left); null = none")
    group_by_length: StrictBool = Field(False, description="batch records of similar token length together (less "
                                  "padding): each window of 50 global micro-batches of the epoch's shuffled order "
                                  "is sorted by length, cut into batches, and the batches shuffled")
    optimizer: Literal["adamw", "adamw_fused", "adafactor", "sgd", "adamw_8bit"] = Field(
        "adamw", description="torch AdamW; adamw_fused: torch AdamW with fused=True; adafactor: transformers' "
        "Adafactor at trainer.lr (no relative step); sgd: torch SGD with trainer.momentum; adamw_8bit: "
        "bitsandbytes' AdamW8bit (needs bitsandbytes)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD's momentum (optimizer: sgd)")
    wise_ft_alpha: float | None = Field(None, gt=0, lt=1, description="WiSE-FT (potstill.train.wise_ft): save "
                                        "(1 − α)·init + α·trained weights, α in (0, 1), 0.5 the paper's default; "
                                        "the final evaluation scores the mixed student; null = the trained weights")
    weight_average: WeightAverageConfig | None = Field(None, description="save the EMA or SWA average of the "
                                                       "student's weights along training instead of the last "
                                                       "iterate; the final evaluation scores it; null = off")
    early_stopping: EarlyStoppingConfig | None = Field(None, description="stop on an eval metric evaluated every "
                                                       "eval.every steps; the best evaluation's weights become "
                                                       "the saved student")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab",
                            "trackio"]] = Field(
        default_factory=list, description="experiment trackers (Accelerate's) that get the metrics.jsonl scalars; "
        "a name or a list, none = []; TensorBoard writes to <run>/trackers/; each needs its package installed")

    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="how several processes (accelerate launch --num_processes N) share the models: ddp = "
        "each holds the whole student and teacher; fsdp = FSDP2 (fully_shard) splits the student's and the frozen "
        "teacher's parameters and the optimizer state across them, checkpoints sharded by torch.distributed."
        "checkpoint; an Accelerate config with distributed_type: FSDP (fsdp_version: 2) selects it too; one "
        "process: no effect")
    gradient_checkpointing: StrictBool = Field(False, description="recompute the student's activations in "
                                               "backward instead of keeping them (Hugging Face students: "
                                               "gradient_checkpointing_enable): less memory, more compute")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_none(cls, value: Any) -> Any:
        if value in (None, "none"):
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _momentum_is_sgd(self) -> TrainerConfig:
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"trainer.momentum is SGD's; trainer.optimizer is {self.optimizer!r}: set optimizer: sgd "
                             f"or drop momentum")
        return self


def check_domains(recipe: RecipeBase) -> None:
    """DDK (`data.domains`, classification and causal_lm tasks) scores each domain on data.eval."""
    if recipe.data.eval is None:
        raise ValueError("data.domains measures each domain's student / teacher perplexity on data.eval: "
                         "give data.eval, with the same domain column")


def check_domains_teacher(recipe: RecipeBase) -> None:
    """DDK compares the student with a live teacher model per domain."""
    if not recipe.has_teacher_model():
        raise ValueError("data.domains compares the student with a teacher model per domain: give "
                         "teacher.path or teacher.factory")


DISTILLATION_TASKS = ("classification", "embedding", "causal_lm", "vision", "ranking", "seq2seq",
                      "image_classification", "vision_language", "masked_lm", "segmentation", "graph", "judge")
TASKS = (*DISTILLATION_TASKS, "continual")  # continual: potstill.config.continual, not a teacher → student run


def check_run_name(name: str) -> str:
    """`name` when it is a folder under output_dir: names separated by /, none empty, . or .."""
    parts = name.replace("\\", "/").split("/")
    if not name.strip() or any(part.strip() in ("", ".", "..") for part in parts):
        raise ValueError(f"the run name is a folder under output_dir (names separated by /, none empty, . or "
                         f"..), got {name!r}")
    return name


class RunFolderFields(Strict):
    """`name` and `output_dir`, the two fields that place a run's folder, shared by every recipe schema."""

    name: str = Field("run", min_length=1, description="run name: output goes to <output_dir>/<name>/ (a "
                      "relative folder: not empty, no . or .. part)")
    output_dir: str = Field("runs", description="parent folder of the run folder (relative to the cwd)")

    @field_validator("name")
    @classmethod
    def _folder_under_output_dir(cls, name: str) -> str:
        return check_run_name(name)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class RecipeBase(RunFolderFields):
    """What every task's recipe has. A recipe is one of its subclasses, chosen by `task` (potstill.config.Recipe);
    each subclass narrows the sections to its task's fields and adds its own sections and rules (`check`)."""

    task: str = Field(description="what the models do: " + ", ".join(DISTILLATION_TASKS))
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of every random draw (0 .. 2**32 - 1)")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the teacher model")
    student: StudentConfig = Field(description="how the student is built")
    data: DataConfig
    objectives: list[ObjectiveConfig] = Field(default_factory=list, description="weighted distillation terms")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _rules(self) -> RecipeBase:
        self.check()
        return self

    @model_validator(mode="after")
    def _wise_ft_alone(self) -> RecipeBase:
        if self.trainer.wise_ft_alpha is None:
            return self
        if self.trainer.early_stopping is not None:
            raise SubFieldError(("trainer", "wise_ft_alpha"), "mixes the final weights with the init, while "
                                "trainer.early_stopping picks an earlier evaluation's weights: use one of them")
        if getattr(self.student, "lora", None) is not None:
            raise SubFieldError(("trainer", "wise_ft_alpha"), "is not supported with student.lora (a LoRA "
                                "student's adapter would be mixed, not its merged weights): drop one of them")
        return self

    @model_validator(mode="after")
    def _weight_average_alone(self) -> RecipeBase:
        if self.trainer.weight_average is not None and self.trainer.early_stopping is not None:
            raise SubFieldError(("trainer", "weight_average"), "saves the average of the weights along training, "
                                "while trainer.early_stopping saves one evaluation's weights: use one of them")
        return self

    @model_validator(mode="after")
    def _early_stopping_needs_evaluations(self) -> RecipeBase:
        if self.trainer.early_stopping is not None and (self.eval.every == 0 or self.data.eval is None):
            raise SubFieldError(("trainer", "early_stopping"), "compares evaluations during training: it needs "
                                f"eval.every > 0 (now {self.eval.every}) and data.eval"
                                + ("" if self.data.eval else " (not given)"))
        return self

    def check(self) -> None:
        """Rules across sections (a ValueError names the fields); a task's recipe extends or reorders them."""
        self.check_loss()
        self.check_prune()
        self.check_teacher()

    def check_loss(self) -> None:
        if not self.objectives and self.trainer.hard_label_weight == 0:
            raise ValueError("no loss: give at least one objective or trainer.hard_label_weight > 0")

    def check_prune(self) -> None:
        if self.data.prune is not None and self.data.prune.tie_kd_weight and not self.objectives:
            raise ValueError("data.prune.tie_kd_weight splits the loss between the hard labels and KD: give at least "
                             "one objective, or set data.prune.tie_kd_weight: false")

    def has_teacher_model(self) -> bool:
        return self.teacher.path is not None or self.teacher.factory is not None

    def check_teacher(self) -> None:
        if not self.has_teacher_model():
            raise ValueError("give exactly one of teacher.path or teacher.factory")
